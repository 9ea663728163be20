"""Fixtures for the api_backends tests (the double, ``make_client``, ``free_port`` and the real
server are the root conftest's; plain helpers are in ``api_support``)."""

from __future__ import annotations

import importlib
import ssl
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from api_support import (DATA, README_MODEL, CountingListener, EchoAuthHandler, MetricsHandler,
                         OtelCapture, run_snippet, serve_http)
from ipfs_accelerate_py.api_backends.limits import set_max_tokens_cap
from ipfs_accelerate_py.api_backends.server_metrics import parse_prometheus_text
from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer

# the package re-exports the ``vllm`` class under the submodule's name: the module by importlib
vllm_module = importlib.import_module("ipfs_accelerate_py.api_backends.vllm")


# ------------------------------------------------------------------ doubles and listeners
@pytest.fixture
def counting_listener() -> Iterator[CountingListener]:
    """A listener that counts connections: a client pointed at it proves nothing was sent."""
    listener = CountingListener()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def fakes(start_fake: Callable[..., FakeVllmServer]) -> List[FakeVllmServer]:
    """Two started test doubles (two servers to route over), stopped after the test."""
    return [start_fake(), start_fake()]


@pytest.fixture
def echo_server() -> Iterator[str]:
    """A hostile server that answers 500 with the request's Authorization header echoed."""
    with serve_http(EchoAuthHandler) as url:
        yield url


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[str, str]]:
    """``(https URL, CA file)``: the echo server behind a self-signed certificate for 127.0.0.1."""
    d: Path = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    with serve_http(EchoAuthHandler, tls=ctx) as url:
        yield url, str(cert)


@pytest.fixture
def metrics_http() -> Iterator[str]:
    """A plain HTTP server publishing the recorded real /metrics text (waiting set to 3)."""
    with serve_http(MetricsHandler) as url:
        yield url


# ------------------------------------------------------------------ recorded data
@pytest.fixture(scope="module")
def sample() -> Any:
    """The recorded real ``/metrics`` text, parsed."""
    return parse_prometheus_text((DATA / "vllm_metrics_sample.txt").read_text())


@pytest.fixture(scope="module")
def no_stats() -> Any:
    """The real ``/metrics`` of a server started with ``--disable-log-stats``, parsed."""
    return parse_prometheus_text((DATA / "vllm_metrics_disable_log_stats.txt").read_text())


# ------------------------------------------------------------------ clients
@pytest.fixture
def listener_client(counting_listener: CountingListener) -> Iterator[VllmClient]:
    """A client on the counting listener: what it refuses never reaches the wire."""
    with VllmClient(base_url=counting_listener.base_url, max_retries=0, timeout=2) as c:
        yield c


@pytest.fixture
def offline_client(free_port: int) -> Iterator[VllmClient]:
    """A client on a port where nothing listens (for calls that never send)."""
    with VllmClient(base_url=f"http://127.0.0.1:{free_port}") as c:
        yield c


@pytest.fixture(scope="module")
def real_client(real_vllm_server: Any) -> Iterator[VllmClient]:
    """One client on the real server for the module."""
    with VllmClient(base_url=real_vllm_server.base_url, timeout=60) as c:
        yield c


@pytest.fixture
def shared_real_client(real_vllm_server: Any) -> Iterator[VllmClient]:
    """The framework's shared client of the real server, put back as it was after the test
    (its settings, and no max_tokens cap)."""
    client = vllm_module.shared_client(real_vllm_server.base_url)
    keys = ("max_concurrent_requests", "batch_enabled", "max_batch_size", "batch_timeout",
            "timeout", "connect_timeout", "max_retries")
    saved = {k: getattr(client.settings, k) for k in keys}
    yield client
    client._set_on_all_endpoints(**saved)
    for model in (README_MODEL, "tiny-llama"):
        set_max_tokens_cap(client, model, None)


@pytest.fixture
def url(real_vllm_server: Any, shared_real_client: VllmClient) -> str:
    """The real server's URL, its shared client restored after the test."""
    return real_vllm_server.base_url


@pytest.fixture
def readme(real_base_url: str) -> Iterator[Dict[str, Any]]:
    """The namespace after the README's first block ("VllmClient Class") ran."""
    ns: Dict[str, Any] = {}
    run_snippet("VllmClient Class", ns, real_base_url)
    try:
        yield ns
    finally:
        ns["client"].close()


@pytest.fixture
def otel() -> Iterator[OtelCapture]:
    """OTel SDK providers with in-memory exporters, configured for the test's clients."""
    capture = OtelCapture()
    try:
        yield capture
    finally:
        capture.close()
