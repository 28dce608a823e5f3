import sys

from vodq.cli import main

sys.exit(main())
