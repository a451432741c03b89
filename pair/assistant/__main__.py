import sys

from pair.assistant.app import main

sys.exit(main())
