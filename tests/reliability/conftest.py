"""Fixtures for the reliability tests (the double, ``make_client`` and ``free_port`` are the
root conftest's; plain helpers are in ``reliability_support``).

The shared real server (``real_vllm_server``) is never used here: the crash test starts,
kills and restarts a server of its own.
"""

from __future__ import annotations
