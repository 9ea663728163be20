"""How bytes move: the one seam between the client and the network, declared here.

``AsyncTransport`` is that seam: ``send`` a request and get its complete reply, or
``open_stream`` and read its body as it comes (an ``AsyncStream``). The client sends every
request through its endpoint's ``AsyncTransport`` (complete requests, streams of both faces,
health probes, the load probe), on the client's own event loop or, for the async face's
streams, on the caller's; it knows nothing about what a request means. Everything above
(retry, breaker, parsing) is the same whatever moves the bytes, so tests and benchmarks
swap the transport without patching anything. Two implementations:

* ``_transports.aio.AioTransport``: aiohttp, the default (proxies and ``trust_env`` through
  aiohttp's own support);
* ``ThreadedTransport``: the adapter of a sync ``Transport`` that a caller gave through
  ``transport_factory`` (a test's scripted transport, a custom seam, ``RequestsTransport``):
  each call runs in a thread of the client's executor and is awaited on the loop. A
  ``transport_factory`` may also return an ``AsyncTransport`` itself (``MockTransport``).

``Transport`` is the sync face a caller's transport implements; ``RequestsTransport`` is one
(one pooled ``requests.Session``), public for those who want ``requests``' behaviour. Every
transport keeps the same rules (timeouts, streaming with an idle timeout, early close drops
the connection, exceptions mapped into ``errors``, reply bodies capped at
``max_response_bytes`` while reading, framing checked by ``_transports.framing``).

The cap applies to every complete reply and to the body of a streamed reply with an error
status (read whole by the caller); a 2xx stream is bounded per event by the SSE decoder
instead, since a long generation is a long stream.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import socket
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import (Any, AsyncIterator, Dict, Iterator, List, Mapping, Optional, Protocol, Tuple,
                    runtime_checkable)

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from . import errors
from ._transports.framing import NO_CAP, check_size, declared_length
from .errors import redact
from .settings import MAX_RESPONSE_BYTES
from .tracing import with_trace_context

__all__ = ["HttpRequest", "HttpResponse", "StreamResponse", "Transport", "RequestsTransport",
           "AsyncTransport", "AsyncStream", "dumps", "ThreadedTransport", "ThreadedStream",
           "as_async_transport"]

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


@runtime_checkable
class AsyncStream(Protocol):
    """An open streamed reply as the loop reads it: ``async for piece in chunks()``; an error
    reply's body with ``read_body()``; ``aclose()`` on the loop, ``close()`` from anywhere (a
    lease, a finalizer). Closing before the end drops the connection."""

    status: int
    headers: Mapping[str, str]
    closed: bool

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def read_body(self) -> bytes: ...

    async def aclose(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncTransport(Protocol):
    """The seam every request of the client goes through (see the module docstring).

    ``timeout``: (connect, read) seconds, the read timeout bounding every read (a stream's
    idle timeout). ``open_stream``'s ``headers``, when given, replace the request's own (the
    stream's, trace context included). Failures are the project's typed errors
    (``errors.TransientError`` kinds for the network). ``aclose`` releases what the running
    loop holds; ``close`` everything, from any thread."""

    async def send(self, request: HttpRequest, timeout: Tuple[float, float]) -> HttpResponse: ...

    async def open_stream(self, request: HttpRequest, timeout: Tuple[float, float],
                          headers: Optional[Dict[str, str]] = None) -> AsyncStream: ...

    async def aclose(self) -> None: ...

    def close(self) -> None: ...


def _map_exception(exc: Exception, url: str) -> errors.ApiError:
    """requests/urllib3 exceptions -> our tree; messages redacted."""
    text = redact(f"{type(exc).__name__}: {exc}")[:500]
    if isinstance(exc, errors.ApiError):
        return exc
    if (isinstance(exc, requests.exceptions.InvalidHeader) and exc.args
            and isinstance(exc.args[0], urllib3.exceptions.InvalidHeader)):
        # urllib3 refuses a reply whose Content-Length values differ (RFC 9112 section 6.3)
        return errors.ResponseError(f"reply from {url} has broken framing (RFC 9112 section "
                                    f"6.3); the connection was closed: {text}")
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
        return errors.ConnectionError(f"connection to {url} failed: {text}",
                                      refused="refused" in text.lower())
    if isinstance(exc, requests.exceptions.InvalidURL):
        return errors.ConfigurationError(text, field="base_url")
    return errors.ConnectionError(f"transport error talking to {url}: {text}")


class RequestsTransport(Transport):
    """One pooled ``requests.Session`` for one endpoint (base URL + key + TLS settings)."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, pool_size: int = 10,
                 verify: Any = True, trust_env: bool = False,
                 proxies: Optional[Dict[str, str]] = None,
                 extra_headers: Optional[Dict[str, str]] = None,
                 user_agent: str = "ipfs-accelerate-py",
                 max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        self.base_url = base_url.rstrip("/")
        self._max_body = max_response_bytes
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
        return self.base_url + request.path, body, with_trace_context(headers)

    def send(self, request: HttpRequest, timeout: Tuple[float, float]) -> HttpResponse:
        url, body, headers = self._prepare(request)
        try:
            # stream=True: the body is read here, counted against the cap as it arrives
            # (requests' own ``content`` would read any size, then copy it once more).
            resp = self._session.request(request.method, url, data=body, headers=headers,
                                         timeout=timeout, allow_redirects=False, stream=True)
        except Exception as exc:  # noqa: BLE001 - mapped into our tree
            failed: Optional[errors.ApiError] = _map_exception(exc, self.base_url)
        else:
            failed = None
        if failed is not None:
            # raised outside the handler, so it carries no context: the original's frames
            # hold the refused reply's socket (urllib3 refuses some replies before handing
            # them over) and would keep it open for as long as the caller keeps the error
            raise failed
        try:
            content = self._read_body(resp)
        except Exception as exc:  # noqa: BLE001
            # unread bytes are left on the socket: close it rather than pool it
            resp.close()
            raise _map_exception(exc, self.base_url) from None
        return HttpResponse(resp.status_code, resp.headers, content)  # type: ignore[arg-type]

    @staticmethod
    def _check_framing(resp: requests.Response, limit: int) -> bool:
        """Refuse a bad or over-``limit`` ``Content-Length`` before reading the body
        (urllib3 itself refuses two different values, but reads ``1_0`` as ten). True when
        ``Transfer-Encoding`` and ``Content-Length`` came together: the transfer coding wins
        (as in urllib3), but the connection must not be reused afterwards."""
        te = resp.headers.get("transfer-encoding")
        cl = resp.headers.get("content-length")
        if te is None:
            declared_length(cl, limit, resp.status_code)
            return False
        return cl is not None

    def _read_body(self, resp: requests.Response) -> bytes:
        suspect = self._check_framing(resp, self._max_body)
        conn = getattr(resp.raw, "connection", None) if suspect else None
        limit, seen = self._max_body, 0
        parts: List[bytes] = []
        for piece in resp.iter_content(65536):
            seen += len(piece)
            check_size(seen, limit, resp.status_code)
            parts.append(piece)
        if conn is not None:
            conn.close()  # back in the pool already: closed, so the pool reconnects
        return b"".join(parts)

    def open_stream(self, request: HttpRequest, timeout: Tuple[float, float]) -> StreamResponse:
        url, body, headers = self._prepare(request)
        headers["Accept"] = "text/event-stream"
        try:
            resp = self._session.request(request.method, url, data=body, headers=headers,
                                         timeout=timeout, stream=True, allow_redirects=False)
        except Exception as exc:  # noqa: BLE001
            failed: Optional[errors.ApiError] = _map_exception(exc, self.base_url)
        else:
            failed = None
        if failed is not None:
            raise failed  # outside the handler: see send()
        # An error reply is read whole by the caller: it gets the cap of a complete reply.
        # A 2xx stream is bounded per event by the SSE decoder, not in total.
        limit = self._max_body if resp.status_code >= 300 else NO_CAP
        try:
            suspect = self._check_framing(resp, limit)
        except errors.ApiError:
            resp.close()
            raise
        conn = getattr(resp.raw, "connection", None) if suspect else None
        base = self.base_url

        def chunks() -> Iterator[bytes]:
            # The read timeout applies to every socket read: it is the idle timeout.
            try:
                raw = resp.raw
                seen = 0
                while True:
                    data = raw.read1(65536) if hasattr(raw, "read1") else raw.read(65536)
                    if not data:
                        return
                    seen += len(data)
                    check_size(seen, limit, resp.status_code)
                    yield data
            except Exception as exc:  # noqa: BLE001
                closer()  # a failed or refused read leaves the connection unusable
                # Raw body reads raise urllib3's own exceptions (requests wraps only the
                # calls it makes itself): a read timeout here is the stream's idle timeout.
                if isinstance(exc, (urllib3.exceptions.TimeoutError, socket.timeout)):
                    raise errors.TimeoutError(
                        f"stream idle timeout: no data from {base} within the read timeout: "
                        f"{redact(f'{type(exc).__name__}: {exc}')[:500]}") from None
                raise _map_exception(exc, base) from None

        def closer() -> None:
            # Closing an unfinished body drops the socket instead of returning it to the
            # pool; the server sees the disconnect and aborts the generation.
            try:
                resp.raw.close()
                if conn is not None:
                    conn.close()  # suspect framing: never reused, even when read to the end
            finally:
                resp.close()
                # urllib3 2 closes a pool's idle sockets only when the pool is garbage
                # collected (Session.close() merely forgets it), and a response keeps its
                # pool alive: a closed stream the caller still holds must not keep this
                # endpoint's sockets open after the client is closed.
                if getattr(resp.raw, "_pool", None) is not None:
                    resp.raw._pool = None

        return StreamResponse(resp.status_code, resp.headers, chunks(), closer)  # type: ignore[arg-type]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._session.close()


class ThreadedTransport:
    """A sync ``Transport`` behind the ``AsyncTransport`` seam: each ``send`` and
    ``open_stream`` runs in a thread of ``executor`` and is awaited on the loop that asked,
    and so is each read of a stream (``ThreadedStream``). How a ``transport_factory`` the
    caller gave serves both faces, probes included. The task's context goes with the call,
    so the trace headers the transport adds are the task's request's."""

    __slots__ = ("transport", "_executor", "_closed", "_lock")

    def __init__(self, transport: Transport, executor: Any) -> None:
        self.transport = transport
        self._executor = executor
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ThreadedTransport({self.transport!r})"

    async def send(self, request: HttpRequest, timeout: Tuple[float, float]) -> HttpResponse:
        call = contextvars.copy_context().run
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, call, self.transport.send, request, timeout)

    async def open_stream(self, request: HttpRequest, timeout: Tuple[float, float],
                          headers: Optional[Dict[str, str]] = None) -> "ThreadedStream":
        """``headers`` (the stream's, trace context included) replace the request's."""
        if headers is not None and headers is not request.headers:
            request = dataclasses.replace(request, headers=headers)
        call = contextvars.copy_context().run
        response = await asyncio.get_running_loop().run_in_executor(
            self._executor, call, self.transport.open_stream, request, timeout)
        return ThreadedStream(response, self._executor)

    def close(self) -> None:
        """Close the sync transport, once (a caller's ``close`` need not be idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.transport.close()

    async def aclose(self) -> None:
        """``close`` in a thread: a sync transport's close may wait for its sockets."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)


def as_async_transport(transport: Any, executor: Any) -> AsyncTransport:
    """What a ``transport_factory`` made, behind the seam: an ``AsyncTransport`` (its
    ``send`` a coroutine function) as it is, a sync ``Transport`` adapted by
    ``ThreadedTransport`` on ``executor``."""
    if asyncio.iscoroutinefunction(getattr(transport, "send", None)):
        return transport  # type: ignore[no-any-return]
    return ThreadedTransport(transport, executor)


class ThreadedStream:
    """A sync ``StreamResponse`` read from a loop: each read runs in a thread of the executor
    (``async for piece in chunks()``). ``close`` may come from any thread while a read is
    under way (a reader cancelled on the loop, a consumer leaving): the sync transports'
    responses are not made for two threads at once, so a close that finds a read in flight
    is left to the read's thread, which closes the response as the read returns (within
    the read timeout); otherwise it closes at once."""

    __slots__ = ("_response", "_executor", "_pieces", "_lock", "_reading", "_inflight",
                 "closed", "status", "headers")

    def __init__(self, response: StreamResponse, executor: Any) -> None:
        self._response = response
        self._executor = executor
        self._pieces = iter(response.chunks())
        self._lock = threading.Lock()
        self._reading = False
        self._inflight: Optional["Future[Optional[bytes]]"] = None
        self.closed = False
        self.status = response.status
        self.headers = response.headers

    def _read(self) -> Optional[bytes]:
        try:
            return next(self._pieces, None)
        finally:
            with self._lock:
                self._reading = False
                late = self.closed
            if late:
                self._response.close()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; each read waits at most the transport's read timeout."""
        while True:
            with self._lock:
                if self.closed:
                    return
                self._reading = True
            self._inflight = read = self._executor.submit(self._read)
            try:
                piece = await asyncio.wrap_future(read)
            except asyncio.CancelledError:
                if read.cancelled():  # it never started: no thread will close for it
                    with self._lock:
                        self._reading = False
                raise
            if piece is None:
                return
            yield piece

    async def read_body(self) -> bytes:
        """The whole body of an error reply (the transport caps it), then closed."""
        parts = [piece async for piece in self.chunks()]
        self.close()
        return b"".join(parts)

    async def aclose(self) -> None:
        """``close``, and wait for a read still under way in its thread (a cancelled reader
        leaves one behind): once this returns the connection is closed."""
        read = self._inflight
        self.close()
        if read is not None and not read.done():
            await asyncio.wait({asyncio.wrap_future(read)})
        self._response.close()  # no read is under way now (idempotent)

    def close(self) -> None:
        """Drop the connection (unless read to its end; see the transport). Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            busy = self._reading
        if not busy:
            self._response.close()
