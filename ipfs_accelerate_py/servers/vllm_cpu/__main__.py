"""``python -m ipfs_accelerate_py.servers.vllm_cpu``: see :func:`._cli.main`."""
import sys

from ._cli import main

sys.exit(main())
