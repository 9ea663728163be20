"""The adaptive in-flight limit (_core/inflight.py) and what the batcher does when it is
reached (mixins/batching.py). Round trips are set with a fake clock, never slept; the
gathering test gates the double's replies and releases them."""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any, List, Optional, Tuple

import pytest

from ipfs_accelerate_py.api_backends.clock import FakeClock
from ipfs_accelerate_py.api_backends.endpoint_load import LoadReport
from ipfs_accelerate_py.api_backends._core.inflight import InFlightLimit
from ipfs_accelerate_py.api_backends.base import default_transport
from ipfs_accelerate_py.api_backends.errors import TimeoutError
from ipfs_accelerate_py.api_backends.transport import (HttpRequest, HttpResponse, StreamResponse,
                                                        Transport)
from ipfs_accelerate_py.api_backends.vllm import VllmClient

from support import wait_until

P = {"max_tokens": 2, "temperature": 0}


def replies(lim: InFlightLimit, clock: FakeClock, rtt: float, count: int, busy: int) -> None:
    """``count`` rounds of ``busy`` concurrent attempts (at most the limit) that each take
    ``rtt`` seconds: each takes its slot (never waiting: no more than fit), the clock moves
    ``rtt``, each gives it back."""
    async def one_round() -> None:
        keys = [object() for _ in range(min(busy, lim.limit))]
        for key in keys:
            assert await lim.aacquire(clock.monotonic() + 60, key) == 0.0
        clock.advance(rtt)
        for key in keys:
            lim.release(True, key)

    for _ in range(count):
        asyncio.run(one_round())


def test_a_lone_caller_never_moves_the_limit():
    clock = FakeClock()
    lim = InFlightLimit(16, clock, latency=True)
    replies(lim, clock, 0.01, 5, busy=1)
    replies(lim, clock, 1.0, 5, busy=1)  # 100x slower, but one in flight: app-limited
    assert lim.limit == 16


def test_latency_past_the_tolerance_shrinks_the_limit_and_recovery_grows_it():
    clock = FakeClock()
    lim = InFlightLimit(16, clock, latency=True)
    replies(lim, clock, 0.02, 3, busy=12)
    assert lim.limit == 16
    replies(lim, clock, 0.2, 4, busy=12)  # 10x the unloaded round trip: queueing
    low = lim.limit
    assert low < 12 and lim.stats()["decreases"] >= 1
    busy = max(low, 1)
    replies(lim, clock, 0.02, 30, busy=busy)  # fast again, and every slot in use
    assert lim.limit > low and lim.stats()["increases"] >= 1
    assert lim.limit <= 16


def test_a_server_reporting_requests_waiting_shrinks_the_limit():
    clock = FakeClock()
    waiting: List[Optional[float]] = [None]
    stamps = itertools.count()

    def report() -> Optional[LoadReport]:  # a new report with every reply
        return LoadReport(waiting[0], None, float(next(stamps)), "header")
    lim = InFlightLimit(16, clock, load_source=report)
    replies(lim, clock, 0.02, 3, busy=12)
    assert lim.limit == 16
    waiting[0] = 5.0
    replies(lim, clock, 0.02, 3, busy=12)  # latency fine, but the server's queue is not empty
    assert lim.limit < 12
    waiting[0] = 0.0
    before = lim.limit
    replies(lim, clock, 0.02, 20, busy=before)
    assert lim.limit > before


def test_one_load_report_moves_the_limit_once_however_many_replies_read_it():
    """The client asks for a report now and then: many replies finish while one report is
    the freshest. Read by each, one "requests waiting" figure collapsed the limit to 1."""
    clock = FakeClock()
    one = LoadReport(5.0, None, clock.monotonic(), "header")
    lim = InFlightLimit(64, clock, load_source=lambda: one)
    replies(lim, clock, 0.02, 2, busy=64)  # 126 replies, all with the same report
    assert lim.limit == 62 and lim.stats()["decreases"] == 1  # one step down, held there
    one = LoadReport(5.0, None, clock.monotonic() + 1, "header")  # a new one: one more step
    replies(lim, clock, 0.02, 1, busy=62)
    assert lim.limit == 61 and lim.stats()["decreases"] == 2
    one = LoadReport(0.0, None, clock.monotonic() + 2, "header")  # the queue emptied
    replies(lim, clock, 0.02, 2, busy=61)
    assert lim.limit == 64


def test_a_load_source_that_raises_is_no_figure():
    clock = FakeClock()

    def broken() -> LoadReport:
        raise RuntimeError("bad report")

    lim = InFlightLimit(8, clock, load_source=broken)
    replies(lim, clock, 0.02, 3, busy=8)
    assert lim.limit == 8


def test_latency_alone_does_not_move_the_default_limit():
    clock = FakeClock()
    lim = InFlightLimit(16, clock)
    replies(lim, clock, 0.02, 3, busy=12)
    replies(lim, clock, 0.5, 4, busy=12)  # slow replies: faults or other load, by default
    assert lim.limit == 16 and lim.stats()["decreases"] == 0


def test_slow_start_still_ramps_one_per_healthy_reply_to_the_ceiling():
    clock = FakeClock()
    lim = InFlightLimit(4, clock)
    lim.slow_start()
    assert lim.limit == 1
    replies(lim, clock, 5.0, 1, busy=1)
    assert lim.limit == 2
    replies(lim, clock, 5.0, 2, busy=1)
    assert lim.limit == 4
    replies(lim, clock, 0.01, 1, busy=1)
    assert lim.limit == 4


class GatedTransport(Transport):
    """The real transport, with the first ``send`` held at ``gate`` (a fault the test
    releases); ``sent`` lists every completion call's prompt count."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.holding = threading.Event()
        self.sent: List[int] = []
        self._lock = threading.Lock()

    def send(self, request: HttpRequest, timeout: Tuple[float, float]) -> HttpResponse:
        prompt = (request.json or {}).get("prompt")
        with self._lock:
            self.sent.append(len(prompt) if isinstance(prompt, list) else 1)
            first = len(self.sent) == 2  # the one after the warm-up
        if first:
            self.holding.set()
            self.gate.wait(30)
        return self.inner.send(request, timeout)

    def open_stream(self, request: HttpRequest, timeout: Tuple[float, float]) -> StreamResponse:
        return self.inner.open_stream(request, timeout)

    def close(self) -> None:
        self.inner.close()


def test_requests_arriving_while_the_limit_is_reached_join_the_next_shared_call(start_fake):
    """Limit 1 (a slow start), one call held: the 12 requests submitted meanwhile go out as
    ONE call once it returns, not as many small ones, though 32 workers are free."""
    server = start_fake()
    gated: List[GatedTransport] = []

    def factory(settings: Any) -> Transport:
        gated.append(GatedTransport(default_transport(settings)))
        return gated[-1]

    # batch_timeout bounds how long a batch is held open at the limit: ample here
    client = VllmClient(base_url=server.base_url, model="tiny-llama", max_concurrent_requests=32,
                        max_batch_size=32, batch_timeout=10.0, transport_factory=factory)
    try:
        assert client.run_inference(None, "warm", P).text
        client._endpoint(None).limit.slow_start()  # limit 1: the next call fills it
        first = client.submit_inference(None, "first", P)
        assert gated[0].holding.wait(10)
        futures = [client.submit_inference(None, f"later {i}", P) for i in range(12)]
        wait_until(lambda: len(client._endpoint(None).queue) == 0, what="every job taken")
        gated[0].gate.set()
        assert first.result(10).text
        results = [f.result(10) for f in futures]
        assert all(r.usage.completion_tokens == 2 for r in results)
        assert gated[0].sent == [1, 1, 12]
        assert {r.batch_size for r in results} == {12}
        m = client.get_metrics()
        assert m["in_flight"]["default"]["maximum"] == 32 and m["in_flight_limit"]["default"] >= 2
    finally:
        client.close()


def test_a_freed_slot_goes_to_the_caller_that_waited_not_to_one_that_just_arrived():
    """FIFO: the release hands the slot to the queued waiter; a newcomer at that moment
    finds it taken (before, a woken waiter could lose it to callers barging in, again and
    again, until its deadline)."""
    clock = FakeClock()
    lim = InFlightLimit(1, clock)
    got: List[str] = []

    async def main() -> None:
        await lim.aacquire(clock.monotonic() + 60, key="a")

        async def b() -> None:
            await lim.aacquire(clock.monotonic() + 60, key="b")
            got.append("b")
        waiter = asyncio.create_task(b())
        while lim.waiting < 1:
            await asyncio.sleep(0)  # let b queue (a yield, not a timed wait)
        lim.release(True, key="a")
        with pytest.raises(TimeoutError):
            # its deadline is now: no slot free (b was handed the freed one)
            await lim.aacquire(clock.monotonic(), key="newcomer")
        await waiter

    asyncio.run(main())
    assert got == ["b"] and lim.in_flight == 1 and lim.waiting == 0
    lim.release(True, key="b")
    assert lim.in_flight == 0


def test_waiters_are_served_in_line_and_a_cancelled_waiter_leaves_it():
    """Coroutines of any loop wait in one FIFO line (here: a waiter on a loop in another
    thread queued behind two on this one); one cancelled leaves it."""
    clock = FakeClock()
    lim = InFlightLimit(1, clock)
    order: List[str] = []

    async def main() -> None:
        await lim.aacquire(clock.monotonic() + 60, key="holder")
        first = asyncio.create_task(lim.aacquire(clock.monotonic() + 60, key="coro-1"))
        gone = asyncio.create_task(lim.aacquire(clock.monotonic() + 60, key="cancelled"))
        while lim.waiting < 2:
            await asyncio.sleep(0)  # let both tasks queue (a yield, not a timed wait)

        async def elsewhere() -> None:
            await lim.aacquire(clock.monotonic() + 60, key="t")
            order.append("other loop")
        thread = threading.Thread(target=lambda: asyncio.run(elsewhere()))
        thread.start()
        wait_until(lambda: lim.waiting == 3, what="the other loop's waiter queued behind both")
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert lim.waiting == 2  # the cancelled one left the line
        lim.release(True, key="holder")
        await first
        order.append("coro-1")
        assert lim.in_flight == 1 and lim.waiting == 1
        lim.release(True, key="coro-1")  # next in line: the other loop's
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
        lim.release(True, key="t")

    asyncio.run(main())
    assert order == ["coro-1", "other loop"] and lim.in_flight == 0 and lim.waiting == 0
