"""`python -m lbmamba <command>` (the same as the `lbmamba` console script)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
