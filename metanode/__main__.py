"""`python -m metanode`: the same as the `metanode` command."""

import sys

from metanode.cli import main

if __name__ == "__main__":
    sys.exit(main())
