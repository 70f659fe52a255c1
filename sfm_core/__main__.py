"""``python -m sfm_core ...``: the ``sfm`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
