import sys

from pair.gateway.app import main

sys.exit(main())
