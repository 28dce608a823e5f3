"""``python -m vodq``: the same command line as ``vodq``."""

import sys

from vodq.cli import main

# Guarded, because multiprocessing may import the main module again in a
# child process, where it must not start the command a second time.
if __name__ == "__main__":
    sys.exit(main())
