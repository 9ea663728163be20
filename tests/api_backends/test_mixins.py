"""Each resilience mixin alone, with a fake clock: no server, no sleeps."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Iterator

import pytest

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.clock import SYSTEM_CLOCK, FakeClock
from ipfs_accelerate_py.api_backends._core.batcher import batch_key, merge_requests, share_tokens, split_result
from ipfs_accelerate_py.api_backends._core.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitProber
from ipfs_accelerate_py.api_backends._observability.recorder import MetricsRecorder, Series
from ipfs_accelerate_py.api_backends._core.loop import ClientLoop, Signal
from ipfs_accelerate_py.api_backends._core.dispatcher import Dispatcher
from ipfs_accelerate_py.api_backends._core.queue import Job, PriorityRequestQueue
from ipfs_accelerate_py.api_backends._core.retry import RetryPolicy, acall_with_retries
from ipfs_accelerate_py.api_backends.models import (ChatBatchRequest, ChatRequest, Choice, CompletionRequest,
                                                    CompletionResult, Usage)
from support import wait_until


# ------------------------------------------------------------------ circuit breaker
def make_breaker(clock: FakeClock, **kw) -> CircuitBreaker:
    args = dict(failure_threshold=3, reset_timeout=10.0, failure_rate_threshold=0.5,
                window_seconds=10.0, minimum_calls=6, half_open_max_calls=1, clock=clock, name="ep")
    args.update(kw)
    return CircuitBreaker(**args)


def open_it(b: CircuitBreaker) -> None:
    for _ in range(b.minimum_calls):
        b.record_failure()
    assert b.state == OPEN


def test_breaker_opens_after_minimum_calls_failures_in_a_row_and_rejects_at_once():
    clock = FakeClock()
    b = make_breaker(clock)
    for _ in range(5):
        b.before_call()
        b.record_failure()
    assert b.state == CLOSED and b.failure_count == 5
    b.before_call()
    b.record_failure()
    assert b.state == OPEN
    with pytest.raises(errors.CircuitOpenError) as info:
        b.before_call()
    assert info.value.retry_in == pytest.approx(10.0)


def test_breaker_opens_on_failure_rate_over_window():
    clock = FakeClock()
    b = make_breaker(clock)
    outcomes = [False, True, False, True, False, True]  # 50 % over 6 calls, 3 failures
    for fail in outcomes[:-1]:
        (b.record_failure if fail else b.record_success)()
        assert b.state == CLOSED
    b.record_failure()
    assert b.state == OPEN


def test_breaker_rate_needs_failure_threshold_failures():
    b = make_breaker(FakeClock(), failure_threshold=4)
    for fail in [False, True, False, True, False, True]:  # 50 % but only 3 failures
        (b.record_failure if fail else b.record_success)()
    assert b.state == CLOSED
    b.record_failure()
    assert b.state == OPEN


def test_breaker_window_is_in_seconds_old_calls_drop_out():
    clock = FakeClock()
    b = make_breaker(clock, minimum_calls=4, failure_threshold=2)
    b.record_success()
    b.record_failure()
    b.record_failure()
    clock.advance(10.5)  # all three leave the window
    assert b.window_counts() == (0, 0)
    b.record_success()
    b.record_failure()
    b.record_success()
    assert b.state == CLOSED  # 1 of 3 in the window: the old failures no longer count


def test_two_refused_connections_in_a_row_open_it():
    b = make_breaker(FakeClock(), minimum_calls=30)
    b.record_failure(refused=True)
    assert b.state == CLOSED
    b.record_failure(refused=True)
    assert b.state == OPEN


@pytest.mark.parametrize("calls_per_second", [3, 10, 30, 100, 1000])
def test_defaults_never_open_on_30_percent_random_faults(calls_per_second):
    """5 000 calls, independent faults at 30 %, at rates from a window of 30 calls (the
    least that counts) to thousands: the default breaker never opens."""
    import random
    rng = random.Random(20261201 + calls_per_second)
    clock = FakeClock()
    b = CircuitBreaker(clock=clock)
    failures = 0
    for _ in range(5000):
        if rng.random() < 0.3:
            failures += 1
            b.record_failure()
        else:
            b.record_success()
        assert b.state == CLOSED
        clock.advance(1.0 / calls_per_second)
    assert 1350 < failures < 1650  # the faults really were there


@pytest.mark.parametrize("calls_per_second", [30, 100, 1000])
def test_defaults_open_within_a_second_of_a_server_dying(calls_per_second):
    """Healthy traffic fills the window with successes, then every call fails (reset or
    timing out): OPEN within a second even though the old successes are still in it."""
    clock = FakeClock()
    b = CircuitBreaker(clock=clock)
    for _ in range(calls_per_second * 5):
        b.record_success()
        clock.advance(1.0 / calls_per_second)
    died = clock.monotonic()
    while b.state == CLOSED:
        b.record_failure()
        clock.advance(1.0 / calls_per_second)
        assert clock.monotonic() - died <= 1.0 + 1e-9
    assert b.state == OPEN


def test_breaker_half_open_admits_one_probe_then_closes_on_success():
    clock = FakeClock()
    b = make_breaker(clock)
    open_it(b)
    clock.advance(9.9)
    assert b.state == OPEN
    clock.advance(0.2)
    assert b.state == HALF_OPEN
    probe = b.before_call()
    assert probe is True
    with pytest.raises(errors.CircuitOpenError):
        b.before_call()  # only one probe at a time
    b.record_success(probe)
    assert b.state == CLOSED
    assert [t[1:] for t in b.transitions] == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_breaker_half_open_failure_reopens():
    clock = FakeClock()
    b = make_breaker(clock)
    open_it(b)
    clock.advance(10)
    probe = b.before_call()
    b.record_failure(probe)
    assert b.state == OPEN
    with pytest.raises(errors.CircuitOpenError):
        b.before_call()


def test_breaker_manual_reset():
    b = make_breaker(FakeClock())
    open_it(b)
    b.reset()
    assert b.state == CLOSED and b.failure_count == 0
    b.before_call()


def test_scheduled_probes_callers_are_refused_and_never_probe_until_the_probe_succeeds():
    """With scheduled probes, a caller never probes: ``admit`` refuses while the prober's
    probe is out, and admits once it succeeded. (Waiting out the refusal is the caller's, a
    coroutine: test_circuit_wait.py shows requests that wait and go on, a wait that ends at
    the deadline with ``CircuitWaitTimeoutError``, and close ending every wait.)"""
    b = make_breaker(SYSTEM_CLOCK, scheduled_probes=True)
    open_it(b)
    with pytest.raises(errors.CircuitOpenError):
        b.admit()
    assert b.begin_probe() and b.state == HALF_OPEN
    with pytest.raises(errors.CircuitOpenError):
        b.before_call()  # a caller is refused while the probe is out
    b.end_probe(True)
    assert b.state == CLOSED and b.admit() is False


# ------------------------------------------------------------------ retry
def test_retry_backoff_grows_and_is_capped():
    policy = RetryPolicy(max_retries=10, retry_delay=1.0, backoff_factor=2.0, max_retry_delay=5.0,
                         rng=lambda: 1.0)
    err = errors.ConnectionError("x")
    assert [policy.delay(err, a) for a in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    low = RetryPolicy(retry_delay=1.0, backoff_factor=2.0, rng=lambda: 0.0)
    assert low.delay(err, 2) == 2.0  # equal jitter: never below half the step


def test_retry_after_is_honoured_and_capped():
    policy = RetryPolicy(max_retry_after=3.0)
    assert policy.delay(errors.RateLimitError("slow", retry_after=1.0), 0) == 1.0
    assert policy.delay(errors.RateLimitError("slow", retry_after=30.0), 0) == 3.0


def run_retries(attempt_fn, policy, deadline, clock=SYSTEM_CLOCK, cancel=None, on_retry=None):
    """``acall_with_retries`` over a plain ``attempt_fn``, its waits the client's way: the
    clock's sleep, which a set ``cancel`` (the client closing) ends with ClientClosedError."""
    async def attempt(n):
        return attempt_fn(n)

    async def sleep(seconds, doing):
        if not clock.sleep(seconds, cancel):
            raise errors.ClientClosedError(f"client closed while {doing}")

    return asyncio.run(acall_with_retries(attempt, policy, deadline, clock, sleep,
                                          on_retry=on_retry))


@pytest.mark.parametrize("error,retried", [
    (errors.ConnectionError("refused"), True),
    (errors.TimeoutError("read"), True),
    (errors.ServerError("boom", status_code=500), True),
    (errors.ServiceUnavailableError("busy"), True),
    (errors.RateLimitError("slow"), True),
    (errors.RequestTimeoutError("408"), True),
    (errors.ConflictError("409"), True),
    (errors.BadRequestError("400"), False),
    (errors.AuthenticationError("401"), False),
    (errors.NotFoundError("404"), False),
    (errors.UnprocessableEntityError("422"), False),
    (errors.CircuitOpenError("open"), False),
])
def test_retry_classification(error, retried):
    clock = FakeClock()
    calls = []

    def attempt(n):
        calls.append(n)
        raise error

    with pytest.raises(type(error)):
        run_retries(attempt, RetryPolicy(max_retries=2, rng=lambda: 0.5), deadline=1e9,
                          clock=clock)
    assert len(calls) == (3 if retried else 1)


def test_retry_counts_honestly_and_succeeds():
    clock = FakeClock()
    seen = []

    def attempt(n):
        if n < 2:
            raise errors.ServerError("boom", status_code=503)
        return "ok"

    out = run_retries(attempt, RetryPolicy(max_retries=5, retry_delay=1, rng=lambda: 0.5),
                            deadline=clock.now + 100, clock=clock,
                            on_retry=lambda e, a, w: seen.append(a))
    assert out == "ok" and seen == [0, 1] and len(clock.sleeps) == 2


def test_retry_stops_at_the_deadline():
    clock = FakeClock()

    def attempt(n):
        raise errors.ConnectionError("down")

    with pytest.raises(errors.TimeoutError) as info:
        run_retries(attempt, RetryPolicy(max_retries=100, retry_delay=1, rng=lambda: 1.0),
                          deadline=clock.now + 5, clock=clock)
    assert "deadline" in str(info.value)
    assert sum(clock.sleeps) <= 5


def test_a_retrying_call_waits_for_the_circuit_probe_window():
    clock = FakeClock()
    outcomes = [errors.ConnectionError("down"), errors.CircuitOpenError("open", retry_in=3.0),
                errors.CircuitOpenError("open", retry_in=0.0), "ok"]

    def attempt(n):
        out = outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out, n

    result = run_retries(attempt, RetryPolicy(max_retries=1, retry_delay=0.1, rng=lambda: 0.0),
                               deadline=clock.now + 60, clock=clock)
    # one real retry (attempt 1); the two circuit waits used no retry budget
    assert result == ("ok", 1)
    assert clock.sleeps[1] == pytest.approx(3.0) and clock.sleeps[2] == pytest.approx(0.1)


def test_a_fresh_call_is_rejected_at_once_by_an_open_circuit():
    clock = FakeClock()

    def attempt(n):
        raise errors.CircuitOpenError("open", retry_in=1.0)

    with pytest.raises(errors.CircuitOpenError):
        run_retries(attempt, RetryPolicy(max_retries=5), deadline=clock.now + 60, clock=clock)
    assert clock.sleeps == []


def test_a_circuit_wait_never_passes_the_deadline():
    clock = FakeClock()
    outcomes = [errors.ConnectionError("down")] + [errors.CircuitOpenError("open", retry_in=10.0)] * 5

    def attempt(n):
        raise outcomes.pop(0)

    with pytest.raises(errors.CircuitOpenError):
        run_retries(attempt, RetryPolicy(max_retries=3, retry_delay=0.1, max_retry_delay=20.0,
                                               rng=lambda: 0.0),
                          deadline=clock.now + 5, clock=clock)
    assert sum(clock.sleeps) < 5


def test_a_probe_window_beyond_the_longest_backoff_fails_the_call_at_once():
    # A breaker with reset_timeout=120 must not hold a retrying caller for two minutes (nor
    # a routed call that another endpoint could serve now), even inside a long deadline.
    clock = FakeClock()
    outcomes = [errors.ConnectionError("down"), errors.CircuitOpenError("open", retry_in=120.0)]

    def attempt(n):
        raise outcomes.pop(0)

    with pytest.raises(errors.CircuitOpenError) as info:
        run_retries(attempt, RetryPolicy(max_retries=3, retry_delay=0.1, max_retry_delay=8.0,
                                               rng=lambda: 0.0),
                          deadline=clock.now + 600, clock=clock)
    assert info.value.retry_in == 120.0
    assert clock.sleeps == [pytest.approx(0.05)]  # the one backoff (0.1 with equal jitter 0), no more


def test_retry_wait_is_cut_short_by_close():
    cancel = threading.Event()
    cancel.set()

    def attempt(n):
        raise errors.ConnectionError("down")

    with pytest.raises(errors.ClientClosedError):
        run_retries(attempt, RetryPolicy(max_retries=3), deadline=1e12, cancel=cancel)


# ------------------------------------------------------------------ queue
def job(priority: int, clock: FakeClock, key=None, name="") -> Job:
    j = Job(request=name, priority=priority, deadline=clock.now + 1000, key=key, model=None,
            request_id=name, now=clock.now)
    return j


def test_queue_priority_then_fifo():
    clock = FakeClock()
    q = PriorityRequestQueue(maxsize=10, aging_interval=1000, clock=clock)
    for name, p in [("low1", 2), ("norm1", 1), ("high1", 0), ("low2", 2), ("high2", 0)]:
        q.put(job(p, clock, name=name))
    order = [q.take().request for _ in range(5)]
    assert order == ["high1", "high2", "norm1", "low1", "low2"]


def test_queue_aging_lets_low_priority_through():
    clock = FakeClock()
    q = PriorityRequestQueue(maxsize=100, aging_interval=1.0, clock=clock)
    q.put(job(2, clock, name="old-low"))
    clock.advance(2.5)  # aged by 2.5 levels: now better than a fresh HIGH
    q.put(job(0, clock, name="new-high"))
    assert q.take().request == "old-low"


def test_queue_full_raises_and_len_works():
    clock = FakeClock()
    q = PriorityRequestQueue(maxsize=2, clock=clock)
    q.put(job(1, clock))
    q.put(job(1, clock))
    assert len(q) == 2
    with pytest.raises(errors.QueueFullError):
        q.put(job(1, clock))


def test_queue_take_compatible_keeps_others_in_order():
    clock = FakeClock()
    q = PriorityRequestQueue(maxsize=10, clock=clock)
    for i, key in enumerate(["a", "b", "a", "a", "b"]):
        q.put(job(1, clock, key=key, name=f"{key}{i}"))
    taken = q.take_compatible("a", 2)
    assert [j.request for j in taken] == ["a0", "a2"]
    assert [q.take().request for _ in range(3)] == ["b1", "a3", "b4"]


@pytest.fixture
def client_loop() -> Iterator[ClientLoop]:
    """A started ``ClientLoop`` (the one a client runs its pipeline on), stopped after."""
    loop = ClientLoop("test")
    loop.loop  # started
    try:
        yield loop
    finally:
        loop.stop(5)


def collect_on_loop(loop: ClientLoop, q: PriorityRequestQueue, key, limit: int, until: float,
                    gap: float):
    """A collector on ``loop``, as a dispatcher task runs one; its future gives the batch."""
    return asyncio.run_coroutine_threadsafe(
        q.await_compatible(key, limit, until, gap, Signal(loop)), loop.loop)


def test_a_lone_collector_gives_up_after_the_gap_when_no_batch_is_in_flight(client_loop):
    clock = FakeClock()
    q = PriorityRequestQueue(maxsize=10, clock=clock)
    got = collect_on_loop(client_loop, q, "k", 4, until=clock.now + 30, gap=0.0)
    assert got.result(5) == []


def test_a_lone_collector_waits_for_the_callers_of_a_batch_in_flight(client_loop):
    """Closed loop: the batch's callers come back as soon as it returns. A lone request
    that arrived meanwhile waits for them (past the gap) instead of going alone."""
    clock = FakeClock()
    q = PriorityRequestQueue(maxsize=10, clock=clock)
    q.shared_call_started("k")
    got = collect_on_loop(client_loop, q, "k", 4, until=clock.now + 30, gap=0.0)
    wait_until(lambda: q.collecting("k"), 5, what="the collector to start")
    q.put(job(1, clock, key="other", name="unrelated"))
    assert not got.done()  # the gap (0 s) is long past, but the batch is still out
    q.put(job(1, clock, key="k", name="back"))  # goes straight to the collector
    assert [j.request for j in got.result(5)] == ["back"]
    assert len(q) == 1 and q.take().request == "unrelated"


def test_a_collector_stops_waiting_when_the_batch_comes_back_empty_handed(client_loop):
    clock = FakeClock()
    q = PriorityRequestQueue(maxsize=10, clock=clock)
    q.shared_call_started("k")
    got = collect_on_loop(client_loop, q, "k", 4, until=clock.now + 30, gap=0.0)
    wait_until(lambda: q.collecting("k"), 5, what="the collector to start")
    q.shared_call_ended("k")
    assert got.result(5) == [] and q.shared_calls_in_flight("k") == 0


def test_queue_close_returns_waiting_jobs_and_the_dispatcher_ends(client_loop):
    clock = FakeClock()
    q = PriorityRequestQueue(maxsize=10, clock=clock)
    q.pause()  # held (an OPEN circuit): nothing is taken, so close finds them waiting

    async def handle(j):
        j.succeed("sent")
    pool = Dispatcher(q, 3, handle, client_loop)
    left_behind = [job(1, clock, name=f"j{i}") for i in range(2)]
    for j in left_behind:
        q.put(j)
    assert pool.active == 0  # no task waits idle, none serves a held queue
    assert q.close() == left_behind
    assert pool.join(5) and pool.active == 0
    with pytest.raises(errors.ClientClosedError):
        q.put(job(1, clock))


def test_the_dispatcher_never_stops_on_a_handler_error(client_loop):
    q = PriorityRequestQueue(maxsize=10)
    clock = FakeClock()

    async def handle(j):
        raise RuntimeError("bug")

    pool = Dispatcher(q, 1, handle, client_loop)
    jobs = [job(1, clock) for _ in range(3)]
    for j in jobs:
        q.put(j)
    for j in jobs:
        with pytest.raises(RuntimeError):
            j.future.result(5)
    after = job(1, clock)
    q.put(after)  # still served
    with pytest.raises(RuntimeError):
        after.future.result(5)
    q.close()
    assert pool.join(5)


def test_the_dispatcher_grows_and_shrinks(client_loop):
    """``n`` jobs handled at once, no more: resized to 5, five gated jobs are all under way
    together; resized to 1, the next five go one at a time."""
    q = PriorityRequestQueue(maxsize=100)
    clock = FakeClock()
    running, most = [0], [0]
    release = asyncio.Event()  # set on the loop: the gated jobs' way out

    async def handle(j):
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            if j.request == "gated":
                await release.wait()
            else:
                await asyncio.sleep(0)  # a turn for any other task to start meanwhile
        finally:
            running[0] -= 1
        j.succeed(j.request)

    pool = Dispatcher(q, 2, handle, client_loop)
    pool.resize(5)
    gated = [job(1, clock, name="gated") for _ in range(5)]
    for j in gated:
        q.put(j)
    wait_until(lambda: running[0] == 5, 5, what="five jobs under way at once")
    client_loop.call_soon(release.set)
    assert [j.future.result(5) for j in gated] == ["gated"] * 5
    pool.resize(1)
    most[0] = 0
    jobs = [job(1, clock, name=f"j{i}") for i in range(5)]
    for j in jobs:
        q.put(j)
    assert [j.future.result(5) for j in jobs] == [f"j{i}" for i in range(5)]
    assert most[0] == 1  # one at a time
    with pytest.raises(errors.ValidationError):
        pool.resize(0)


# ------------------------------------------------------------------ batching
def test_merge_and_split_map_choices_by_index():
    reqs = [CompletionRequest(model="m", prompt=p, n=2, temperature=0.7, max_tokens=3)
            for p in ("a", "b", "c")]
    assert len({r.sampling_key() for r in reqs}) == 1
    merged = merge_requests(reqs)
    assert merged.prompt == ["a", "b", "c"] and merged.n == 2
    choices = [Choice(index=i, text=f"t{i}", prompt_index=i // 2, completion_tokens=3,
                      prompt_tokens=2, finish_reason="length") for i in range(6)]
    result = CompletionResult(choices=choices, usage=Usage(prompt_tokens=6, completion_tokens=18,
                                                           total_tokens=24))
    parts = split_result(result, 3, 2)
    assert [p.texts for p in parts] == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"]]
    assert [c.index for c in parts[2].choices] == [0, 1]
    assert parts[1].usage.completion_tokens == 6 and parts[1].usage.prompt_tokens == 2
    assert parts[0].batch_usage.total_tokens == 24
    # the one-pass split agrees with slicing prompt by prompt, whatever the choices' order
    shuffled = result.model_copy(update={"choices": choices[::-1]})
    assert ([p.model_dump() for p in shuffled.split_by_prompt(3, 2)]
            == [shuffled.for_prompt(i, 2).model_dump() for i in range(3)])


def test_different_sampling_parameters_do_not_share_a_call():
    a = CompletionRequest(prompt="x", temperature=0.5)
    b = CompletionRequest(prompt="y", temperature=0.6)
    c = CompletionRequest(prompt="z", temperature=0.5, priority=2)
    assert a.sampling_key() != b.sampling_key()
    assert a.sampling_key() == c.sampling_key()  # priority is not a sampling parameter


def chat(text: str, **kw) -> ChatRequest:
    return ChatRequest(model="m", messages=[{"role": "user", "content": text}], max_tokens=3, **kw)


def test_chat_requests_share_a_key_only_when_chat_batching_is_on_and_they_can():
    key = batch_key("ep", chat("a"), True, chat_batch=True)
    assert key is not None and key == batch_key("ep", chat("b"), True, chat_batch=True)
    assert batch_key("ep", chat("a"), True, chat_batch=False) is None  # off (the default)
    assert key != batch_key("ep", chat("a", temperature=0.5), True, chat_batch=True)
    assert key != batch_key("ep", CompletionRequest(model="m", prompt="a", max_tokens=3), True, True)
    for alone in (chat("a", n=2), chat("a", stream=True),
                  chat("a", tools=[{"type": "function", "function": {"name": "f"}}])):
        assert batch_key("ep", alone, True, chat_batch=True) is None


def test_merged_chats_keep_their_order_and_shared_fields():
    merged = merge_requests([chat("a"), chat("b"), chat("c")])
    assert isinstance(merged, ChatBatchRequest) and merged.max_tokens == 3 and merged.model == "m"
    assert [conv[0].content for conv in merged.conversations] == ["a", "b", "c"]


def test_split_shares_a_sum_the_server_did_not_break_down():
    """A chat batch reports completion tokens per choice but prompt tokens only summed."""
    choices = [Choice(index=i, text=f"t{i}", prompt_index=i, completion_tokens=i + 1,
                      finish_reason="length") for i in range(3)]
    result = CompletionResult(choices=choices, usage=Usage(prompt_tokens=10, completion_tokens=6,
                                                           total_tokens=16))
    parts = split_result(result, 3, 1)
    assert [p.usage.completion_tokens for p in parts] == [1, 2, 3]
    assert [p.usage.prompt_tokens for p in parts] == [4, 3, 3]
    assert [p.usage.total_tokens for p in parts] == [5, 5, 6]
    assert all(p.batch_usage == result.usage for p in parts)


def test_share_tokens_adds_up():
    for total in (0, 1, 7, 100, 101):
        for count in (1, 3, 8):
            parts = share_tokens(total, count)
            assert sum(parts) == total and max(parts) - min(parts) <= 1


# ------------------------------------------------------------------ metrics
def test_series_bounded_but_exact_totals():
    s = Series(window=10)
    for i in range(1, 101):
        s.add(float(i))
    out = s.summary()
    assert out["count"] == 100 and out["min"] == 1 and out["max"] == 100
    assert out["mean"] == pytest.approx(50.5)
    assert out["p50"] == pytest.approx(95.5)  # percentiles over the last 10 samples only


def test_metrics_scopes_add_up_and_reset():
    m = MetricsRecorder(window=100)
    m.record_request("ep1", "m1", True, 0.1, input_tokens=3, output_tokens=5)
    m.record_request("ep2", "m1", False, 0.2, error_type="ServerError")
    m.record_request("ep2", "m2", True, 0.3, input_tokens=1, output_tokens=2)
    m.record_retry("ep2", "m1")
    m.record_batch("ep1", "m1", 4)
    snap = m.snapshot()
    assert (snap["requests"], snap["successes"], snap["failures"]) == (3, 2, 1)
    assert snap["failures_by_type"] == {"ServerError": 1}
    assert snap["gen_ai.client.token.usage"] == {"input": 4, "output": 7}
    assert sum(e["requests"] for e in snap["per_endpoint"].values()) == 3
    assert sum(e["requests"] for e in snap["per_model"].values()) == 3
    assert snap["per_endpoint"]["ep2"]["retries"] == 1
    assert snap["gen_ai.client.operation.duration"]["max"] == pytest.approx(0.3)
    m.snapshot(reset=True)
    assert m.snapshot()["requests"] == 0


def test_metrics_model_names_are_bounded():
    m = MetricsRecorder(window=10, max_models=5)
    for i in range(50):
        m.record_request("ep", f"model-{i}", True, 0.01)
    assert len(m.snapshot()["per_model"]) <= 6


# ------------------------------------------------------------------ probing
def test_a_circuit_that_flaps_is_probed_less_and_less_often():
    """A healthy probe closes the circuit but real calls fail at once (the health request
    answers, inference does not): each re-open waits twice as long before its first probe,
    up to the flap limit; after a quiet spell the first probe is quick again."""
    clock = FakeClock()
    b = make_breaker(clock, scheduled_probes=True, minimum_calls=2)
    prober = CircuitProber(b, lambda: True, threading.Event(), clock, first_interval=0.5,
                           max_interval=1.0, flap_max_interval=4.0)
    waits = []
    for _ in range(5):
        open_it(b)
        start = clock.monotonic()
        prober._run()  # the probe loop, in this thread: it returns once the probe closed it
        assert b.state == CLOSED
        waits.append(clock.monotonic() - start)
    assert waits == pytest.approx([0.5, 1.0, 2.0, 4.0, 4.0])
    clock.advance(60)  # quiet: it stayed closed
    open_it(b)
    start = clock.monotonic()
    prober._run()
    assert clock.monotonic() - start == pytest.approx(0.5)


def test_a_fail_fast_call_waits_for_probe_windows_no_longer_than_one_longest_backoff():
    """Scheduled probes say "next probe in 0.5 s" each time; against a server that stays down
    a retrying fail-fast call would wait one short window after another until its deadline.
    All its circuit waits together stay within max_retry_delay, then it raises (a router
    fails it over)."""
    clock = FakeClock()

    def attempt(n):
        if n == 0:
            raise errors.ConnectionError("dropped")
        raise errors.CircuitOpenError("open", retry_in=0.5)

    policy = RetryPolicy(max_retries=3, retry_delay=0.1, max_retry_delay=2.0, rng=lambda: 0.0)
    with pytest.raises(errors.CircuitOpenError):
        run_retries(attempt, policy, deadline=clock.monotonic() + 300, clock=clock)
    circuit_waits = clock.sleeps[1:]  # the first sleep is the backoff after the drop
    assert circuit_waits and sum(circuit_waits) <= 2.0
