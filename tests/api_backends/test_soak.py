"""Soak: 2 000 requests through the double with 20 % injected faults; every one ends.

16 threads submit through ``submit_inference`` (futures); every future is awaited with a
bounded timeout, so a lost request fails the test instead of hanging it. Then the books
must balance, from the client's metrics and from what the double saw:

- requests == successes + failures == 2 000, and they match the futures' outcomes;
- metrics["retries"] == the double's retries (requests that repeated an X-Request-Id);
- every HTTP request is either a call's first try or a retry: sent == calls + retries;
- every injected fault was a failed attempt: faults == retries + calls that failed;
- calls: without batching one per request; with batching a shared call carries the
  first job's id, so calls == requests - batched_requests + batches, plus the parts of
  failed shared calls that went out under a new id (a retried shared call goes in parts:
  the first repeats its id, the others carry their own first job's id).

The breaker is set so that it cannot open (its behaviour has its own tests): an open
circuit would turn the rest of the run into instant rejections and hide the counting.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter

import pytest

from api_support import COMPLETIONS, client_threads
from ipfs_accelerate_py.api_backends import errors

N_REQUESTS = 2000
N_THREADS = 16
FAULT_RATE = 0.2
BUDGET_S = 60.0  # a hard bound for the whole run; it takes a few seconds


def resent_under_new_id(requests) -> int:
    """Requests whose id was new but whose prompts had been sent before."""
    ids, prompts, count = set(), set(), 0
    for r in requests:
        if r.path != COMPLETIONS:
            continue
        rid = r.headers.get("x-request-id")
        sent = r.json["prompt"] if isinstance(r.json["prompt"], list) else [r.json["prompt"]]
        if rid not in ids and prompts.intersection(sent):
            count += 1
        ids.add(rid)
        prompts.update(sent)
    return count


@pytest.mark.slow
@pytest.mark.parametrize("batching", [False, True], ids=["batching-off", "batching-on"])
def test_soak_every_request_ends_and_the_books_balance(fake_server, make_client, batching):
    before = set(threading.enumerate())
    fake_server.fail_rate(FAULT_RATE, ("status500", "drop"), seed=20260101, path=COMPLETIONS)
    c = make_client(fake_server, max_concurrent_requests=8, queue_size=N_REQUESTS,
                    max_retries=3, retry_delay=0.001, max_retry_delay=0.004, timeout=10.0,
                    failure_threshold=10_000, failure_rate_threshold=1.0,
                    batch_enabled=batching, max_batch_size=8)
    futures: list = [None] * N_REQUESTS

    def producer(t: int) -> None:
        for i in range(t, N_REQUESTS, N_THREADS):
            futures[i] = c.submit_inference(None, f"soak request {i}",
                                            {"max_tokens": 3, "temperature": 0})

    start = time.monotonic()
    producers = [threading.Thread(target=producer, args=(t,), name=f"soak-producer-{t}")
                 for t in range(N_THREADS)]
    for t in producers:
        t.start()
    for t in producers:
        t.join(BUDGET_S)
    assert all(f is not None for f in futures), "a producer did not finish submitting"

    outcomes: Counter = Counter()
    for i, f in enumerate(futures):
        try:
            r = f.result(timeout=max(0.1, start + BUDGET_S - time.monotonic()))
        except concurrent.futures.TimeoutError:
            outcomes["HUNG"] += 1
        except errors.ApiError as exc:
            outcomes[type(exc).__name__] += 1
        else:
            assert r.usage.completion_tokens == 3 and r.text, i
            outcomes["ok"] += 1
    elapsed = time.monotonic() - start

    m = c.get_metrics()
    seen = fake_server.request_count[COMPLETIONS]
    ids = len(fake_server.request_ids)
    retries_seen = fake_server.retries_seen
    faults = sum(fake_server.faults_injected.values())
    failed = {k: v for k, v in outcomes.items() if k != "ok"}
    summary = (f"batching={batching} {elapsed:.1f}s outcomes={dict(outcomes)} sent={seen} "
               f"ids={ids} retries(metrics)={m['retries']} retries(seen)={retries_seen} "
               f"faults={dict(fake_server.faults_injected)} batches={m['batches']} "
               f"batched={m['batched_requests']} conns={fake_server.connections_accepted}")
    print(summary)

    # Every request ended, with a result or a typed error, within the budget.
    assert outcomes["HUNG"] == 0, summary
    assert sum(outcomes.values()) == N_REQUESTS
    assert set(failed) <= {"ServerError", "ConnectionError"}, summary
    assert outcomes["ok"] >= N_REQUESTS * 0.98, summary  # 0.2**4 of them may fail for good
    assert elapsed < 30, summary

    # The client's books.
    assert m["requests"] == N_REQUESTS == m["successes"] + m["failures"]
    assert m["successes"] == outcomes["ok"] and m["failures_by_type"] == failed
    assert m["gen_ai.client.token.usage"]["output"] == 3 * outcomes["ok"]
    assert m["gen_ai.client.operation.duration"]["count"] == N_REQUESTS
    assert m["per_model"]["tiny-llama"]["requests"] == N_REQUESTS
    assert m["circuit_state"] == {"default": "CLOSED"}

    # Against what the double saw.
    assert sum(fake_server.request_ids.values()) == seen  # every request carried an id
    assert m["retries"] == retries_seen, summary
    assert seen == ids + retries_seen
    calls = N_REQUESTS - m["batched_requests"] + m["batches"]
    assert ids == calls + resent_under_new_id(fake_server.requests), summary
    failed_calls = faults - m["retries"]
    if batching:
        assert m["batches"] > 0 and calls < N_REQUESTS, summary  # batching really happened
        assert 0 <= failed_calls <= m["failures"], summary
    else:
        assert m["batches"] == 0
        assert failed_calls == m["failures"], summary
    # Connections are pooled: new ones only after a drop (plus the pool's first fill).
    assert fake_server.connections_accepted <= fake_server.faults_injected["drop"] + 16, summary

    c.close()
    assert client_threads(before) == []
