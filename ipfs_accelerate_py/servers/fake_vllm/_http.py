"""HTTP/1.1 plumbing: the request handler that writes bytes the way uvicorn does, and the server.

Why by hand on ``http.server``: the double must speak the real server's framing (header order
and names, chunked SSE) and misbehave on demand (FIN, RST, a stream cut mid-body), with only
the standard library.
"""

from __future__ import annotations

import email.utils
import socket
import socketserver
import struct
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Sequence

from ._faults import hold_seconds
from ._wire import _DONE, _SSE, _ClientGone, _Halt, _Reply, _Stream, _dumps

if TYPE_CHECKING:
    from ._server import FakeVllmServer

_DATE_CACHE: list[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if now != _DATE_CACHE[0]:
        _DATE_CACHE[1] = email.utils.formatdate(now, usegmt=True)
        _DATE_CACHE[0] = now
    return _DATE_CACHE[1]


_PHRASES = {s.value: s.phrase for s in HTTPStatus}


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, asks the owning :class:`FakeVllmServer` what to do, writes bytes."""

    protocol_version = "HTTP/1.1"
    server_version = "uvicorn"
    disable_nagle_algorithm = True
    server: "_HTTPServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence per-request logging: soak tests send 100k requests."""

    def _dispatch(self) -> None:
        owner = self.server.owner
        body = self._read_body()
        if body is None:
            return
        try:
            owner._serve(self, body)
        except (_ClientGone, _Halt, ConnectionError, TimeoutError, OSError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def _read_body(self) -> bytes | None:
        try:
            length = self.headers.get("Content-Length")
            if length is not None:
                n = int(length)
                return self.rfile.read(n) if n > 0 else b""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(parts)
            return b""
        except (ValueError, OSError):
            self.close_connection = True
            return None

    # -- writing ---------------------------------------------------------------------------
    def _head(self, status: int, content_type: str | None, extra: Sequence[tuple[str, str]], length: int | None) -> bytes:
        lines = [f"HTTP/1.1 {status} {_PHRASES.get(status, 'Unknown')}", f"date: {_http_date()}", "server: uvicorn"]
        for k, v in extra:
            lines.append(f"{k}: {v}")
        if length is not None:
            lines.append(f"content-length: {length}")
        if content_type:
            lines.append(f"content-type: {content_type}")
        lines.append("vary: Origin")
        if length is None:
            lines.append("transfer-encoding: chunked")
        if self.close_connection:
            lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send_reply(self, reply: _Reply) -> None:
        body = b"" if self.command == "HEAD" else reply.body
        self._write(self._head(reply.status, reply.content_type, reply.headers, len(reply.body)) + body)

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError as exc:
            raise _ClientGone() from exc

    def abort(self, rst: bool) -> None:
        """Close the connection without a reply: FIN, or RST when ``rst``."""
        self.close_connection = True
        sock = self.connection
        try:
            if rst:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def send_stream(self, stream: _Stream, owner: "FakeVllmServer", halt: threading.Event) -> None:
        fault = stream.fault
        kind = fault.kind if fault else None
        completed = False
        try:
            self._write(self._head(200, _SSE, (), None))
            if kind == "stream_raw" and fault is not None:
                if fault.body:
                    self._write(b"%x\r\n%s\r\n" % (len(fault.body), fault.body))
                self._write(b"0\r\n\r\n")
                completed = True
                return
            sent = 0
            pending = fault is not None
            for event in stream.events:
                # Fire after ``after_chunks`` events, or just before [DONE] in a shorter stream.
                if pending and fault is not None and (sent == fault.after_chunks or event == _DONE):
                    pending = False
                    if kind in ("stall", "gate"):
                        owner._sleep(hold_seconds(fault), halt, waiting=False, fault=True)
                    elif kind == "stream_drop":
                        self.abort(rst=False)
                        return
                    elif kind == "stream_error":
                        err = {"error": {"message": "Injected fault: engine error mid-stream",
                                         "type": "InternalServerError", "param": None, "code": 500}}
                        frame = b"data: " + _dumps(err) + b"\n\n"
                        self._write(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(frame), frame, len(_DONE), _DONE))
                        return
                if kind == "stream_no_done" and event == _DONE:
                    continue
                self._write(b"%x\r\n%s\r\n" % (len(event), event))
                sent += 1
            self._write(b"0\r\n\r\n")
            completed = True
        finally:
            if stream.on_finish is not None:
                stream.on_finish(completed)


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that tells its owner about each connection and its thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: "FakeVllmServer") -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse-DNS lookup of the host (it can take seconds)."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True, name="fake-vllm-conn"
        )
        self.owner._connection_opened(request, thread)
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner._connection_closed(request, threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Connection errors are expected (faults, clients closing early); others are printed."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, _ClientGone, _Halt)):
            return
        super().handle_error(request, client_address)
