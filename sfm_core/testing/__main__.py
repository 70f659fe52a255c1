"""``python -m sfm_core.testing SCHEME``: the conformance suite, as ``sfm conformance`` runs it."""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
