"""Shared fixtures and helpers for the resilience tests (double, soak and real server).

Import what a test module needs from here (``from fixtures_resilience import ...``); the
fixtures are plain pytest fixtures, so importing them into a test module's namespace is
enough for pytest to find them. Kept out of ``conftest.py`` on purpose: only the resilience
tests use them.

- ``fake_server``: a started :class:`FakeVllmServer` on a free loopback port, per test.
- ``start_fake``: a factory for doubles with options (``latency=``, ``scheduling_policy=``).
- ``make_client``: a factory for ``VllmClient``s pointed at a double, with FAST retry
  delays so fault tests take milliseconds; every client is closed after the test.
- ``real_base_url``: the real vLLM server's base URL (the session fixture
  ``real_vllm_server``, or ``IAP_REAL_VLLM_URL`` to reuse a server that is already running).
- ``wait_until``: a bounded poll on a condition (for states that change in another thread).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Set

import pytest

from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer
from support import wait_until  # noqa: F401 - re-exported for the tests here

__all__ = ["FAST", "fake_server", "start_fake", "make_client", "real_base_url", "wait_until",
           "completion_requests", "request_ids", "client_threads", "COMPLETIONS"]

COMPLETIONS = "/v1/completions"

#: Settings that make retries quick (milliseconds) and keep every wait bounded.
FAST: Dict[str, Any] = dict(model="tiny-llama", retry_delay=0.002, max_retry_delay=0.01,
                            timeout=5.0, connect_timeout=2.0)


def completion_requests(server: FakeVllmServer) -> List[Any]:
    """The ``/v1/completions`` requests the double recorded, oldest first."""
    return [r for r in server.requests if r.path == COMPLETIONS]


def request_ids(server: FakeVllmServer) -> List[str]:
    """The ``X-Request-Id`` of each recorded ``/v1/completions`` request, in order."""
    return [r.headers.get("x-request-id", "") for r in completion_requests(server)]


def client_threads(before: Set[threading.Thread]) -> List[threading.Thread]:
    """Threads alive now that were not in ``before``, except the double's own threads."""
    return [t for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith("fake-vllm")]


@pytest.fixture
def fake_server(fake_vllm_server: FakeVllmServer) -> FakeVllmServer:
    """The root conftest's double under the name these tests use."""
    return fake_vllm_server


@pytest.fixture
def make_client() -> Iterator[Callable[..., VllmClient]]:
    clients: List[VllmClient] = []

    def make(server: FakeVllmServer, **overrides: Any) -> VllmClient:
        client = VllmClient(base_url=server.base_url, **{**FAST, **overrides})
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for c in clients:
            c.close(timeout=5.0)


@pytest.fixture(scope="session")
def real_base_url(request: pytest.FixtureRequest) -> str:
    """Base URL of a real vLLM server serving ``tiny-llama`` and the README's model name."""
    url = os.environ.get("IAP_REAL_VLLM_URL")
    if url:
        return url.rstrip("/")
    return request.getfixturevalue("real_vllm_server").base_url
