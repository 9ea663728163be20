#!/usr/bin/env python
"""Generate ``generators/models/test_<backend>_unified.py`` for every registered backend.

    python generators/generate_unified_tests.py [--check] [--output-dir DIR]

Same as the ``iap-generate-tests`` console script. The backends come from the plugin
manager (entry-point group ``ipfs_accelerate_py.backends``), so installing a backend
plugin (``pip install -e plugins/openai_compat``) and rerunning this adds its runner, and
uninstalling it and rerunning removes it. The logic lives in
``ipfs_accelerate_py.unified_runner.generate``; the template is
``generators/templates/unified_runner.py.tmpl``.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

try:
    from ipfs_accelerate_py.unified_runner.generate import main
except ImportError:  # a source checkout that was never pip-installed
    sys.path.insert(0, str(HERE.parent))
    from ipfs_accelerate_py.unified_runner.generate import main


def _defaults(argv):
    """This script's own checkout, whatever the working directory is."""
    argv = list(argv)
    if not any(a == "--template" or a.startswith("--template=") for a in argv):
        argv += ["--template", str(HERE / "templates" / "unified_runner.py.tmpl")]
    if not any(a == "--output-dir" or a.startswith("--output-dir=") for a in argv):
        argv += ["--output-dir", str(HERE / "models")]
    return argv


if __name__ == "__main__":
    sys.exit(main(_defaults(sys.argv[1:])))
