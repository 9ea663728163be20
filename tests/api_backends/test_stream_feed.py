"""A stream's ``Feed`` between its reader (the client's loop) and an async consumer (its
own loop), and ``Wakes``: a reader that feeds many consumers wakes each of their loops
once per network read, and a consumer never misses what was put for it."""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional

import pytest

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends._core.loop import ClientLoop, Signal
from ipfs_accelerate_py.api_backends._streaming import pump
from ipfs_accelerate_py.api_backends._streaming.pump import Feed, Wakes
from ipfs_accelerate_py.api_backends.models import StreamChunk


def _waiting(feed: Feed) -> Optional["asyncio.Future[None]"]:
    return feed._waiter  # the consumer's wake-up, set while it waits


def _start_waiting(loop: asyncio.AbstractEventLoop, feeds: List[Feed]) -> List[Any]:
    """Each feed's consumer as a task on ``loop``, run until it waits (one step: it finds
    nothing, registers its wake-up under the feed's lock and awaits it)."""
    tasks = [loop.create_task(f.aget()) for f in feeds]
    loop.run_until_complete(asyncio.sleep(0))
    assert all(_waiting(f) is not None and not t.done() for f, t in zip(feeds, tasks))
    return tasks


@pytest.fixture
def client_loop():
    loop = ClientLoop("test-feed")
    yield loop
    loop.stop(5)


@pytest.mark.parametrize("consumers", [1, 8, 32])
def test_one_flush_wakes_every_consumer_of_a_loop_with_its_own_batch(client_loop,
                                                                     consumers: int) -> None:
    room = Signal(client_loop)
    feeds = [Feed(room, idle=30.0) for _ in range(consumers)]
    theirs = asyncio.new_event_loop()
    try:
        tasks = _start_waiting(theirs, feeds)
        waiters = [_waiting(f) for f in feeds]
        wakes = Wakes()
        for i, f in enumerate(feeds):
            f.put([StreamChunk(index=0, text=f"t{i}")], wakes)
        theirs.run_until_complete(asyncio.sleep(0))
        # nobody is woken before the flush: the wake-ups wait in ``wakes``
        assert all(w is not None and not w.done() for w in waiters)
        assert not any(t.done() for t in tasks)
        wakes.flush()
        got = theirs.run_until_complete(asyncio.gather(*tasks))
        assert [batch[0].text for batch in got] == [f"t{i}" for i in range(consumers)]
        wakes.flush()  # idempotent: nothing left to wake
    finally:
        theirs.close()


def test_consumers_on_two_loops_are_each_woken_and_a_closed_loop_is_skipped(client_loop) -> None:
    room = Signal(client_loop)
    a, b, gone = asyncio.new_event_loop(), asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        fa, fb = Feed(room, 30.0), Feed(room, 30.0)
        (ta,), (tb,) = _start_waiting(a, [fa]), _start_waiting(b, [fb])
        wakes = Wakes()
        wakes.add(gone.create_future())  # a consumer whose loop has closed since
        gone.close()
        fa.put([StreamChunk(text="a")], wakes)
        fb.put([StreamChunk(text="b")], wakes)
        wakes.flush()  # no error for the closed loop
        assert a.run_until_complete(ta)[0].text == "a"
        assert b.run_until_complete(tb)[0].text == "b"
    finally:
        a.close()
        b.close()


def test_a_put_before_the_consumer_waits_is_taken_without_a_wake(client_loop) -> None:
    feed = Feed(Signal(client_loop), 30.0)
    wakes = Wakes()
    feed.put([StreamChunk(text="early")], wakes)
    feed.end()

    async def read() -> List[str]:
        return [c.text async for c in feed.achunks()]
    assert asyncio.run(read()) == ["early"]


def test_an_idle_feed_ends_its_async_consumer_with_a_timeout(client_loop) -> None:
    """The bare timer that replaced ``wait_for`` still bounds the wait: nothing put, the
    consumer's ``aget`` raises once the idle timeout plus the grace has passed (set here
    to 50 ms in all)."""
    feed = Feed(Signal(client_loop), idle=0.05 - pump.GRACE)
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(feed.aget())
        loop.run_until_complete(asyncio.sleep(0))
        assert _waiting(feed) is not None and not task.done()  # it waits on its timer
        with pytest.raises(errors.TimeoutError):
            loop.run_until_complete(task)
    finally:
        loop.close()


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_a_feed_that_falls_silent_after_puts_still_times_out(client_loop, kind: str) -> None:
    """The idle alarm is armed once for a run of waits (not per wait), and remembered with
    the loop it was armed on (uvloop's timers do not say theirs): a consumer woken by puts
    several times, then given nothing more, still ends with the timeout."""
    if kind == "uvloop":  # a dependency wherever it installs (CPython, not Windows)
        new_loop = pytest.importorskip("uvloop").new_event_loop
    else:
        new_loop = asyncio.new_event_loop
    feed = Feed(Signal(client_loop), idle=0.05 - pump.GRACE)
    loop = new_loop()
    try:
        for text in ("a", "b", "c"):
            task = loop.create_task(feed.aget())
            loop.run_until_complete(asyncio.sleep(0))
            assert _waiting(feed) is not None and not task.done()
            client_loop.call_soon(feed.put, [StreamChunk(text=text)])
            assert [c.text for c in loop.run_until_complete(task)] == [text]
        with pytest.raises(errors.TimeoutError):
            loop.run_until_complete(feed.aget())
    finally:
        loop.close()


@pytest.mark.parametrize("seed", range(5))
def test_a_sync_consumer_gets_every_batch_in_order_whatever_the_timing(client_loop, seed) -> None:
    """A sync consumer sleeps on the feed's bell: batches put from the loop's thread while it
    sleeps, while it is awake, or as its wait ends are each taken once, in order, and the
    end reaches it (seeded: the puts come in bursts of random size)."""
    import random
    import threading
    rng = random.Random(seed)
    feed = Feed(Signal(client_loop), idle=30.0)
    texts = [str(i) for i in range(400)]
    bursts: List[List[str]] = []
    at = 0
    while at < len(texts):
        n = rng.randint(1, 6)
        bursts.append(texts[at:at + n])
        at += n
    got: List[str] = []
    consumer = threading.Thread(target=lambda: got.extend(c.text for c in feed.chunks()))
    consumer.start()
    for burst in bursts:
        for text in burst:
            client_loop.call_soon(feed.put, [StreamChunk(text=text)])
    client_loop.call_soon(feed.end)
    consumer.join(10)
    assert not consumer.is_alive() and got == texts


def test_an_idle_feed_ends_its_sync_consumer_with_a_timeout(client_loop) -> None:
    """Nothing put: the sync consumer's ``get`` raises once the idle timeout plus the grace
    has passed (50 ms in all), after a batch that woke it."""
    import threading
    feed = Feed(Signal(client_loop), idle=0.05 - pump.GRACE)
    outcome: List[Any] = []

    def consume() -> None:
        try:
            outcome.append([c.text for c in feed.get() or []])
            feed.get()
        except errors.TimeoutError as exc:
            outcome.append(exc)
    consumer = threading.Thread(target=consume)
    consumer.start()
    client_loop.call_soon(feed.put, [StreamChunk(text="x")])
    consumer.join(10)
    assert outcome[0] == ["x"] and isinstance(outcome[1], errors.TimeoutError)


def test_a_consumer_cancelled_mid_wait_leaves_the_feed_usable_on_another_loop(client_loop) -> None:
    """A waiting consumer cancelled (its caller left) clears its wake-up; the feed's idle
    alarm, armed on that loop, does not serve a consumer on another loop: a later consumer
    elsewhere gets what is put, and its own idle bound still ends a silence."""
    feed = Feed(Signal(client_loop), idle=0.05 - pump.GRACE)
    first = asyncio.new_event_loop()
    try:
        task = first.create_task(feed.aget())
        first.run_until_complete(asyncio.sleep(0))
        assert _waiting(feed) is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            first.run_until_complete(task)
        assert _waiting(feed) is None
    finally:
        first.close()  # its alarm, if still armed, never rings

    async def later() -> List[Any]:
        got = [c.text for c in await feed.aget() or []]
        try:
            await feed.aget()
        except errors.TimeoutError as exc:
            return [got, exc]
        return [got, None]

    second = asyncio.new_event_loop()
    try:
        task = second.create_task(later())
        second.run_until_complete(asyncio.sleep(0))
        client_loop.call_soon(feed.put, [StreamChunk(text="late")])
        got, error = second.run_until_complete(task)
        assert got == ["late"] and isinstance(error, errors.TimeoutError)
    finally:
        second.close()
