"""Helpers shared by every test folder (importable as ``support``: tests/ is on sys.path).

Plain functions and constants, no fixtures (those live in the ``conftest.py`` files):

- ``wait_until``: a bounded poll on a condition that changes in another thread.
- ``FAST``: client settings that make retries take milliseconds and keep every wait bounded
  (what the root conftest's ``make_client`` starts from).
- ``TRANSPORT_IDS`` / ``COMPLETE_TRANSPORT_IDS`` / ``transport_factory``: build a client on
  a sync transport given through ``transport_factory`` (``requests``) or on the default one
  (aiohttp), so a case can run on each.
- ``DoubleProcess``: the test double in a child process (its own memory and threads),
  stopped by PID.
- ``python_blocks`` / ``exec_block``: the ```python blocks of a Markdown file (with the
  reason a ``<!-- docs-test: skip (...) -->`` comment gives) and one block run with URLs
  substituted (the docs' examples; ``api_support.run_snippet`` runs the user's guide's).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from ipfs_accelerate_py.api_backends.transport import RequestsTransport, Transport

__all__ = ["wait_until", "FAST", "TRANSPORT_IDS", "COMPLETE_TRANSPORT_IDS", "transport_factory", "REAL_SERVER_API_KEY",
           "DoubleProcess", "DocBlock", "python_blocks", "exec_block"]

#: The key ``real_vllm_server_with_key`` requires (``Authorization: Bearer ...`` on /v1/*).
REAL_SERVER_API_KEY = "sk-test-key-123"

#: Settings that make retries quick (milliseconds) and keep every wait bounded.
FAST: Dict[str, Any] = dict(model="tiny-llama", retry_delay=0.002, max_retry_delay=0.01,
                            timeout=5.0, connect_timeout=2.0)

#: The sync transports a client can be given (``transport_factory``), by test id: every
#: request goes through it, adapted to the client's seam (``ThreadedTransport``: its calls
#: and stream reads in the client's executor). The hand-written ``http.client`` transport
#: that was the second one is gone: aiohttp is the default now.
TRANSPORT_IDS: Tuple[str, ...] = ("requests",)
#: ... and "aiohttp": no transport given, the default (``AioTransport``).
COMPLETE_TRANSPORT_IDS: Tuple[str, ...] = ("aiohttp",) + TRANSPORT_IDS
_TRANSPORTS = {"requests": RequestsTransport}


def transport_factory(name: str) -> Optional[Callable[[Any], Transport]]:
    """A client's ``transport_factory`` for the transport ``name`` (one of
    ``COMPLETE_TRANSPORT_IDS``), built from the client's settings as the default factory
    builds it; None for "aiohttp" (the client's default)."""
    if name == "aiohttp":
        return None
    cls = _TRANSPORTS[name]

    def make(s: Any) -> Transport:
        return cls(s.base_url, s.api_key_value, pool_size=max(s.max_concurrent_requests, 10),
                   verify=s.ca_bundle or s.verify_tls, extra_headers=s.extra_headers,
                   max_response_bytes=s.max_response_bytes)
    return make


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005,
               what: str = "condition") -> float:
    """Poll ``predicate`` until it is true; AssertionError after ``timeout`` s. Returns the wait.

    A bounded poll on an observable condition, never a fixed sleep standing in for one."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


def run_async(coro: Any, timeout: float = 60.0) -> Any:
    """Run ``coro`` on a fresh loop, bounded: a hang fails the test instead of the run."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a thread, awaited: a blocking wait (a double's gate) that must not
    stop the loop it is awaited on."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def outcomes(tasks: Dict[str, Any]) -> Dict[str, Any]:
    """Each task's result, or the exception (a cancellation too) it ended with."""
    out: Dict[str, Any] = {}
    for name, task in tasks.items():
        try:
            out[name] = await task
        except BaseException as exc:  # noqa: BLE001 - what the caller saw is the result
            out[name] = exc
    return out


_DOUBLE_LAUNCHER = """
import json, sys
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer
opts = json.loads(sys.argv[1])
if opts.get("backlog"):  # many connections arriving at once
    from ipfs_accelerate_py.servers.fake_vllm import _http
    _http._HTTPServer.request_queue_size = opts["backlog"]
server = FakeVllmServer(**opts.get("server", {})).start()
if opts.get("fail_rate"):
    server.fail_rate(opts["fail_rate"], opts.get("kinds", ["status500", "drop"]), seed=7,
                     path="/v1/completions")
print(server.port, flush=True)
sys.stdin.read()  # serve until the parent closes our stdin (or kills us)
server.stop()
"""


class DoubleProcess:
    """The test double in a process of its own: its memory (it keeps every request id it
    saw) and its threads (one per connection) are not the process under test's. Stopped
    by its PID. ``backlog``: its listen queue, for many connections arriving at once."""

    def __init__(self, fail_rate: float = 0.0, backlog: int = 0, **server: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _DOUBLE_LAUNCHER,
             json.dumps({"fail_rate": fail_rate, "backlog": backlog, "server": server})],
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


# ------------------------------------------------------------------ the docs' code blocks
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
_SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->\s*$")


class DocBlock(NamedTuple):
    """One ```python block: where it opens (1-based line), its code (dedented to the fence),
    and why it is skipped (``None`` when it runs)."""

    path: Path
    line: int
    code: str
    skip: Optional[str]


def python_blocks(path: Path) -> List[DocBlock]:
    """Every ```python block of a Markdown file, in order. A block whose previous non-blank
    line is ``<!-- docs-test: skip (reason) -->`` carries that reason."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: List[DocBlock] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m.group("lang"):
            i += 1
            continue
        indent, start = m.group("indent"), i
        body: List[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        if m.group("lang") != "python":
            continue
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = _SKIP.match(prev)
        blocks.append(DocBlock(path, start + 1, "\n".join(body) + "\n",
                               skip.group("why") if skip else None))
    return blocks


def exec_block(code: str, ns: Dict[str, Any], urls: Dict[str, str], name: str) -> str:
    """Execute ``code`` in ``ns`` with each URL of ``urls`` replaced by its value (the one
    change a docs block gets); return what it printed."""
    for old, new in urls.items():
        code = code.replace(old, new)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, name, "exec"), ns)  # noqa: S102 - the docs, as a reader runs them
    return out.getvalue()
