"""Fixtures for the unified runner's tests (the double and the real server are the root
conftest's)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _clean_runner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables from the developer's shell must not change what a test runs."""
    for name in ("VLLM_API_URL", "VLLM_API_KEY", "VLLM_MODEL", "VLLM_TIMEOUT", "VLLM_MAX_RETRIES",
                 "SKIP_PERFORMANCE_TESTS", "SKIP_REAL_TESTS"):
        monkeypatch.delenv(name, raising=False)
