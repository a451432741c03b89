import sys

from pairctl.cli import main

sys.exit(main())
