"""Batch jobs: millions of requests from a file, exactly once, resumable, on one machine or Ray.

``python -m ipfs_accelerate_py.batch run INPUT OUTPUT`` (or ``iap-batch``) reads vLLM
run-batch / OpenAI batch input lines and writes run-batch's output lines, one per request,
through ``VllmClient``. The package, one concern a module:

=================  ==========================================================================
``_input.py``      reading and checking the input (refusals name the lines; duplicate ids)
``_checkpoint.py`` the output file as the checkpoint: torn tail, answered ids, fsynced groups
``_replies.py``    one request through the client, and the output line it ends as
``_local.py``      the job on one machine, on the client's async face
``_progress.py``   the progress bar and the summary JSON
``_signals.py``    SIGINT / SIGTERM: stop reading, grace for the requests in flight
``_endpoints.py``  the endpoints (or the embedded server) and the client over them
``_ray.py``        the same job as a Ray Data pipeline (``--ray``; the ``ray`` extra)
``_cli.py``        the command line
=================  ==========================================================================

See ``docs/BATCH.md``.
"""

from ._checkpoint import Answered, CheckpointError, open_checkpoint
from ._input import ROUTES, InputError, check_input, read_lines
from ._local import JobOptions, run_local, run_with_client
from ._progress import Summary
from ._cli import main

__all__ = ["JobOptions", "run_local", "run_with_client", "Summary", "InputError",
           "CheckpointError", "check_input", "read_lines", "open_checkpoint", "Answered",
           "ROUTES", "main"]
