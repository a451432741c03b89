import sys

from pair.ctl.cli import main

sys.exit(main())
