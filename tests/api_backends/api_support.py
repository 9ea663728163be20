"""Helpers for the api_backends tests (imported plainly as ``api_support``; the fixtures
are in ``conftest.py``).

- ``COMPLETIONS``, ``completion_requests``, ``request_ids``: what the double recorded.
- ``client_threads``: threads a client left alive (the double's own are not counted).
- ``client_over``: a client over several endpoints (routing).
- ``CountingListener``: a loopback listener that counts connections and answers nothing.
- ``readme_snippet`` / ``run_snippet``: the README's python blocks, run as they stand.
- ``serve_http``: a stdlib HTTP server on loopback in a thread (``EchoAuthHandler`` answers
  500 with the Authorization header echoed back; ``MetricsHandler`` publishes the recorded
  real ``/metrics`` text).
- ``OtelCapture``: an SDK tracer provider (in-memory span exporter) and meter provider
  (in-memory reader) wired into ``tracing.configure``; ``RecordingRelay`` sits in front of a
  server's port on loopback and keeps every byte the client sent, so a test can read the
  ``traceparent`` the server received (the relay forwards a request only after recording it,
  so a reply proves the record is complete).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import socket
import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Set, Tuple, Type

from ipfs_accelerate_py.api_backends import tracing
from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer
from reliability.netfaults import TcpRelay
from support import exec_block

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

__all__ = ["COMPLETIONS", "completion_requests", "request_ids", "client_threads", "client_over",
           "CountingListener", "README", "README_URL", "README_MODEL", "readme_snippet",
           "run_snippet", "serve_http", "EchoAuthHandler", "MetricsHandler", "DATA", "OtelCapture", "RecordingRelay", "parse_traceparent", "span_id",
           "trace_id"]

COMPLETIONS = "/v1/completions"
DATA = Path(__file__).parent / "data"
README = Path(__file__).resolve().parents[2] / "docs" / "VLLM_TESTING_README.md"
#: the base URL and model name the README's blocks use (a test substitutes the URL)
README_URL = "http://localhost:8000"
README_MODEL = "meta-llama/Llama-2-7b-chat-hf"


def completion_requests(server: FakeVllmServer) -> List[Any]:
    """The ``/v1/completions`` requests the double recorded, oldest first."""
    return [r for r in server.requests if r.path == COMPLETIONS]


def request_ids(server: FakeVllmServer) -> List[str]:
    """The ``X-Request-Id`` of each recorded ``/v1/completions`` request, in order."""
    return [r.headers.get("x-request-id", "") for r in completion_requests(server)]


def client_threads(before: Set[threading.Thread]) -> List[threading.Thread]:
    """Threads alive now that were not in ``before``, except the double's own threads."""
    return [t for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith("fake-vllm")]


def client_over(urls: Dict[str, str], **settings: Any) -> VllmClient:
    """A client whose default endpoint is the first URL, plus one endpoint per URL (routing
    leaves the default out: it is the same server as the first)."""
    c = VllmClient(base_url=next(iter(urls.values())), timeout=10, **settings)
    for eid, url in urls.items():
        c.create_endpoint(endpoint_id=eid, base_url=url)
    return c


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


# ------------------------------------------------------------------ the README's blocks
def readme_snippet(section: str) -> str:
    """The first ```python block under the README heading ``### {section}``, verbatim."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^### {re.escape(section)}\n(.*?)^```python\n(.*?)^```",
                      text, re.MULTILINE | re.DOTALL)
    assert match, f"README has no python block under '### {section}'"
    assert not re.search(r"^#", match.group(1), re.MULTILINE), "that block is in a later section"
    return match.group(2)


def run_snippet(section: str, ns: Dict[str, Any], base_url: str) -> str:
    """Execute the README block in ``ns`` with only the base URL substituted; return stdout."""
    return exec_block(readme_snippet(section), ns, {README_URL: base_url}, f"<README: {section}>")


# ------------------------------------------------------------------ small HTTP servers
@contextlib.contextmanager
def serve_http(handler: Type[http.server.BaseHTTPRequestHandler],
               tls: Optional[ssl.SSLContext] = None) -> Iterator[str]:
    """A stdlib HTTP server for ``handler`` on a free loopback port, in a thread; yields its
    base URL (``https://`` with a server-side ``tls`` context) and stops it afterwards."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class EchoAuthHandler(http.server.BaseHTTPRequestHandler):
    """Answers 500 with the Authorization header echoed back (a hostile server)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        echoed = self.headers.get("authorization", "")
        if self.path == "/v1/completions":
            body = json.dumps({"error": {"message": f"bad auth {echoed}", "type": "X", "code": 500}})
            status = 500
        else:
            body, status = '{"choices":[{"index":0,"text":"ok"}],"usage":{}}', 200
        data = body.encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST


class MetricsHandler(http.server.BaseHTTPRequestHandler):
    """Publishes the recorded real ``/metrics`` text, with ``num_requests_waiting`` set to 3."""

    body = (DATA / "vllm_metrics_sample.txt").read_bytes().replace(
        b'vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 0.0',
        b'vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 3.0')

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        status, body = (200, self.body) if self.path == "/metrics" else (404, b"{}")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


# ------------------------------------------------------------------ OpenTelemetry
_TRACEPARENT = re.compile(rb"\r\ntraceparent: *([0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2})",
                          re.IGNORECASE)


def trace_id(span: "ReadableSpan") -> str:
    return format(span.context.trace_id, "032x")


def span_id(span: "ReadableSpan") -> str:
    return format(span.context.span_id, "016x")


def parse_traceparent(value: str) -> Tuple[str, str]:
    """``(trace id, parent span id)`` of a W3C ``traceparent`` value."""
    version, tid, sid, _flags = value.split("-")
    assert version == "00"
    return tid, sid


class OtelCapture:
    """SDK providers with in-memory exporters, configured for the client while open (the
    SDK is imported here, so the modules that do not trace run without it)."""

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        tracing.configure(self.tracer_provider, self.meter_provider)

    def close(self) -> None:
        tracing.configure(None, None)
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()

    def spans(self) -> List["ReadableSpan"]:
        return list(self.exporter.get_finished_spans())

    def named(self, prefix: str) -> List["ReadableSpan"]:
        return [s for s in self.spans() if s.name.startswith(prefix)]

    def metrics(self) -> Dict[str, List[Any]]:
        """Metric name -> its data points (and the metric itself under ``name + ':meta'``)."""
        out: Dict[str, List[Any]] = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out[m.name] = list(m.data.data_points)
                    out[m.name + ":meta"] = [m]
        return out

    def dump(self) -> str:
        """Every finished span and the metrics, as the JSON an exporter would write."""
        spans = [json.loads(s.to_json()) for s in self.spans()]
        data = self.reader.get_metrics_data()
        return json.dumps({"spans": spans, "metrics": json.loads(data.to_json()) if data else {}},
                          indent=1)


class RecordingRelay(TcpRelay):
    """The loopback relay of the reliability tests, also keeping what clients sent."""

    def __init__(self, upstream: Tuple[str, int]) -> None:
        super().__init__(upstream)
        self._sent = bytearray()

    def traceparents(self) -> List[str]:
        with self._lock:
            return [m.decode() for m in _TRACEPARENT.findall(bytes(self._sent))]

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:  # type: ignore[override]
        if src.getsockname()[1] == self.port:  # accepted here: the client's side
            src = _Recording(src, self)
        TcpRelay._pipe(src, dst)  # type: ignore[arg-type]


class _Recording:
    """A socket whose received bytes are appended to the relay's record before they are
    forwarded."""

    def __init__(self, sock: socket.socket, relay: RecordingRelay) -> None:
        self._sock = sock
        self._relay = relay

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        with self._relay._lock:
            self._relay._sent += data
        return data

    def __getattr__(self, name: str):
        return getattr(self._sock, name)
