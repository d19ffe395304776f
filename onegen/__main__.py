import sys

from onegen.cli import main

sys.exit(main())
