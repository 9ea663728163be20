"""Building the client under test for any registered backend.

The runner is generic: it gets a backend *name*, asks the plugin manager for that
adapter, and wraps it in ``BaseApiBackend`` (``VllmClient`` for ``vllm``, whose extra
methods the framework relies on, given that same registered adapter). A counting transport lets checks prove that invalid
input fails *before* anything is sent.
"""

from __future__ import annotations

import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Dict, Optional, Tuple, Type

from ..api_backends.adapter import BackendAdapter
from ..api_backends.base import BaseApiBackend, default_transport
from ..api_backends.plugins import get_backend
from ..api_backends.settings import ClientSettings
from ..api_backends.transport import HttpRequest, HttpResponse, StreamResponse, Transport
from ..api_backends.vllm import VllmClient

__all__ = ["BackendClient", "CountingTransport", "SendCounter", "make_client", "client_version"]


class BackendClient(BaseApiBackend):
    """``BaseApiBackend`` around whatever adapter it is given (the plugin's backend)."""


def _client_class(backend: str) -> Optional[Type[BaseApiBackend]]:
    if backend == "vllm":
        return VllmClient
    return None


class SendCounter:
    """How many HTTP requests the transports of one client have sent, by path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_path: Dict[str, int] = {}

    def add(self, path: str) -> None:
        with self._lock:
            self.by_path[path] = self.by_path.get(path, 0) + 1

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.by_path.values())


class CountingTransport(Transport):
    """Delegates to a real transport and counts what it sends."""

    def __init__(self, inner: Transport, counter: SendCounter) -> None:
        self._inner = inner
        self._counter = counter

    def send(self, request: HttpRequest, timeout: Tuple[float, float]) -> HttpResponse:
        self._counter.add(request.path)
        return self._inner.send(request, timeout)

    def open_stream(self, request: HttpRequest, timeout: Tuple[float, float]) -> StreamResponse:
        self._counter.add(request.path)
        return self._inner.open_stream(request, timeout)

    def close(self) -> None:
        self._inner.close()


def make_client(backend: str, base_url: str, timeout: float,
                counter: Optional[SendCounter] = None, adapter: Optional[BackendAdapter] = None,
                **settings: Any) -> BaseApiBackend:
    """A client of ``backend`` for ``base_url``; other settings from the backend's environment
    variables (``VLLM_*``, ``OPENAI_COMPAT_*``, ...) unless given here."""
    adapter = adapter or get_backend(backend)
    overrides: Dict[str, Any] = {"base_url": base_url, "timeout": timeout, **settings}
    if counter is not None:
        overrides["transport_factory"] = (
            lambda s: CountingTransport(default_transport(s), counter))  # noqa: E731
    cls = _client_class(backend)
    if cls is not None:
        return cls(adapter=adapter, **overrides)  # the registered adapter, not a new one
    factory = overrides.pop("transport_factory", None)
    settings_obj = ClientSettings.from_env(adapter.env_prefix, overrides)
    return BackendClient(settings_obj, adapter=adapter, transport_factory=factory)


def client_version() -> str:
    """The installed ``ipfs_accelerate_py`` version (recorded in every result file)."""
    try:
        return version("ipfs_accelerate_py")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
