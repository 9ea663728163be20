"""The transport: aiohttp behind the ``transport.AsyncTransport`` seam, one session per loop.

Every request the client sends goes through an ``AsyncTransport``: this one by default, or
a caller's ``transport_factory`` transport adapted by ``transport.ThreadedTransport``.
Complete requests, sync streams, health probes and the load probe run on the client's own
loop (``_core/loop.py``), the async face's streams on their caller's loop; every stream is a
coroutine, so a service relaying thousands of streams needs no thread per stream.

Why one ``aiohttp.ClientSession`` per (endpoint, event loop): a session and its connections
belong to the loop that made them and cannot be used from another, while one client may be
used from several loops (threads each running their own, ``asyncio.run`` called twice). The
session is made on first use in a loop and forgotten once that loop is closed.

The rules every transport of the project keeps:

* timeouts from the endpoint's settings: ``connect`` (including the TLS handshake) and a
  read timeout that bounds every socket read, so for a stream it is the idle timeout;
* TLS trust as ``requests`` reads ``verify`` (certifi's bundle, off, or a CA bundle file
  or directory; ``_tls.tls_context``);
* proxies by aiohttp's own support: the ``proxies`` setting (a ``requests``-style mapping,
  ``{"http": url, "https": url}``, its ``no_proxy`` entry honoured) is each request's
  ``proxy=``; ``trust_env`` is the session's (``HTTP_PROXY`` / ``HTTPS_PROXY`` /
  ``NO_PROXY`` and ``~/.netrc``, read by aiohttp per request); an explicit proxy wins over
  the environment's, as in aiohttp. Credentials in a proxy URL go as its
  ``Proxy-Authorization`` header, never in a repr or a message;
* the reply of an error status is read whole, capped at ``max_response_bytes`` (a declared
  ``Content-Length`` over the cap is refused before reading, an undeclared body as it
  arrives: ``framing``); a 2xx stream is bounded per event by the SSE decoder above;
* aiohttp's own parser (llhttp) refuses the framing errors ``framing`` names (two
  different lengths, a signed or non-digit length) and, as RFC 9112 section 6.3 allows,
  two identical lengths and a reply with both framings: each becomes a ``ResponseError``,
  the connection closed;
* every failure is one of the project's typed errors, its message redacted;
* closing a stream before its end closes its connection (vLLM then aborts the generation);
  only a reply read to its end returns its connection to the keep-alive pool.

Connections: aiohttp's pool keeps released ones alive for ``KEEPALIVE`` seconds; the number
open at once is not capped here: the endpoint's in-flight limit bounds the requests sent.
"""

from __future__ import annotations

import asyncio
import functools
import base64
import sys
import threading
from typing import Any, AsyncIterator, Dict, Mapping, Optional, Tuple
from urllib.parse import unquote, urlsplit
from urllib.request import proxy_bypass_environment

import aiohttp

from .. import errors
from .framing import NO_CAP, check_size, declared_length
from .headers import Headers, check_header
from .tls import tls_context
from ..errors import redact, register_secret
from ..settings import MAX_RESPONSE_BYTES, ClientSettings
from ..tracing import with_trace_context
from ..transport import HttpRequest, HttpResponse

__all__ = ["AioTransport", "AioStreamResponse", "KEEPALIVE"]

#: Seconds an idle pooled connection is kept: below uvicorn's (vLLM's) 5 s keep-alive, so a
#: connection the server is about to close is not picked for the next request.
KEEPALIVE = 4.0
_READ = 65536
#: How long ``close()`` from another thread waits for a loop to close its session.
_CLOSE_WAIT = 2.0


def _map(exc: BaseException, base_url: str, what: str) -> errors.ApiError:
    """An aiohttp / asyncio / OS failure -> the project's typed error (message redacted)."""
    if isinstance(exc, errors.ApiError):
        return exc
    text = redact(f"{type(exc).__name__}: {exc}")[:500]
    if isinstance(exc, getattr(aiohttp, "ConnectionTimeoutError", ())):
        return errors.TimeoutError(f"connect timeout to {base_url}: {text}")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return errors.TimeoutError(f"{what} timeout from {base_url}: {text}")
    if isinstance(exc, aiohttp.InvalidURL):
        return errors.ConfigurationError(text, field="base_url")
    if isinstance(exc, getattr(aiohttp, "ClientHttpProxyError", ())):
        # the proxy refused to open a tunnel (it answered CONNECT with an error status)
        return errors.ConnectionError(f"the proxy refused the connection to {base_url}: {text}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        refused = isinstance(exc.os_error, ConnectionRefusedError)
        return errors.ConnectionError(f"connection to {base_url} failed: {text}", refused=refused)
    if isinstance(exc, aiohttp.ClientResponseError):
        # raised by aiohttp's parser, not a status (raise_for_status is off): bad framing
        what = " (an invalid Content-Length)" if "Content-Length" in str(exc) else ""
        return errors.ResponseError(f"reply from {base_url} has broken framing{what} (RFC 9112 "
                                    f"section 6.3); the connection was closed: {text}")
    return errors.ConnectionError(f"connection to {base_url} failed: {text}")


class AioStreamResponse:
    """An open streamed reply (a ``transport.AsyncStream``): ``async for piece in chunks()``,
    then ``close()``.

    ``close`` is synchronous (aiohttp closes a connection without awaiting), so the
    stream's lease and its garbage-collection finalizer can call it from anywhere."""

    def __init__(self, resp: aiohttp.ClientResponse, base_url: str, limit: int) -> None:
        self._resp = resp
        self._base = base_url
        self._limit = limit
        self.status = resp.status
        self.headers = Headers((k.lower(), v) for k, v in resp.headers.items())
        self.closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; each read waits at most the read (idle) timeout."""
        seen = 0
        try:
            while True:
                piece = await self._resp.content.readany()
                if not piece:
                    return
                seen += len(piece)
                check_size(seen, self._limit, self.status)
                yield piece
        except (Exception, asyncio.CancelledError) as exc:
            failed = self._read_failed(exc)
            if failed is exc:
                raise
            raise failed from None

    def _read_failed(self, exc: BaseException) -> BaseException:
        """What a failed read raises (a cancellation as it is), the connection closed: a
        failed, refused or cancelled read leaves it unusable."""
        self.close()
        if isinstance(exc, asyncio.CancelledError):
            return exc
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return errors.TimeoutError(
                f"stream idle timeout: no data from {self._base} within the read timeout: "
                f"{redact(f'{type(exc).__name__}: {exc}')[:500]}")
        return _map(exc, self._base, "read")

    async def read_body(self) -> bytes:
        """The whole body (capped), then the connection is released. A declared length,
        already held to the cap as the reply opened, is read in one call (a complete
        reply's common case: no per-piece loop); a body without one, piece by piece
        against the cap."""
        if self._resp.content_length is None:
            parts = [piece async for piece in self.chunks()]
            self.close()
            return b"".join(parts)
        try:
            body = await self._resp.read()
        except (Exception, asyncio.CancelledError) as exc:
            failed = self._read_failed(exc)
            if failed is exc:
                raise
            raise failed from None
        self.close()
        return body

    async def aclose(self) -> None:
        """``close`` for a reader on the loop (the same face as ``ThreadedStream``'s)."""
        self.close()

    def close(self) -> None:
        """Drop the connection unless the reply was read to its end (then aiohttp has
        already returned it to the pool). Idempotent."""
        if not self.closed:
            self.closed = True
            self._resp.close()


def pick_proxy(base_url: str, proxies: Optional[Mapping[str, str]]
               ) -> Tuple[Optional[str], Optional[str]]:
    """The proxy of a ``requests``-style ``proxies`` mapping for ``base_url``: the first of
    its ``scheme://host``, ``scheme``, ``all://host`` and ``all`` entries (as ``requests``
    picks), none when its ``no_proxy`` entry names the host. Returns (the proxy's URL without
    credentials, the ``Proxy-Authorization`` value its credentials make, or None), so the
    URL can be shown and the secret goes only where it is due."""
    if not proxies:
        return None, None
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    no_proxy = proxies.get("no_proxy")
    if no_proxy and proxy_bypass_environment(host, {"no": no_proxy}):
        return None, None
    for key in (f"{parts.scheme}://{host}", parts.scheme, f"all://{host}", "all"):
        url = proxies.get(key)
        if url:
            break
    else:
        return None, None
    proxy = urlsplit(url if "://" in url else f"http://{url}")
    auth = None
    if proxy.username:
        pair = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}".encode("utf-8")
        auth = "Basic " + base64.b64encode(pair).decode("ascii")
    netloc = proxy.netloc.rpartition("@")[2]
    return proxy._replace(netloc=netloc).geturl(), auth


class AioTransport:
    """Requests and streams to one endpoint from any event loop (see the module docstring);
    implements ``transport.AsyncTransport``."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, verify: Any = True,
                 extra_headers: Optional[Dict[str, str]] = None,
                 user_agent: str = "ipfs-accelerate-py",
                 max_response_bytes: int = MAX_RESPONSE_BYTES, trust_env: bool = False,
                 proxies: Optional[Mapping[str, str]] = None) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise errors.ConfigurationError(f"not an http(s) URL: {self.base_url!r}",
                                            field="base_url")
        self._ssl = tls_context(verify) if self.base_url.startswith("https://") else None
        headers = {"User-Agent": user_agent, "Accept": "text/event-stream",
                   "Accept-Encoding": "identity", **(extra_headers or {})}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._trust_env = bool(trust_env)
        self._proxy, proxy_auth = pick_proxy(self.base_url, proxies)
        #: Proxy-Authorization for a tunnel (an https origin: the CONNECT request carries
        #: it); a plain-http request goes to the proxy whole and carries it itself (aiohttp
        #: sends ``proxy_headers`` only with CONNECT, and deprecates ``proxy_auth``)
        self._proxy_headers: Optional[Dict[str, str]] = None
        if proxy_auth is not None:
            register_secret(proxy_auth)  # redacted from any message that might quote it
            if self.base_url.startswith("https://"):
                self._proxy_headers = {"Proxy-Authorization": proxy_auth}
            else:
                headers["Proxy-Authorization"] = proxy_auth
        for k, v in headers.items():
            check_header(k, v)
        self._headers = headers
        self._max_body = max_response_bytes
        self._lock = threading.Lock()
        self._sessions: Dict[asyncio.AbstractEventLoop,
                             Tuple[aiohttp.ClientSession, "asyncio.Task[None]"]] = {}
        self._closed = False

    @classmethod
    def from_settings(cls, settings: ClientSettings) -> "AioTransport":
        """The endpoint's transport as its settings describe it (key, TLS, proxies, caps)."""
        return cls(settings.base_url, settings.api_key_value,
                   verify=settings.ca_bundle or settings.verify_tls,
                   extra_headers=settings.extra_headers,
                   max_response_bytes=settings.max_response_bytes,
                   trust_env=settings.trust_env, proxies=settings.proxies)

    def __repr__(self) -> str:
        return f"AioTransport({self.base_url!r})"

    # -- sessions ------------------------------------------------------------------------
    def _session(self) -> aiohttp.ClientSession:
        """This loop's session, made on first use. With it a keeper task that closes it when
        the task is cancelled: ``asyncio.run`` cancels what is left when its main coroutine
        ends, so a session closes with the loop it belongs to (there is no loop-close hook).
        Read without the lock (one loop, one thread); the lock guards the map's changes."""
        loop = asyncio.get_running_loop()
        entry = self._sessions.get(loop)
        if entry is not None and not entry[0].closed:
            return entry[0]
        if self._closed:
            raise errors.ClientClosedError("transport is closed")
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE,
                                           ssl=self._ssl if self._ssl is not None else True),
            auto_decompress=False, trust_env=self._trust_env,
            cookie_jar=aiohttp.DummyCookieJar(), raise_for_status=False)
        if hasattr(session, "_retry_connection"):
            # aiohttp (3.10 on) sends an idempotent request (a GET: health and load probes,
            # /v1/models) a second time when its connection drops; the client's retry loop
            # owns retries and counts them, and a probe must be one request. No public
            # switch: aiohttp's own test client clears the same attribute.
            session._retry_connection = False
        keeper = loop.create_task(_close_when_cancelled(session), name=f"{self!r} session")
        with self._lock:
            for old in [lp for lp in self._sessions if lp.is_closed()]:
                del self._sessions[old]  # a finished loop: its session went with it
            self._sessions[loop] = (session, keeper)
        return session

    async def open_stream(self, request: HttpRequest, timeout: Tuple[float, float],
                          headers: Optional[Dict[str, str]] = None) -> AioStreamResponse:
        """Send ``request`` and return once the reply head is in. ``timeout``: (connect,
        read) seconds; ``headers``: the request's own (default: its headers with the trace
        context of the task that sends it)."""
        return await self._open(request, timeout, headers, None)

    async def send(self, request: HttpRequest, timeout: Tuple[float, float],
                   headers: Optional[Dict[str, str]] = None) -> HttpResponse:
        """A complete reply, read whole and capped at ``max_response_bytes`` while reading,
        whatever its status (a declared length over the cap is refused before reading).
        Read to its end, its connection goes back to the pool."""
        response = await self._open(request, timeout, headers, "application/json")
        return HttpResponse(response.status, response.headers, await response.read_body())

    async def _open(self, request: HttpRequest, timeout: Tuple[float, float],
                    headers: Optional[Dict[str, str]], accept: Optional[str]) -> AioStreamResponse:
        """Send, and return the reply once its head is in. ``accept``: the Accept header of
        a complete reply (its body is capped whatever the status); None for a stream."""
        if headers is None:  # trace context only once OpenTelemetry is loaded at all
            headers = (with_trace_context(request.headers) if "opentelemetry" in sys.modules
                       else request.headers)
        for k, v in headers.items():
            check_header(k, v)
        # the transport's own headers go with each request, not as the session's defaults:
        # aiohttp merges a session's defaults into the headers it sends a proxy, and would
        # turn an Authorization header (the API key) into the proxy's Proxy-Authorization
        sent = ({**self._headers, "Accept": accept, **headers} if accept is not None
                else {**self._headers, **headers})
        body = request.encoded()
        if body is not None:
            sent["Content-Type"] = "application/json"
        limits = _client_timeout(timeout)
        try:
            resp = await self._session().request(
                request.method, self.base_url + request.path, data=body, headers=sent,
                timeout=limits, allow_redirects=False, proxy=self._proxy,
                proxy_headers=self._proxy_headers)
        except Exception as exc:  # noqa: BLE001 - mapped into our tree
            failed: Optional[errors.ApiError] = _map(exc, self.base_url, "read")
        else:
            failed = None
        if failed is not None:
            raise failed  # outside the handler: the original's frames hold the connection
        # An error reply (or any complete one) is read whole: it gets the cap of a complete
        # reply; a 2xx stream is bounded per event by the SSE decoder instead.
        limit = self._max_body if accept is not None or resp.status >= 300 else NO_CAP
        lengths = resp.headers.getall("Content-Length", [])
        try:
            declared_length(", ".join(lengths) if lengths else None, limit, resp.status)
        except errors.ApiError:
            resp.close()
            raise
        return AioStreamResponse(resp, self.base_url, limit)

    # -- closing -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the sessions of loops that are not closed: from the loop's own thread
        scheduled on it, from another thread waited for (briefly), on a stopped loop run
        there. A closed loop's session went with it (its keeper was cancelled)."""
        self._closed = True
        with self._lock:
            entries, self._sessions = list(self._sessions.items()), {}
        try:
            current: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, (session, keeper) in entries:
            if loop.is_closed() or keeper.done():
                continue
            if loop is current:
                keeper.cancel()  # it closes the session on this loop once we yield
                continue
            try:
                if loop.is_running():
                    asyncio.run_coroutine_threadsafe(_cancel(keeper), loop).result(_CLOSE_WAIT)
                else:
                    loop.run_until_complete(_cancel(keeper))
            except Exception:  # noqa: BLE001 - it stopped or started meanwhile, or is stuck
                pass

    async def aclose(self) -> None:
        """Close the running loop's session, awaited, and take no new requests. The sessions
        of other loops are left to ``close()``, which may wait for those loops: the client's
        ``aclose`` runs it off this loop."""
        self._closed = True
        with self._lock:
            mine = self._sessions.pop(asyncio.get_running_loop(), None)
        if mine is not None:
            await _cancel(mine[1])


@functools.lru_cache(maxsize=64)
def _client_timeout(timeout: Tuple[float, float]) -> aiohttp.ClientTimeout:
    """aiohttp's timeouts for (connect, read) seconds: an immutable value, made once per pair
    (a call's read timeout is clipped to its deadline, so pairs vary; the cache is small)."""
    return aiohttp.ClientTimeout(total=None, connect=timeout[0], sock_connect=timeout[0],
                                 sock_read=timeout[1])


async def _close_when_cancelled(session: aiohttp.ClientSession) -> None:
    try:
        await asyncio.get_running_loop().create_future()  # until cancelled
    finally:
        await session.close()


async def _cancel(keeper: "asyncio.Task[None]") -> None:
    """Cancel a session's keeper and wait until it has closed the session."""
    keeper.cancel()
    await asyncio.wait({keeper})
