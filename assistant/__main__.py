import sys

from assistant.app import main

sys.exit(main())
