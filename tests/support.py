"""Helpers shared by every test folder (importable as ``support``: tests/ is on sys.path).

Plain functions and constants, no fixtures (those live in the ``conftest.py`` files):

- ``wait_until``: a bounded poll on a condition that changes in another thread.
- ``FAST``: client settings that make retries take milliseconds and keep every wait bounded
  (what the root conftest's ``make_client`` starts from).
- ``TRANSPORT_IDS`` / ``transport_factory``: build a client on either transport (``requests``
  or the lean ``http.client`` one), so a case can run on both.
- ``DoubleProcess``: the test double in a child process (its own memory and threads),
  stopped by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

from ipfs_accelerate_py.api_backends._http11 import HttpClientTransport
from ipfs_accelerate_py.api_backends.transport import (RequestsTransport,
                                                        Transport)

__all__ = ["wait_until", "FAST", "TRANSPORT_IDS", "COMPLETE_TRANSPORT_IDS", "transport_factory", "REAL_SERVER_API_KEY",
           "DoubleProcess"]

#: The key ``real_vllm_server_with_key`` requires (``Authorization: Bearer ...`` on /v1/*).
REAL_SERVER_API_KEY = "sk-test-key-123"

#: Settings that make retries quick (milliseconds) and keep every wait bounded.
FAST: Dict[str, Any] = dict(model="tiny-llama", retry_delay=0.002, max_retry_delay=0.01,
                            timeout=5.0, connect_timeout=2.0)

#: The two sync transports a client can be given, by test id (a stream read in its caller's
#: thread uses it; so do complete requests, from the client's loop, through its threads).
TRANSPORT_IDS: Tuple[str, ...] = ("requests", "httpclient")
#: ... and "aiohttp": no transport given, the default: complete requests go by aiohttp.
COMPLETE_TRANSPORT_IDS: Tuple[str, ...] = ("aiohttp",) + TRANSPORT_IDS
_TRANSPORTS = {"requests": RequestsTransport, "httpclient": HttpClientTransport}


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
