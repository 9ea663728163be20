"""Fixtures for the api_backends tests: a listener that counts connections, two test
doubles, and a client over several endpoints."""

from __future__ import annotations

import socket
import threading
from typing import Any, Dict, Iterator, List

import pytest

from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer


class CountingListener:
    """A loopback TCP listener that accepts and counts connections and answers nothing.

    Tests point a client at it to prove that bad input never reaches the wire.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


@pytest.fixture
def counting_listener() -> Iterator[CountingListener]:
    listener = CountingListener()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def fakes() -> Iterator[List[FakeVllmServer]]:
    """Two started test doubles (two servers to route over), stopped after the test."""
    servers = [FakeVllmServer().start(), FakeVllmServer().start()]
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def client_over(urls: Dict[str, str], **settings: Any) -> VllmClient:
    """A client whose default endpoint is the first URL, plus one endpoint per URL (routing
    leaves the default out: it is the same server as the first)."""
    c = VllmClient(base_url=next(iter(urls.values())), timeout=10, **settings)
    for eid, url in urls.items():
        c.create_endpoint(endpoint_id=eid, base_url=url)
    return c
