"""One transport seam (``transport.AsyncTransport``): what goes through it, and how.

* Proxies through aiohttp's own support: a forward proxy started here on loopback
  (``ForwardProxy``: records each request line, relays to the test double) sees the complete
  requests, the streams and the health probe of both faces, whether the proxy comes from the
  ``proxies`` setting or, with ``trust_env=True``, from ``HTTP_PROXY`` (and ``NO_PROXY``
  keeps a host off it).
* A caller's ``transport_factory`` transport carries the probes too: ``health()``, the
  circuit prober's health check and the routing load probe.
* The seam is declared: aiohttp's transport, the adapter of a sync transport and
  ``MockTransport`` all satisfy the protocol; ``MockTransport`` serves both faces with no
  server.
* The hand-written HTTP/1.1 client (``_http11``) is gone: not importable, imported nowhere.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import importlib.util
import json
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Set
from urllib.parse import urlsplit

import pytest

from support import FAST, wait_until
from ipfs_accelerate_py.api_backends import AsyncTransport, MockTransport, errors
from ipfs_accelerate_py.api_backends._transports.aio import AioTransport, pick_proxy
from ipfs_accelerate_py.api_backends.base import default_transport
from ipfs_accelerate_py.api_backends.transport import (HttpRequest, HttpResponse,
                                                        RequestsTransport, ThreadedTransport,
                                                        Transport)
from ipfs_accelerate_py.api_backends.vllm import VllmClient, vllm_load_probe

P = {"max_tokens": 5, "temperature": 0}
COMPLETIONS = "/v1/completions"


# ------------------------------------------------------------------ a forward proxy
class ForwardProxy:
    """A minimal HTTP forward proxy on 127.0.0.1, on an event loop in a thread of its own.

    Each connection carries one request: its request line (absolute-form, as a client
    sends it to a proxy) is recorded in ``lines``, it goes to the origin with
    ``Connection: close``, and the reply is relayed as it comes (streams included) until
    the origin closes. CONNECT (tunnels) is refused: the tests use plain http."""

    def __init__(self) -> None:
        self.lines: List[str] = []
        self.proxy_auth: List[str] = []  # the Proxy-Authorization values it was sent
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._tasks: Set["asyncio.Task[None]"] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="forward-proxy",
                                        daemon=True)
        self._server: Optional[asyncio.AbstractServer] = None
        self.port = 0

    def start(self) -> "ForwardProxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def seen(self, path: str) -> List[str]:
        """The recorded request lines whose target ends in ``path``."""
        with self._lock:
            return [line for line in self.lines if line.split(" ")[1].endswith(path)]

    def stop(self) -> None:
        async def shut() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks))
        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = self._loop.create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: Optional[asyncio.StreamWriter] = None
        try:
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            first, *fields = head.split("\r\n")
            method, target, version = first.split(" ", 2)
            with self._lock:
                self.lines.append(first)
                self.proxy_auth += [f.split(":", 1)[1].strip() for f in fields
                                    if f.lower().startswith("proxy-authorization:")]
            url = urlsplit(target)
            if method == "CONNECT" or url.scheme != "http" or not url.hostname:
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                return
            try:
                up_reader, upstream = await asyncio.open_connection(url.hostname, url.port or 80)
            except OSError:
                return  # the origin is down: the client sees its connection dropped
            kept = [f for f in fields if f and f.split(":", 1)[0].strip().lower() not in
                    ("connection", "proxy-connection", "keep-alive", "proxy-authorization")]
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            upstream.write(f"{method} {path} {version}\r\n{''.join(f + chr(13) + chr(10) for f in kept)}"
                           f"Connection: close\r\n\r\n".encode("latin-1"))
            sending = self._loop.create_task(_pipe(reader, upstream))
            try:
                await _pipe(up_reader, writer)  # until the origin closes (Connection: close)
            finally:
                sending.cancel()
                await asyncio.wait({sending})
        finally:
            for w in (upstream, writer):
                if w is not None:
                    w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        return


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    p = ForwardProxy().start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variable from the machine running the tests."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                 "https_proxy", "all_proxy", "no_proxy", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def both_faces(client: VllmClient) -> List[str]:
    """A complete request and a stream on each face, then a health check and the circuit
    prober's probe: the texts."""
    async def async_face() -> List[str]:
        text = await client.agenerate_text("async complete", **P)
        streamed = "".join([t async for t in client.astream_generation("async stream", **P)])
        return [text, streamed]

    texts = [client.generate_text("sync complete", **P),
             "".join(client.stream_generation("sync stream", **P))]
    texts += asyncio.run(asyncio.wait_for(async_face(), 60))
    assert client.health() is True
    assert client._endpoint(None).circuit.check_health(client.adapter.health_request())
    return texts


def assert_went_through(proxy: ForwardProxy, fake: Any, texts: List[str]) -> None:
    assert all(texts), texts
    origin = f"http://127.0.0.1:{fake.port}"
    # four calls, each its own request line through the proxy, in absolute-form
    assert len(proxy.seen(COMPLETIONS)) == 4 == fake.request_count[COMPLETIONS]
    assert all(line.startswith(f"POST {origin}{COMPLETIONS} HTTP/1.1")
               for line in proxy.seen(COMPLETIONS))
    assert proxy.seen("/health") == [f"GET {origin}/health HTTP/1.1"] * 2


# ------------------------------------------------------------------ proxies
def test_the_proxies_setting_carries_both_faces_through_aiohttp(fake_server, proxy,
                                                                  no_proxy_env) -> None:
    with VllmClient(base_url=fake_server.base_url, proxies={"http": proxy.url}, **FAST) as c:
        assert isinstance(c._endpoint(None).transport, AioTransport)
        texts = both_faces(c)
    assert_went_through(proxy, fake_server, texts)
    with VllmClient(base_url=fake_server.base_url, **FAST) as direct:  # the same texts
        assert texts[0] == direct.generate_text("sync complete", **P)
        assert texts[3] == "".join(direct.stream_generation("async stream", **P))
    assert len(proxy.seen(COMPLETIONS)) == 4  # and those went direct


def test_a_proxys_credentials_go_as_proxy_authorization_and_nowhere_else(fake_server, proxy,
                                                                        no_proxy_env) -> None:
    secret = "pr0xy-s3cret"
    with VllmClient(base_url=fake_server.base_url, **FAST,
                    proxies={"http": f"http://alice:{secret}@127.0.0.1:{proxy.port}"}) as c:
        assert c.generate_text("authenticated", **P)
        assert secret not in repr(c._endpoint(None).transport)
    assert proxy.proxy_auth == ["Basic " + base64.b64encode(f"alice:{secret}".encode()).decode()]
    # the origin never sees the proxy's credentials
    assert all("proxy-authorization" not in {k.lower() for k in r.headers} for r in fake_server.requests)


def test_trust_env_takes_http_proxy_from_the_environment(fake_server, proxy,
                                                          no_proxy_env) -> None:
    no_proxy_env.setenv("HTTP_PROXY", proxy.url)
    with VllmClient(base_url=fake_server.base_url, trust_env=True, **FAST) as c:
        texts = both_faces(c)
    assert_went_through(proxy, fake_server, texts)


def test_without_trust_env_or_with_no_proxy_the_requests_go_direct(fake_server, proxy,
                                                                   no_proxy_env) -> None:
    no_proxy_env.setenv("HTTP_PROXY", proxy.url)
    with VllmClient(base_url=fake_server.base_url, **FAST) as c:  # trust_env off: ignored
        assert c.generate_text("direct", **P)
    no_proxy_env.setenv("NO_PROXY", "127.0.0.1")
    with VllmClient(base_url=fake_server.base_url, trust_env=True, **FAST) as c:
        assert c.generate_text("bypassed", **P)
    with VllmClient(base_url=fake_server.base_url,  # the setting's own no_proxy entry
                    proxies={"http": proxy.url, "no_proxy": "127.0.0.1"}, **FAST) as c:
        assert c.generate_text("bypassed too", **P)
    assert proxy.lines == [] and fake_server.request_count[COMPLETIONS] == 3


def test_a_probe_whose_connection_drops_is_sent_once(proxy, free_port, no_proxy_env) -> None:
    """aiohttp would send a GET again on a dropped connection; a probe is one request (the
    client's retry loop owns retries): the proxy, whose origin is down, sees each once."""
    with VllmClient(base_url=f"http://127.0.0.1:{free_port}", proxies={"http": proxy.url},
                    **FAST) as c:
        assert c.health() is False
        assert c._endpoint(None).circuit.check_health(c.adapter.health_request()) is False
    assert len(proxy.seen("/health")) == 2


def test_pick_proxy_reads_a_requests_style_mapping() -> None:
    base = "http://10.0.0.5:8000"
    assert pick_proxy(base, None) == (None, None)
    assert pick_proxy(base, {"https": "http://p:1"}) == (None, None)
    assert pick_proxy(base, {"http": "http://p:1", "all": "http://q:2"})[0] == "http://p:1"
    assert pick_proxy(base, {"all": "http://q:2"})[0] == "http://q:2"
    assert pick_proxy(base, {"http://10.0.0.5": "http://h:3", "http": "http://p:1"})[0] == "http://h:3"
    url, auth = pick_proxy(base, {"http": "http://user:s%40cret@p:1"})
    assert url == "http://p:1"  # credentials apart, never in the URL
    assert auth == "Basic " + base64.b64encode(b"user:s@cret").decode()
    assert pick_proxy(base, {"http": "http://p:1", "no_proxy": "10.0.0.5"}) == (None, None)


# ------------------------------------------------------------------ a caller's transport
class RecordingTransport(Transport):
    """A real sync transport that records the path of every request it sends."""

    def __init__(self, inner: Transport, sent: List[str]) -> None:
        self.inner = inner
        self.sent = sent

    def send(self, request: HttpRequest, timeout: Any) -> HttpResponse:
        self.sent.append(request.path)
        return self.inner.send(request, timeout)

    def open_stream(self, request: HttpRequest, timeout: Any) -> Any:
        self.sent.append(request.path)
        return self.inner.open_stream(request, timeout)

    def close(self) -> None:
        self.inner.close()


def test_probes_go_through_a_users_transport_factory(fake_server) -> None:
    sent: List[str] = []
    with VllmClient(base_url=fake_server.base_url, **FAST,
                    transport_factory=lambda s: RecordingTransport(default_transport(s), sent)) as c:
        ep = c._endpoint(None)
        assert isinstance(ep.transport, ThreadedTransport)
        assert c.health() is True and sent == ["/health"]
        # the circuit prober's health check (its own thread; the verdict keeps it CLOSED)
        assert ep.circuit.prober is not None
        ep.circuit.prober.verify()
        wait_until(lambda: sent.count("/health") == 2, what="the prober's health check")
        wait_until(lambda: not ep.circuit.prober.running, what="the prober's thread to end")
        assert c.circuit_state == "CLOSED"
        # the routing load probe: /metrics through the same transport
        assert vllm_load_probe()(ep) == 0.0 and sent[-1] == "/metrics"
        assert c.generate_text("and requests", **P) and sent[-1] == COMPLETIONS
    assert fake_server.request_count["/health"] == 2


def test_a_health_probe_of_an_unreachable_server_is_a_failed_probe(free_port) -> None:
    with VllmClient(base_url=f"http://127.0.0.1:{free_port}", **FAST) as c:
        ep = c._endpoint(None)
        assert ep.circuit.check_health(c.adapter.health_request()) is False
        assert c.health() is False
        assert vllm_load_probe()(ep) is None


# ------------------------------------------------------------------ the declared seam
def _completion(request: HttpRequest) -> HttpResponse:
    body = request.json or {}
    text = f"echo: {body.get('prompt')}"
    if body.get("stream"):
        events = [{"id": "m", "object": "text_completion", "created": 1, "model": body["model"],
                   "choices": [{"index": 0, "text": piece, "finish_reason": None}]}
                  for piece in text.split(" ")]
        events[-1]["choices"][0]["finish_reason"] = "length"
        sse = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        return HttpResponse(200, {"Content-Type": "text/event-stream"}, sse + b"data: [DONE]\n\n")
    reply = {"id": "m", "object": "text_completion", "created": 1, "model": body.get("model"),
             "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    return HttpResponse(200, {"Content-Type": "application/json"}, json.dumps(reply).encode())


def test_mock_transport_serves_both_faces_without_a_server(free_port) -> None:
    mock = MockTransport(_completion)
    with VllmClient(base_url=f"http://127.0.0.1:{free_port}", model="m", max_retries=0,
                    batch_enabled=False, transport_factory=lambda s: mock) as c:
        assert c._endpoint(None).transport is mock  # an AsyncTransport is used as it is
        assert c.generate_text("hi", max_tokens=3) == "echo: hi"
        assert "".join(c.stream_generation("there", max_tokens=3)) == "echo:there"

        async def async_face() -> List[str]:
            return [await c.agenerate_text("a", max_tokens=3),
                    "".join([t async for t in c.astream_generation("b", max_tokens=3)])]
        assert asyncio.run(async_face()) == ["echo: a", "echo:b"]
    assert [r.path for r in mock.requests] == [COMPLETIONS] * 4 and mock.closed


def test_every_transport_satisfies_the_declared_protocol(fake_server) -> None:
    assert isinstance(AioTransport(fake_server.base_url), AsyncTransport)
    sync = RequestsTransport(fake_server.base_url)
    try:
        assert not isinstance(sync, AsyncTransport)  # a sync transport is adapted, not taken
        assert isinstance(ThreadedTransport(sync, None), AsyncTransport)
    finally:
        sync.close()
    assert isinstance(MockTransport(_completion), AsyncTransport)


# ------------------------------------------------------------------ _http11 is gone
def test_the_hand_written_http11_client_is_gone() -> None:
    assert importlib.util.find_spec("ipfs_accelerate_py.api_backends._http11") is None
    root = Path(__file__).resolve().parents[2] / "ipfs_accelerate_py"
    importers = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_http11"):
                importers.append(str(path))
            elif isinstance(node, ast.Import) and any(a.name.endswith("_http11") for a in node.names):
                importers.append(str(path))
    assert importers == []


def test_the_api_key_never_goes_to_a_proxy_as_its_credentials(fake_server, proxy,
                                                              no_proxy_env) -> None:
    """aiohttp builds the headers it sends a proxy from the session's defaults and turns an
    Authorization among them into Proxy-Authorization: the key must not be one of them."""
    key = "sk-stays-with-the-server"
    with VllmClient(base_url=fake_server.base_url, api_key=key, **FAST,
                    proxies={"http": f"http://alice:pw@127.0.0.1:{proxy.port}"}) as c:
        assert c.generate_text("keyed", **P)
    assert proxy.proxy_auth == ["Basic " + base64.b64encode(b"alice:pw").decode()]
    # an https origin: the proxy sees only the CONNECT (refused here), never the key
    https = f"https://127.0.0.1:{urlsplit(fake_server.base_url).port}"
    with VllmClient(base_url=https, api_key=key, **{**FAST, "max_retries": 0},
                    proxies={"https": proxy.url}) as c:
        with pytest.raises(errors.ApiError):
            c.generate_text("tunnel", **P)
    assert any(line.startswith("CONNECT ") for line in proxy.lines)
    assert proxy.proxy_auth == ["Basic " + base64.b64encode(b"alice:pw").decode()]
