"""``python -m sfm_core ...``: the ``sfm`` command."""

import sys

from .cli import main

sys.exit(main())
