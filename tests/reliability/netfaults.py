"""Loopback helpers that sit in front of a REAL server: a fault-injecting HTTP proxy and a
TCP relay that counts the connections the server side is asked for.

``FaultProxy`` draws, per HTTP request (per attempt), from a seeded mix: a vLLM-shaped 500 or
503 body, a 429 with ``Retry-After``, a dropped connection (closed with no reply), a stall
(held with no reply until the proxy stops or ``stall_hold`` passes, which is past the
client's read timeout), or a pass-through to the upstream server whose reply is relayed as
it came. ``TcpRelay`` forwards bytes both ways and records the time of every accepted
connection. Both listen on 127.0.0.1 only and are stopped by the test that starts them.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["FaultProxy", "TcpRelay", "ISSUE_MIX"]

#: The fault mix of the resilience issue, per attempt (the rest passes through).
ISSUE_MIX: Sequence[Tuple[str, float]] = (
    ("500", 0.08), ("503", 0.06), ("429", 0.06), ("drop", 0.05), ("stall", 0.03))

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def _error_body(status: int, message: str) -> bytes:
    kind = {500: "InternalServerError", 503: "ServiceUnavailableError", 429: "RateLimitError"}
    return json.dumps({"error": {"message": message, "type": kind.get(status, "Error"),
                                 "param": None, "code": status}}).encode()


class FaultProxy:
    """An HTTP proxy to ``upstream`` (host, port) injecting ``mix`` with a seeded RNG."""

    def __init__(self, upstream: Tuple[str, int], mix: Sequence[Tuple[str, float]] = ISSUE_MIX,
                 seed: int = 0, retry_after: float = 0.2, stall_hold: float = 30.0) -> None:
        self.upstream = upstream
        self.mix = list(mix)
        self.retry_after = retry_after
        self.stall_hold = stall_hold
        self.drawn: Counter = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self, b"")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                proxy._handle(self, self.rfile.read(length))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fault-proxy")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # releases every stalled request
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _draw(self) -> str:
        with self._lock:
            x = self._rng.random()
            for kind, p in self.mix:
                if x < p:
                    self.drawn[kind] += 1
                    return kind
                x -= p
            self.drawn["pass"] += 1
            return "pass"

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: bytes,
               headers: Optional[Dict[str, str]] = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        kind = self._draw() if h.path.startswith("/v1/") else "pass"
        if kind in ("500", "503"):
            self._reply(h, int(kind), _error_body(int(kind), "injected fault"))
        elif kind == "429":
            self._reply(h, 429, _error_body(429, "injected rate limit"),
                        {"Retry-After": f"{self.retry_after:g}"})
        elif kind == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        elif kind == "stall":
            self._stop.wait(self.stall_hold)
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        else:
            self._forward(h, body)

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        conn = HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            h.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP:
                    h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            h.close_connection = True
        finally:
            conn.close()


class TcpRelay:
    """Forward 127.0.0.1:<port> to ``upstream``. ``accepted`` holds, for each connection,
    its time, its first request line (``"GET /health"``, ``"POST /v1/completions"``) and
    whether the upstream took it (False: the server was down, the connection was dropped)."""

    def __init__(self, upstream: Tuple[str, int], port: int = 0) -> None:
        self.upstream = upstream
        self.accepted: List[Tuple[float, str, bool]] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(512)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="tcp-relay")

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "TcpRelay":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)

    def refused_lines(self) -> List[str]:
        """First request lines of the connections the upstream could not take, in order."""
        with self._lock:
            return [line for _, line, took in sorted(self.accepted) if not took]

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, time.monotonic()),
                             daemon=True).start()

    def _serve(self, client: socket.socket, at: float) -> None:
        client.settimeout(5)
        head = b""
        try:
            while b"\r\n" not in head and len(head) < 4096:
                more = client.recv(4096, socket.MSG_PEEK)
                if len(more) == len(head):
                    break
                head = more
        except OSError:
            pass
        line = " ".join(head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2])
        client.settimeout(None)
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            with self._lock:
                self.accepted.append((at, line, False))
            client.close()  # the server is down: the client sees the connection dropped
            return
        with self._lock:
            self.accepted.append((at, line, True))
        upstream.settimeout(None)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
