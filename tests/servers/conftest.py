"""Fixtures for the vLLM test double (the real-server fixtures live in ``tests/conftest.py``)."""

from __future__ import annotations

from typing import Iterator

import pytest

from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer


@pytest.fixture
def fake_vllm_server() -> Iterator[FakeVllmServer]:
    """A started :class:`FakeVllmServer` on a free loopback port, stopped after the test.

    Function scope on purpose: faults and counters are per test, and start/stop costs
    milliseconds.
    """
    server = FakeVllmServer().start()
    try:
        yield server
    finally:
        server.stop()
