"""Fixtures for the unified runner's tests (the real-server ones live in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest

from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer


@pytest.fixture
def fake_server(fake_vllm_server: FakeVllmServer) -> FakeVllmServer:
    """The root conftest's double under the name these tests use."""
    return fake_vllm_server


@pytest.fixture(autouse=True)
def _clean_runner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables from the developer's shell must not change what a test runs."""
    for name in ("VLLM_API_URL", "VLLM_API_KEY", "VLLM_MODEL", "VLLM_TIMEOUT", "VLLM_MAX_RETRIES",
                 "SKIP_PERFORMANCE_TESTS", "SKIP_REAL_TESTS"):
        monkeypatch.delenv(name, raising=False)
