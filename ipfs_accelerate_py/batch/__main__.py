"""``python -m ipfs_accelerate_py.batch``: see ``_cli.py``."""

import sys

from ._cli import main

sys.exit(main())
