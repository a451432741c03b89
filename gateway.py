"""`python -m gateway` from a checkout, as SPEC.md section 6 has it: the same program as
`gatewayd` and `python -m pair.gateway`. Not in the wheel, whose one package is `pair`."""

import sys

from pair.gateway.app import main

if __name__ == "__main__":
    sys.exit(main())
