"""The resilience mixins end to end: ``VllmClient`` against the fault-injecting test double.

Each test scripts a fault on ``FakeVllmServer`` and checks what DESIGN §4 promises, from
both sides: what the caller got (result or typed error, and how long it took) and what the
server saw (how many requests, with which ``X-Request-Id`` and body). Time-driven breaker
states use ``FakeClock`` where possible; where a real wait is the point (``Retry-After``,
read timeouts) the elapsed time is measured. No test sleeps to synchronise: threads are
awaited through futures, and states that change in another thread are polled with a
bounded ``wait_until``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import wait as wait_all

import pytest

from api_support import COMPLETIONS, client_threads, completion_requests, request_ids
from support import wait_until
from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.clock import FakeClock
from ipfs_accelerate_py.api_backends.models import CompletionRequest
from ipfs_accelerate_py.servers.fake_vllm import Fault

P = {"max_tokens": 2}


def sent(server) -> int:
    return server.request_count[COMPLETIONS]


def call(client, prompt: str = "hi", params=P, priority: int = 1):
    return client.run_inference(None, prompt, params, priority)


# ================================================================== circuit breaker
def test_5xx_storm_opens_after_consecutive_failures_and_open_rejects_without_sending(
        fake_server, make_client):
    clock = FakeClock()
    c = make_client(fake_server, clock=clock, failure_threshold=3, minimum_calls=3,
                    max_retries=0, reset_timeout=5.0, fail_fast=True)
    fake_server.add_fault(Fault("status", status=503, count=-1))
    for i in range(3):
        assert c.circuit_state == "CLOSED"
        with pytest.raises(errors.ServiceUnavailableError):
            call(c)
        assert c.failure_count == i + 1
    assert c.circuit_state == "OPEN"
    assert sent(fake_server) == 3

    start = time.perf_counter()
    for _ in range(20):
        with pytest.raises(errors.CircuitOpenError) as info:
            call(c)
    assert time.perf_counter() - start < 1.0  # rejected at once: no network, no backoff
    assert info.value.retry_in == pytest.approx(5.0)
    assert sent(fake_server) == 3  # nothing reached the server while OPEN
    m = c.get_metrics()
    assert m["failures_by_type"] == {"ServiceUnavailableError": 3, "CircuitOpenError": 20}
    assert m["retries"] == 0  # an open circuit is not retried


def test_breaker_recovers_through_half_open_when_the_server_heals(fake_server, make_client):
    clock = FakeClock()
    c = make_client(fake_server, clock=clock, failure_threshold=2, minimum_calls=2,
                    max_retries=0, reset_timeout=5.0, fail_fast=True)
    fake_server.add_fault(Fault("status", status=500, count=-1))
    for _ in range(2):
        with pytest.raises(errors.ServerError):
            call(c)
    assert c.circuit_state == "OPEN"
    fake_server.clear_faults()  # the server heals, but the breaker does not know yet

    clock.advance(4.9)
    assert c.circuit_state == "OPEN"
    with pytest.raises(errors.CircuitOpenError):
        call(c)
    assert sent(fake_server) == 2

    clock.advance(0.2)
    assert c.circuit_state == "HALF-OPEN"
    assert call(c).usage.completion_tokens == 2  # the probe goes through and succeeds
    assert c.circuit_state == "CLOSED" and c.failure_count == 0
    assert sent(fake_server) == 3
    assert all(call(c, f"p{i}").text for i in range(3))
    assert c.get_metrics()["circuit_breaker_transitions"] == {
        "default:CLOSED->OPEN": 1, "default:OPEN->HALF-OPEN": 1, "default:HALF-OPEN->CLOSED": 1}


def test_half_open_probe_failure_reopens_and_only_one_probe_goes_through(
        fake_server, make_client):
    clock = FakeClock()
    c = make_client(fake_server, clock=clock, failure_threshold=1, minimum_calls=1,
                    max_retries=0, reset_timeout=2.0, half_open_max_calls=1, fail_fast=True)
    fake_server.add_fault(Fault("status", status=502, count=1))
    with pytest.raises(errors.ServerError):
        call(c)
    assert c.circuit_state == "OPEN"

    # A failing probe opens it again (and the reset timer restarts).
    clock.advance(2.0)
    assert c.circuit_state == "HALF-OPEN"
    fake_server.add_fault(Fault("status", status=500, count=1))
    with pytest.raises(errors.ServerError):
        call(c)
    assert c.circuit_state == "OPEN" and sent(fake_server) == 2

    # While the one probe is in flight (the server stalls it), others are rejected at once.
    clock.advance(2.0)
    assert c.circuit_state == "HALF-OPEN"
    fake_server.add_fault(Fault("gate", count=1))
    probe = c.submit_inference(None, "probe", P)
    fake_server.wait_held(1)  # the probe reached the server and waits at the gate
    assert sent(fake_server) == 3
    other = c.submit_inference(None, "other", P)
    with pytest.raises(errors.CircuitOpenError, match="HALF-OPEN"):
        other.result(timeout=5)
    fake_server.release_stalls()
    assert probe.result(timeout=5).usage.completion_tokens == 2
    assert c.circuit_state == "CLOSED"
    assert sent(fake_server) == 3


def test_breaker_opens_on_the_failure_rate_over_its_window(fake_server, make_client):
    c = make_client(fake_server, failure_threshold=5, minimum_calls=10,
                    failure_rate_threshold=0.5, max_retries=0, fail_fast=True)
    for i in range(10):
        if i % 2 == 1:  # every other call fails: never two failures in a row
            fake_server.add_fault(Fault("status", status=500, count=1))
            with pytest.raises(errors.ServerError):
                call(c)
        else:
            call(c)
        if i < 9:  # fewer than minimum_calls seen, or below the rate
            assert c.circuit_state == "CLOSED", i
    assert c.circuit_state == "OPEN"  # 5 failures in 10 calls = 50 %
    assert c.failure_count == 1  # it was the rate, not a run of consecutive failures
    with pytest.raises(errors.CircuitOpenError):
        call(c)
    assert sent(fake_server) == 10


def test_connection_refused_storm_opens_and_recovers_when_server_comes_back(
        fake_server, make_client):
    """Real time here: reset_timeout 0.2 s, the HALF-OPEN state is awaited by a bounded poll."""
    c = make_client(fake_server, failure_threshold=2, max_retries=0, reset_timeout=0.2,
                    fail_fast=True)
    assert call(c).text
    fake_server.down()
    for _ in range(2):
        with pytest.raises(errors.ConnectionError):
            call(c)
    assert c.circuit_state == "OPEN"
    with pytest.raises(errors.CircuitOpenError):
        call(c)
    fake_server.up()
    waited = wait_until(lambda: c.circuit_state == "HALF-OPEN", timeout=2.0,
                        what="HALF-OPEN after reset_timeout")
    assert waited < 0.5
    assert call(c).usage.completion_tokens == 2
    assert c.circuit_state == "CLOSED"


def test_4xx_is_not_retried_and_never_trips_the_breaker(fake_server, make_client):
    c = make_client(fake_server, failure_threshold=2, max_retries=3,
                    sliding_window_size=4, minimum_calls=2)
    # A natural 400 from the double: max_tokens beyond max_model_len (512).
    for _ in range(5):
        with pytest.raises(errors.BadRequestError):
            call(c, params={"max_tokens": 100_000})
    fake_server.add_fault(Fault("status", status=400, count=-1))
    for _ in range(10):
        with pytest.raises(errors.BadRequestError):
            call(c)
    assert sent(fake_server) == 15  # exactly one request per call
    assert len(set(request_ids(fake_server))) == 15
    assert fake_server.retries_seen == 0
    assert c.circuit_state == "CLOSED" and c.failure_count == 0
    m = c.get_metrics()
    assert m["retries"] == 0 and m["failures_by_type"] == {"BadRequestError": 15}
    fake_server.clear_faults()
    assert call(c).text


@pytest.mark.parametrize("status, error", [
    (401, errors.AuthenticationError), (403, errors.PermissionDeniedError),
    (404, errors.NotFoundError), (422, errors.UnprocessableEntityError)])
def test_other_4xx_are_not_retried_either(fake_server, make_client, status, error):
    c = make_client(fake_server, failure_threshold=1, max_retries=3)
    fake_server.add_fault(Fault("status", status=status, count=-1))
    for _ in range(3):
        with pytest.raises(error):
            call(c)
    assert sent(fake_server) == 3 and fake_server.retries_seen == 0
    assert c.circuit_state == "CLOSED" and c.get_metrics()["retries"] == 0


# ================================================================== retries
@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_retryable_statuses_are_retried_with_the_same_request_id(fake_server, make_client,
                                                                 status):
    c = make_client(fake_server, max_retries=3, failure_threshold=10)
    fake_server.add_fault(Fault("status", status=status, count=2))
    assert call(c).usage.completion_tokens == 2
    ids = request_ids(fake_server)
    assert len(ids) == 3 and len(set(ids)) == 1
    assert c.get_metrics()["retries"] == 2 == fake_server.retries_seen


@pytest.mark.parametrize("kind", ["drop", "reset"])
def test_dropped_connection_is_retried_and_succeeds(fake_server, make_client, kind):
    c = make_client(fake_server, max_retries=2)
    fake_server.add_fault(Fault(kind, count=1))
    r = call(c)
    assert r.usage.completion_tokens == 2
    ids = request_ids(fake_server)
    assert len(ids) == 2 and ids[0] == ids[1]
    assert fake_server.times_seen(ids[0]) == 2
    m = c.get_metrics()
    assert m["retries"] == 1 and m["successes"] == 1 and m["failures"] == 0
    assert c.circuit_state == "CLOSED" and c.failure_count == 0  # the success reset it


def test_exhausted_retries_raise_the_last_error_and_count_every_retry(fake_server, make_client):
    c = make_client(fake_server, max_retries=3, failure_threshold=10)
    fake_server.add_fault(Fault("status", status=500, count=-1))
    with pytest.raises(errors.ServerError):
        call(c)
    assert sent(fake_server) == 4  # 1 + max_retries
    m = c.get_metrics()
    assert m["retries"] == 3 == fake_server.retries_seen
    assert m["requests"] == 1 and m["failures"] == 1
    assert c.failure_count == 4  # every failed attempt is a breaker failure


def test_a_retry_the_breaker_refuses_is_not_counted_as_a_retry(fake_server, make_client):
    """The breaker opens between two attempts of one call: the next attempt never goes out,
    so the metrics must not count it as a retry (the double saw one retry, not two)."""
    c = make_client(fake_server, failure_threshold=2, minimum_calls=2, max_retries=3,
                    fail_fast=True, reset_timeout=60)
    fake_server.add_fault(Fault("status", status=500, count=-1))
    with pytest.raises(errors.CircuitOpenError):
        call(c)
    assert sent(fake_server) == 2 and c.circuit_state == "OPEN"
    assert c.get_metrics()["retries"] == fake_server.retries_seen == 1


class OversleepingClock(FakeClock):
    """A fake clock whose every sleep overshoots by ``extra`` seconds (a stalled machine)."""

    def __init__(self, extra: float) -> None:
        super().__init__()
        self.extra = extra

    def sleep(self, seconds, cancel=None):
        return super().sleep(seconds + self.extra, cancel)


def test_a_retry_stopped_by_the_deadline_before_sending_is_not_counted(fake_server,
                                                                       make_client):
    c = make_client(fake_server, clock=OversleepingClock(5.0), deadline=2.0, max_retries=3,
                    failure_threshold=10)
    fake_server.add_fault(Fault("status", status=500, count=-1))
    with pytest.raises(errors.TimeoutError, match="before the request was sent"):
        call(c)
    assert sent(fake_server) == 1
    assert c.get_metrics()["retries"] == fake_server.retries_seen == 0


def test_retries_are_counted_honestly_over_a_mixed_fault_script(fake_server, make_client):
    """metrics["retries"] == the extra requests the double saw (same X-Request-Id)."""
    c = make_client(fake_server, max_retries=4, failure_threshold=50, minimum_calls=1000)
    script = [
        [],                                                         # clean
        [Fault("status", status=500)],                              # 1 retry
        [Fault("drop"), Fault("status", status=503)],               # 2 retries
        [Fault("retry_after", seconds=0)],                          # 1 retry
        [Fault("reset"), Fault("drop"), Fault("status", status=502)],  # 3 retries
        [Fault("status", status=500, count=5)],                     # 4 retries, then fails
    ]
    outcomes = []
    for i, faults in enumerate(script):
        for f in faults:
            fake_server.add_fault(f)
        try:
            call(c, f"p{i}")
            outcomes.append("ok")
        except errors.ApiError as exc:
            outcomes.append(type(exc).__name__)
    assert outcomes == ["ok"] * 5 + ["ServerError"]
    ids = request_ids(fake_server)
    counts = Counter(ids)
    per_call = [counts[i] for i in dict.fromkeys(ids)]  # in call order
    assert per_call == [1, 2, 3, 2, 4, 5]
    m = c.get_metrics()
    assert m["retries"] == 11 == fake_server.retries_seen == len(ids) - len(set(ids))
    assert m["requests"] == 6 and m["successes"] == 5 and m["failures"] == 1


@pytest.mark.parametrize("header_kind", ["Retry-After", "retry-after-ms"])
def test_429_retry_after_is_honoured(fake_server, make_client, header_kind):
    c = make_client(fake_server, max_retries=2, retry_delay=0.001)
    fake_server.add_fault(Fault("retry_after", seconds=1,
                                retry_after_ms=header_kind == "retry-after-ms"))
    start = time.perf_counter()
    r = call(c)
    waited = time.perf_counter() - start
    assert r.usage.completion_tokens == 2
    assert 0.9 <= waited < 2.0, waited
    reqs = completion_requests(fake_server)
    assert len(reqs) == 2 and reqs[0].headers["x-request-id"] == reqs[1].headers["x-request-id"]
    gap = reqs[1].timestamp - reqs[0].timestamp  # measured on the server's side too
    assert 0.9 <= gap < 2.0, gap
    assert c.get_metrics()["retries"] == 1


def test_retry_after_on_a_503_is_honoured(fake_server, make_client):
    c = make_client(fake_server, max_retries=2, retry_delay=0.001)
    fake_server.add_fault(Fault("status", status=503, headers={"retry-after-ms": "300"}))
    start = time.perf_counter()
    assert call(c).text
    assert 0.27 <= time.perf_counter() - start < 1.2


def test_retry_after_is_capped_by_max_retry_after(fake_server, make_client):
    c = make_client(fake_server, max_retries=2, max_retry_after=0.2)
    fake_server.add_fault(Fault("retry_after", seconds=30))
    start = time.perf_counter()
    assert call(c).text
    assert 0.18 <= time.perf_counter() - start < 1.0


def test_retry_after_beyond_the_call_deadline_fails_at_once(fake_server, make_client):
    c = make_client(fake_server, max_retries=3, deadline=2.0)
    fake_server.add_fault(Fault("retry_after", seconds=30))
    start = time.perf_counter()
    with pytest.raises(errors.TimeoutError, match="deadline"):
        call(c)
    assert time.perf_counter() - start < 0.5  # no pointless 2 s wait either
    assert sent(fake_server) == 1


# ================================================================== timeouts
def test_stall_past_the_read_timeout_raises_timeout_and_counts_as_breaker_failure(
        fake_server, make_client):
    c = make_client(fake_server, timeout=0.3, max_retries=0, failure_threshold=1,
                    minimum_calls=1)
    fake_server.add_fault(Fault("gate"))  # never answered while the test runs
    start = time.perf_counter()
    with pytest.raises(errors.TimeoutError):
        call(c)
    elapsed = time.perf_counter() - start
    assert 0.3 <= elapsed < 1.0, elapsed
    assert c.failure_count == 1 and c.circuit_state == "OPEN"
    assert c.get_metrics()["failures_by_type"] == {"TimeoutError": 1}


def test_stall_is_retried_after_the_read_timeout(fake_server, make_client):
    c = make_client(fake_server, timeout=0.3, max_retries=2)
    fake_server.add_fault(Fault("gate"))  # the first attempt is never answered
    start = time.perf_counter()
    assert call(c).usage.completion_tokens == 2
    assert 0.3 <= time.perf_counter() - start < 1.3
    ids = request_ids(fake_server)
    assert len(ids) == 2 and len(set(ids)) == 1
    assert c.get_metrics()["retries"] == 1


def test_the_call_deadline_bounds_every_retry_of_a_stalled_server(fake_server, make_client):
    c = make_client(fake_server, timeout=0.4, deadline=1.0, max_retries=50,
                    failure_threshold=1000)
    fake_server.add_fault(Fault("gate", count=-1))  # no attempt is answered
    start = time.perf_counter()
    with pytest.raises(errors.TimeoutError):
        call(c)
    elapsed = time.perf_counter() - start
    assert 0.9 <= elapsed < 1.6, elapsed
    assert 2 <= sent(fake_server) <= 4  # a few attempts, each within what was left


# ================================================================== batching under faults
def _queue_behind_a_gated_blocker(c, server, n: int):
    """One worker busy on a request the double holds at a gate; ``n`` compatible requests
    queued behind it. The caller releases the gate (``server.release_stalls()``)."""
    server.add_fault(Fault("gate", count=1))
    blocker = c.submit_inference(None, "blocker", {"max_tokens": 3})
    server.wait_held(1)
    assert sent(server) == 1
    futures = [c.submit_inference(None, f"job {i}", P) for i in range(n)]
    assert len(c.request_queue) == n
    return blocker, futures


def test_a_batch_dropped_once_is_retried_in_parts_and_every_caller_gets_its_result(
        fake_server, make_client):
    """The retry of a shared call of 4 goes as 4 calls of one job each (at most 8 parts).
    The first part repeats the batch's request id (a retry, in the metrics as on the wire);
    the others carry their own job's id for the first time."""
    c = make_client(fake_server, max_concurrent_requests=2, max_retries=2)
    blocker, futures = _queue_behind_a_gated_blocker(c, fake_server, 4)
    fake_server.add_fault(Fault("drop", count=1))
    fake_server.release_stalls()
    assert blocker.result(5).usage.completion_tokens == 3
    results = [f.result(5) for f in futures]
    assert [r.usage.completion_tokens for r in results] == [2, 2, 2, 2]
    reqs = completion_requests(fake_server)
    assert reqs[1].json["prompt"] == [f"job {i}" for i in range(4)]
    assert sorted(r.json["prompt"] for r in reqs[2:]) == [[f"job {i}"] for i in range(4)]
    m = c.get_metrics()
    assert m["batches"] == 1 and m["batched_requests"] == 4
    assert m["requests"] == 5 and m["successes"] == 5
    assert m["retries"] == 1 == fake_server.retries_seen
    # each caller got its own prompt's answer (as the same prompt sent alone gets)
    assert [r.text for r in results] == [call(c, f"job {i}").text for i in range(4)]


def test_a_batch_failing_with_5xx_fails_every_caller_and_loses_none(fake_server, make_client):
    c = make_client(fake_server, max_concurrent_requests=1, max_retries=1,
                    failure_threshold=100)
    blocker, futures = _queue_behind_a_gated_blocker(c, fake_server, 4)
    fake_server.add_fault(Fault("status", status=500, count=-1))
    fake_server.release_stalls()
    blocker.result(5)
    for f in futures:
        with pytest.raises(errors.ServerError):
            f.result(5)
    assert sent(fake_server) == 1 + 1 + 4  # the blocker, the batch, its retry in 4 parts
    m = c.get_metrics()
    assert m["requests"] == 5 and m["failures"] == 4
    assert m["retries"] == 1 == fake_server.retries_seen


def test_a_prompt_that_breaks_the_server_is_cut_off_and_fails_alone(fake_server, make_client):
    """Every call carrying the poison prompt gets a 500. The shared call of 16 is retried as
    8 calls of 2, and the failing pair as 2 calls of 1: the 15 other callers succeed and only
    the poison prompt's caller fails, after max_retries + 1 attempts like any request."""
    c = make_client(fake_server, max_concurrent_requests=1, max_retries=3,
                    failure_threshold=100)
    fake_server.add_fault(Fault("status", status=500, count=-1, prompt="poison"))
    blocker, _ = _queue_behind_a_gated_blocker(c, fake_server, 0)
    prompts = [f"job {i}" for i in range(16)]
    prompts[5] = "poison 5"
    futures = [c.submit_inference(None, p, P) for p in prompts]
    assert len(c.request_queue) == 16
    fake_server.release_stalls()  # the blocker ends; the sixteen go as one call
    blocker.result(5)
    for i, f in enumerate(futures):
        if i == 5:
            with pytest.raises(errors.ServerError):
                f.result(5)
        else:
            assert f.result(5).usage.completion_tokens == 2
    sizes = sorted(len(r.json["prompt"]) for r in completion_requests(fake_server)[1:])
    assert sizes == [1, 1, 1] + [2] * 8 + [16], sizes  # job 4, then poison alone twice
    poisoned = [r.json["prompt"] for r in completion_requests(fake_server)
                if any("poison" in p for p in r.json["prompt"])]
    assert poisoned == [prompts, prompts[4:6], ["poison 5"], ["poison 5"]], poisoned
    m = c.get_metrics()
    assert m["requests"] == 17 and m["failures"] == 1 and m["batches"] == 1


def test_a_batch_refused_with_400_is_split_and_retries_stay_honest(fake_server, make_client):
    """A 4xx on the shared call: each request goes alone, so only the bad one fails. The
    first job's id carried the batch, so its solo call is an extra request for that id."""
    c = make_client(fake_server, max_concurrent_requests=1, max_retries=2)
    blocker, futures = _queue_behind_a_gated_blocker(c, fake_server, 4)
    fake_server.add_fault(Fault("status", status=400, count=1))
    fake_server.release_stalls()
    blocker.result(5)
    assert [f.result(5).usage.completion_tokens for f in futures] == [2, 2, 2, 2]
    reqs = completion_requests(fake_server)
    assert len(reqs) == 1 + 1 + 4  # blocker, the refused batch, four solo calls
    assert c.get_metrics()["retries"] == fake_server.retries_seen


# ================================================================== queue
def test_high_priority_submitted_later_finishes_before_low(fake_server, make_client):
    c = make_client(fake_server, max_concurrent_requests=1, batch_enabled=False,
                    aging_interval=60.0)
    order = []
    lock = threading.Lock()

    def track(name):
        def done(_):
            with lock:
                order.append(name)
        return done

    blocker, _ = _queue_behind_a_gated_blocker(c, fake_server, 0)
    futures = []
    for name, prio in [(f"low{i}", 2) for i in range(4)] + [(f"high{i}", 0) for i in range(4)]:
        f = c.submit_inference(None, name, P, priority=prio)
        f.add_done_callback(track(name))
        futures.append(f)
    assert len(c.request_queue) == 8
    fake_server.release_stalls()
    assert all(f.result(10).text for f in [blocker] + futures)
    assert order == [f"high{i}" for i in range(4)] + [f"low{i}" for i in range(4)]
    sent_prompts = [r.json["prompt"] for r in completion_requests(fake_server)]
    assert sent_prompts == ["blocker"] + order  # the server saw them in that order too


def _high_stream(c, backlog: int = 3):
    """Keep ``backlog`` HIGH requests queued: each one that ends submits the next."""
    stop = threading.Event()
    done = []
    lock = threading.Lock()

    def next_high(_=None):
        with lock:
            done.append(time.monotonic())
        if not stop.is_set():
            c.submit_inference(None, "high", P, priority=0).add_done_callback(next_high)

    for _ in range(backlog):
        c.submit_inference(None, "high", P, priority=0).add_done_callback(next_high)
    return stop, done


def test_aging_lets_low_priority_finish_under_a_steady_stream_of_high(start_fake, make_client):
    server = start_fake(latency=0.01)
    c = make_client(server, max_concurrent_requests=1, batch_enabled=False,
                    aging_interval=0.05)
    stop, high_done = _high_stream(c)
    low = c.submit_inference(None, "low", P, priority=2)
    seen = {}
    low.add_done_callback(lambda _: seen.update(queued=len(c.request_queue),
                                                highs=len(high_done)))
    try:
        assert low.result(timeout=5).text  # LOW did not starve
    finally:
        stop.set()
    assert seen["highs"] >= 3  # HIGH work went first for a while,
    assert seen["queued"] >= 2  # and HIGH work was still waiting when LOW went ahead of it
    wait_until(lambda: len(c.request_queue) == 0 and c.current_requests == 0, timeout=5,
               what="the HIGH stream to drain")


def test_without_aging_low_priority_waits_for_the_high_stream_to_end(start_fake, make_client):
    """The control for the test above: it is aging, not luck, that lets LOW through."""
    server = start_fake(latency=0.01)
    c = make_client(server, max_concurrent_requests=1, batch_enabled=False,
                    aging_interval=600.0)
    stop, high_done = _high_stream(c)
    low = c.submit_inference(None, "low", P, priority=2)
    try:
        wait_until(lambda: len(high_done) >= 30, timeout=10, what="30 HIGH requests")
        assert not low.done()
    finally:
        stop.set()
    assert low.result(timeout=5).text  # it runs once the HIGH stream ends


def test_full_queue_raises_queue_full(fake_server, make_client):
    c = make_client(fake_server, max_concurrent_requests=1, queue_size=2)
    blocker, futures = _queue_behind_a_gated_blocker(c, fake_server, 2)
    with pytest.raises(errors.QueueFullError):
        c.submit_inference(None, "one too many", P)
    assert len(c.request_queue) == 2
    fake_server.release_stalls()
    assert blocker.result(5).text and all(f.result(5).text for f in futures)


def test_a_request_that_waits_past_its_deadline_fails_unsent(fake_server, make_client):
    clock = FakeClock()
    c = make_client(fake_server, max_concurrent_requests=1, clock=clock)
    fake_server.add_fault(Fault("gate", count=1))
    blocker = c.submit(CompletionRequest(prompt="blocker", max_tokens=2), timeout=5)
    fake_server.wait_held(1)  # the blocker is in flight, held at the gate
    late = c.submit(CompletionRequest(prompt="late", max_tokens=2), timeout=0.2)
    clock.advance(1.0)  # past the late request's deadline while it waits, not the blocker's
    fake_server.release_stalls()
    with pytest.raises(errors.QueueTimeoutError):
        late.result(5)
    assert blocker.result(5).text
    assert sent(fake_server) == 1  # the late one was never sent
    assert c.get_metrics()["failures_by_type"] == {"QueueTimeoutError": 1}


def test_close_stops_the_loop_and_fails_what_is_still_queued(fake_server, make_client):
    before = set(threading.enumerate())
    c = make_client(fake_server, max_concurrent_requests=3, queue_size=10)
    fake_server.add_fault(Fault("gate", count=3))
    busy = [c.submit_inference(None, f"busy {i}", {"max_tokens": 2 + i}) for i in range(3)]
    fake_server.wait_held(3)  # three requests in flight, held at the gate
    queued = [c.submit_inference(None, f"queued {i}", {"max_tokens": 2 + i}) for i in range(5)]
    assert len(c.request_queue) == 5
    # the client's loop serves all three: no thread per request
    assert [t.name for t in client_threads(before)] == ["vllm-client-loop"]

    # close() fails the queue first, then waits for the workers: release the gate once the
    # queued requests have failed, so the busy ones finish while close() waits for them
    releaser = threading.Thread(target=lambda: (wait_all(queued, timeout=10),
                                                fake_server.release_stalls()),
                                name="fake-vllm-release-gate")
    releaser.start()
    c.close()
    releaser.join(10)
    assert client_threads(before) == []  # the loop's thread is not left alive
    for f in queued:
        with pytest.raises(errors.ClientClosedError):
            f.result(0)
    assert all(f.result(0).text for f in busy)  # in-flight work finished normally
    assert sent(fake_server) == 3
    m = c.get_metrics()
    assert m["requests"] == 8 and m["failures_by_type"] == {"ClientClosedError": 5}
    with pytest.raises(errors.ClientClosedError):
        c.submit_inference(None, "after close", P)
    wait_until(lambda: fake_server.open_connections == 0, what="the client's sockets to close")


# ================================================================== priority forwarding
def test_priority_is_not_sent_unless_forward_priority(fake_server, make_client):
    c = make_client(fake_server)
    call(c, priority=2)
    assert "priority" not in completion_requests(fake_server)[-1].json


def test_forward_priority_puts_the_queue_priority_in_the_body(fake_server, make_client):
    c = make_client(fake_server, forward_priority=True, batch_enabled=False)
    for prio in (0, 1, 2):
        call(c, f"p{prio}", priority=prio)
    assert [r.json.get("priority") for r in completion_requests(fake_server)] == [0, 1, 2]
    # A priority the caller put in the request itself wins over the queue level.
    call(c, "own", {"max_tokens": 2, "priority": 7}, priority=2)
    assert completion_requests(fake_server)[-1].json["priority"] == 7


def test_a_batch_forwards_the_priority_of_its_most_urgent_member(fake_server, make_client):
    c = make_client(fake_server, forward_priority=True, max_concurrent_requests=1)
    blocker, _ = _queue_behind_a_gated_blocker(c, fake_server, 0)
    futures = [c.submit_inference(None, f"j{i}", P, priority=prio)
               for i, prio in enumerate([2, 1, 0, 2])]
    fake_server.release_stalls()
    assert blocker.result(5).text and all(f.result(5).text for f in futures)
    reqs = completion_requests(fake_server)
    assert len(reqs) == 2  # the blocker, then one shared call
    assert sorted(reqs[1].json["prompt"]) == ["j0", "j1", "j2", "j3"]
    assert reqs[1].json["priority"] == 0


def test_refused_priority_is_retried_once_without_it_and_then_never_sent(start_fake,
                                                                          make_client):
    server = start_fake(scheduling_policy="reject_priority")
    c = make_client(server, forward_priority=True, batch_enabled=False)
    r = call(c, "first", priority=2)
    assert r.usage.completion_tokens == 2
    reqs = completion_requests(server)
    assert len(reqs) == 2
    assert reqs[0].json["priority"] == 2 and "priority" not in reqs[1].json
    assert reqs[0].headers["x-request-id"] == reqs[1].headers["x-request-id"]
    for prio in (2, 0, 1):
        call(c, f"later {prio}", priority=prio)
    later = completion_requests(server)[2:]
    assert len(later) == 3 and all("priority" not in q.json for q in later)
    m = c.get_metrics()
    assert m["successes"] == 4 and m["failures"] == 0
    assert m["retries"] == server.retries_seen == 1


def test_a_blocking_call_from_the_clients_loop_is_refused_not_hung(fake_server, make_client):
    """A future's done callback runs on the client's loop: a blocking call made there could
    never finish (the loop would wait for itself). It raises at once; submit works there."""
    c = make_client(fake_server)
    seen: list = []
    done = threading.Event()

    def callback(f):
        try:
            c.run_inference(None, "from the loop", P)
        except errors.ConfigurationError as exc:
            seen.append(exc)
        seen.append(c.submit_inference(None, "queued from the loop", P))
        done.set()

    fake_server.add_fault(Fault("gate", count=1))
    first = c.submit_inference(None, "first", P)
    fake_server.wait_held(1)  # not done yet: the callback will run where the future is set
    first.add_done_callback(callback)
    fake_server.release_stalls()
    assert done.wait(10)
    assert isinstance(seen[0], errors.ConfigurationError) and "async face" in str(seen[0])
    assert seen[1].result(10).text  # submit from the loop is served
