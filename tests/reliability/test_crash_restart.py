"""A REAL vLLM server is SIGKILLed under load and restarted on the same port: with default
settings every request succeeds, the dead port sees only probes once the circuit is open,
and work resumes within 2 s of ``/health`` answering again.

The test starts its own ``VllmCpuServer`` (never the shared session one) behind a
``TcpRelay`` that records every connection the server side is asked for. 32 caller threads
each loop: one request, a 0.2 s pause (the load shape of the resilience issue). 2 s into the
load the server's whole process group is SIGKILLed; it is restarted on the same port (about
15-25 s on 2 cores); the load goes on for a few seconds after it is back. A thread polls
``/health`` on the server's own port to time its return.

What must hold (DESIGN §4, "OPEN stops sending, it does not fail the caller"):
- 0 failures: every request's default deadline (144 s) outlasts the outage;
- from the moment the circuit opened until it closed, every connection the relay accepted
  was a probe (the client's probe count equals the relay's count), one at a time;
- the first success after the outage comes within 2 s of ``/health`` answering 200;
- the books balance, and no client thread is left after ``close()``.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from typing import List, Optional, Tuple

import pytest

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.vllm import VllmClient

from netfaults import TcpRelay
from support import wait_until

pytestmark = [pytest.mark.real_server, pytest.mark.slow]

N_THREADS = 32
PAUSE = 0.2
KILL_AT = 2.0  # seconds into the load
AFTER_BACK = 4.0  # seconds of load after the server is back
PARAMS = {"max_tokens": 8, "temperature": 0}

Outcome = Tuple[str, float, float]  # (ok | error type, start, end), monotonic seconds


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def test_server_killed_and_restarted_under_load_loses_nothing(own_real_server):
    server = own_real_server
    relay = TcpRelay(("127.0.0.1", server.port)).start()
    before = set(threading.enumerate())
    client = VllmClient(base_url=relay.base_url, model="tiny-llama")  # default settings
    breaker = client._endpoints["default"].breaker  # read-only: its transition times
    results: List[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()

    def caller(k: int) -> None:
        i = 0
        while not stop.is_set():
            start = time.monotonic()
            try:
                r = client.run_inference(None, f"crash test caller {k} request {i}", PARAMS)
                kind = "ok" if r.usage.completion_tokens == PARAMS["max_tokens"] else "short"
            except errors.ApiError as exc:
                kind = type(exc).__name__
            with lock:
                results.append((kind, start, time.monotonic()))
            i += 1
            stop.wait(PAUSE)  # the load's think time, not a synchronisation

    threads = [threading.Thread(target=caller, args=(k,), name=f"crash-caller-{k}")
               for k in range(N_THREADS)]
    health_back: List[float] = []
    try:
        t0 = time.monotonic()
        for t in threads:
            t.start()
        stop.wait(KILL_AT)
        assert any(r[0] == "ok" for r in results), "no success before the kill"
        t_kill = time.monotonic()
        server.kill()  # SIGKILL to the whole process group, as in a crash
        poller_stop = threading.Event()

        def poll_health() -> None:
            while not poller_stop.is_set():
                if _healthy(server.port):
                    health_back.append(time.monotonic())
                    return
                poller_stop.wait(0.02)

        poller = threading.Thread(target=poll_health, name="health-poller")
        poller.start()
        server.start()  # same port
        wait_until(lambda: bool(health_back), 30, what="/health to answer after the restart")
        poller_stop.set()
        poller.join(5)
        t_health = health_back[0]
        stop.wait(AFTER_BACK)
    finally:
        stop.set()
        for t in threads:
            t.join(200)  # bounded by the call deadline (144 s) plus grace
    hung = [t.name for t in threads if t.is_alive()]
    m = client.get_metrics()
    client.close()
    relay.stop()
    left = [t.name for t in threading.enumerate()
            if t not in before and t.is_alive() and t.name.startswith("vllm-")]

    outcomes = Counter(r[0] for r in results)
    wall_of: dict = {"open": None, "close": None}
    for wall, old, new in breaker.transitions:
        if new == "OPEN" and wall_of["open"] is None:
            wall_of["open"] = wall
        if new == "CLOSED" and old != "CLOSED":
            wall_of["close"] = wall
    # transitions carry wall time; map them onto the monotonic clock (for the figures only)
    offset = time.time() - time.monotonic()
    t_open: Optional[float] = wall_of["open"] - offset if wall_of["open"] else None
    t_close: Optional[float] = wall_of["close"] - offset if wall_of["close"] else None
    first_ok = min((r[2] for r in results if r[0] == "ok" and r[2] > t_health), default=None)
    probes = m["probes"]
    outage = relay.refused_lines()  # first request line of each connection the dead port got
    first_probe = outage.index("GET /health") if "GET /health" in outage else len(outage)
    detecting, after_open = outage[:first_probe], outage[first_probe:]
    summary = (f"{len(results)} requests from {N_THREADS} threads over "
               f"{time.monotonic() - t0:.1f}s: {dict(outcomes)}; outage (kill -> /health 200) "
               f"{t_health - t_kill:.1f}s; circuit opened {((t_open or 0) - t_kill):.2f}s "
               f"after the kill, closed {((t_close or 0) - t_health):.2f}s after /health; "
               f"first success {((first_ok or 0) - t_health):.2f}s after /health; "
               f"connections during the outage {len(outage)}: {len(detecting)} requests before "
               f"the first probe, then {Counter(after_open)}; probes {probes}; "
               f"retries {m['retries']}; "
               f"circuit wait {m['circuit_wait_seconds']}")
    print("\n" + summary)

    assert not hung and not left, (hung, left)
    assert outcomes["ok"] == len(results) and len(results) > N_THREADS, summary  # 0 failures
    assert t_open is not None and t_close is not None and t_open < t_health, summary
    # once the circuit opened, the dead port saw probes only, never a request
    assert after_open and set(after_open) == {"GET /health"}, summary
    assert len(after_open) <= probes["sent"] and probes["ok"] >= 1, summary
    assert first_ok is not None and first_ok - t_health < 2.0, summary
    assert m["requests"] == len(results) == m["successes"], summary
    assert m["circuit_wait_seconds"]["count"] > 0, summary
