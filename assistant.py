"""`python -m assistant` from a checkout, as SPEC.md section 6 has it: the same program as
`assistantd` and `python -m pair.assistant`. Not in the wheel, whose one package is `pair`."""

import sys

from pair.assistant.app import main

if __name__ == "__main__":
    sys.exit(main())
