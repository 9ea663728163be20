"""How bytes move: the one seam between a backend and the network.

``Transport.send`` / ``Transport.open_stream`` take an ``HttpRequest`` and return bytes or
a byte stream; they know nothing about what a request means. Everything above (retry,
breaker, parsing) is the same whatever moves the bytes, so tests and benchmarks can swap
the transport without patching anything.

``RequestsTransport`` keeps one pooled ``requests.Session`` per endpoint, with connect and
read timeouts on every call. ``trust_env`` is off unless asked for: re-reading proxy
settings and ``~/.netrc`` on every request costs about 0.4 ms of CPU per call.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple

import requests
from requests.adapters import HTTPAdapter

from . import errors
from .errors import redact

__all__ = ["HttpRequest", "HttpResponse", "StreamResponse", "Transport", "RequestsTransport",
           "dumps"]

log = logging.getLogger(__name__)

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; NaN/inf are refused (JSON cannot carry them)."""
    return _ENCODER.encode(obj).encode("utf-8")


@dataclass
class HttpRequest:
    """What to send: method, path under the endpoint's base URL, JSON body, extra headers."""

    method: str
    path: str
    json: Optional[Any] = None
    headers: Dict[str, str] = field(default_factory=dict)
    stream: bool = False
    body: Optional[bytes] = None  # pre-encoded JSON, filled by ``encoded()``

    def encoded(self) -> Optional[bytes]:
        if self.body is None and self.json is not None:
            self.body = dumps(self.json)
        return self.body


@dataclass
class HttpResponse:
    """A complete reply."""

    status: int
    headers: Dict[str, str]
    body: bytes

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class StreamResponse:
    """An open streaming reply: iterate ``chunks()``, then ``close()`` (early close aborts)."""

    def __init__(self, status: int, headers: Dict[str, str], chunks: Iterator[bytes],
                 closer: Any) -> None:
        self.status = status
        self.headers = headers
        self._chunks = chunks
        self._closer = closer
        self.closed = False

    def chunks(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._closer()

    def __enter__(self) -> "StreamResponse":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Transport:
    """Moves an ``HttpRequest`` to one endpoint; raises only ``errors.TransientError`` kinds."""

    def send(self, request: HttpRequest, timeout: Tuple[float, float]) -> HttpResponse:
        raise NotImplementedError

    def open_stream(self, request: HttpRequest, timeout: Tuple[float, float]) -> StreamResponse:
        raise NotImplementedError

    def close(self) -> None:
        """Release pooled connections."""


def _map_exception(exc: Exception, url: str) -> errors.ApiError:
    """requests/urllib3 exceptions -> our tree; messages redacted."""
    text = redact(f"{type(exc).__name__}: {exc}")[:500]
    if isinstance(exc, (requests.exceptions.ConnectTimeout,)):
        return errors.TimeoutError(f"connect timeout to {url}: {text}")
    if isinstance(exc, (requests.exceptions.ReadTimeout,)):
        return errors.TimeoutError(f"read timeout from {url}: {text}")
    if isinstance(exc, requests.exceptions.Timeout):
        return errors.TimeoutError(f"timeout talking to {url}: {text}")
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                        requests.exceptions.ContentDecodingError, ConnectionResetError,
                        BrokenPipeError)):
        # urllib3 wraps a read timeout inside a ConnectionError while streaming
        if "Read timed out" in text:
            return errors.TimeoutError(f"read timeout from {url}: {text}")
        return errors.ConnectionError(f"connection to {url} failed: {text}")
    if isinstance(exc, requests.exceptions.InvalidURL):
        return errors.ConfigurationError(text, field="base_url")
    return errors.ConnectionError(f"transport error talking to {url}: {text}")


class RequestsTransport(Transport):
    """One pooled ``requests.Session`` for one endpoint (base URL + key + TLS settings)."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, pool_size: int = 10,
                 verify: Any = True, trust_env: bool = False,
                 proxies: Optional[Dict[str, str]] = None,
                 extra_headers: Optional[Dict[str, str]] = None,
                 user_agent: str = "ipfs-accelerate-py") -> None:
        self.base_url = base_url.rstrip("/")
        self._session = requests.Session()
        self._session.trust_env = trust_env
        self._session.verify = verify
        if proxies:
            self._session.proxies.update(proxies)
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(1, pool_size), max_retries=0,
                              pool_block=False)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        # Headers are built once; requests merges them per call.
        self._session.headers.clear()
        self._session.headers.update({"User-Agent": user_agent, "Accept": "application/json",
                                      "Accept-Encoding": "identity"})
        self._session.headers.update(extra_headers or {})
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"
        self._json_headers = {"Content-Type": "application/json"}
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"RequestsTransport({self.base_url!r})"

    def _prepare(self, request: HttpRequest) -> Tuple[str, Optional[bytes], Dict[str, str]]:
        body = request.encoded()
        headers = dict(self._json_headers) if body is not None else {}
        if request.headers:
            headers.update(request.headers)
        return self.base_url + request.path, body, headers

    def send(self, request: HttpRequest, timeout: Tuple[float, float]) -> HttpResponse:
        url, body, headers = self._prepare(request)
        try:
            resp = self._session.request(request.method, url, data=body, headers=headers,
                                         timeout=timeout, allow_redirects=False)
            content = resp.content
        except Exception as exc:  # noqa: BLE001 - mapped into our tree
            raise _map_exception(exc, self.base_url) from None
        return HttpResponse(resp.status_code, resp.headers, content)  # type: ignore[arg-type]

    def open_stream(self, request: HttpRequest, timeout: Tuple[float, float]) -> StreamResponse:
        url, body, headers = self._prepare(request)
        headers["Accept"] = "text/event-stream"
        try:
            resp = self._session.request(request.method, url, data=body, headers=headers,
                                         timeout=timeout, stream=True, allow_redirects=False)
        except Exception as exc:  # noqa: BLE001
            raise _map_exception(exc, self.base_url) from None

        base = self.base_url

        def chunks() -> Iterator[bytes]:
            # The read timeout applies to every socket read: it is the idle timeout.
            try:
                raw = resp.raw
                while True:
                    data = raw.read1(65536) if hasattr(raw, "read1") else raw.read(65536)
                    if not data:
                        return
                    yield data
            except Exception as exc:  # noqa: BLE001
                raise _map_exception(exc, base) from None

        def closer() -> None:
            # Closing an unfinished body drops the socket instead of returning it to the
            # pool; the server sees the disconnect and aborts the generation.
            try:
                resp.raw.close()
            finally:
                resp.close()

        return StreamResponse(resp.status_code, resp.headers, chunks(), closer)  # type: ignore[arg-type]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._session.close()
