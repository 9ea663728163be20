"""Fixtures for the reliability tests: a per-test vLLM double and clients that are always closed.

The shared real server (``real_vllm_server``) is never used here: the crash test starts,
kills and restarts a server of its own.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List

import pytest

from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer

from reliability_support import transport_factory


@pytest.fixture
def double(fake_vllm_server: FakeVllmServer) -> FakeVllmServer:
    """The root conftest's double under the name these tests use."""
    return fake_vllm_server


@pytest.fixture
def make_client() -> Iterator[Callable[..., VllmClient]]:
    """``make_client(url, transport="requests"|"httpclient"|None, **settings)``; closed after."""
    clients: List[VllmClient] = []

    def make(base_url: str, transport: Any = None, **settings: Any) -> VllmClient:
        opts = dict(model="tiny-llama", retry_delay=0.002, max_retry_delay=0.01, timeout=5.0,
                    connect_timeout=2.0)
        opts.update(settings)
        if transport is not None:
            opts["transport_factory"] = (transport_factory(transport) if isinstance(transport, str)
                                         else transport)
        client = VllmClient(base_url=base_url, **opts)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for c in clients:
            c.close(timeout=5.0)
