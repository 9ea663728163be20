"""A sync stream's reader: a task on the client's loop reads the reply, a thread consumes it.

Why: the waiting of a stream (for the breaker, a slot, a retry's backoff, the next bytes) is
written once, as coroutines (mixins/attempt.py, async_face.py). A sync caller's stream is
opened by the same coroutines on the client's loop; then a reader task there reads the
reply and parses it, and hands each network read's chunks to the caller's thread through a
``Feed``, a thread-safe queue the caller blocks on. One hand-over per network read, not one
loop round trip per chunk; the caller's thread wakes only when there is something for it.

The reader reads ahead at most ``HIGH`` reads: past that it waits for the consumer (a slow
caller does not make the client hold a whole reply). Its reads carry the transport's read
timeout, so the idle timeout is the transport's; the consumer's wait is bounded besides
(``idle + GRACE``) so that no caller hangs if the loop does. Closing early cancels the
reader on the loop, which closes the connection (vLLM then aborts the generation).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator, Deque, Dict, Iterator, List, Optional

from .. import errors
from .._core.loop import MAX_NAP, ClientLoop, Signal, call_soon_from_afar
from ..models import Request, StreamChunk
from ..sse import SSEDecoder

if TYPE_CHECKING:
    from ..transport import AsyncStream

__all__ = ["Feed", "Reader", "ReplyChunks", "Wakes", "read_reply", "HIGH"]

#: Network reads a reader may be ahead of its consumer before it waits for it.
HIGH = 64
#: Seconds past the idle timeout a consumer waits for its reader before it gives up.
GRACE = 5.0
#: How long a consumer that closes early waits for its reader to have closed the connection.
_CLOSE_WAIT = 2.0


class Feed:
    """One sync consumer's queue: batches of chunks put on the loop, taken in its thread.

    ``room`` is the reader's wake-up when the consumer has taken enough (a group of shared
    streams has one reader, so its members' feeds share one)."""

    def __init__(self, room: Signal, idle: float) -> None:
        self._lock = threading.Lock()
        # A sync consumer sleeps on ``_bell``, a lock held while nobody rang it, rather than
        # on a ``threading.Condition``: the consumer waits once per network read, and a
        # condition's wait is a new lock and a dozen Python calls each time. ``_sleeping``
        # (under ``_lock``) says it sleeps; whoever rings clears it, so a ring is never
        # given twice and a consumer that timed out takes a ring that came meanwhile.
        self._bell = threading.Lock()
        self._bell.acquire()
        self._sleeping = False
        self._items: Deque[List[StreamChunk]] = deque()
        self._ended = False
        self._error: Optional[BaseException] = None
        self._room = room
        self._idle = idle
        self._heard = time.monotonic()  # the reader's last put, end or touch
        #: an async consumer's wake-up (a future of its own loop), while it waits
        self._waiter: "Optional[asyncio.Future[None]]" = None
        #: an async consumer's idle alarm (``_alarm_due``) and the loop it is armed on: one
        #: timer for a whole run of waits, not one made and cancelled per network read
        self._alarm: Optional[asyncio.TimerHandle] = None
        self._alarm_loop: Optional[asyncio.AbstractEventLoop] = None
        self.closed = False  # the consumer left: nothing more is put

    # -- the reader's side (on the loop)
    def put(self, batch: List[StreamChunk], wakes: Optional["Wakes"] = None) -> None:
        """Queue ``batch`` for the consumer and wake it; an async consumer's wake-up goes
        into ``wakes`` when given (a reader that feeds many consumers wakes each of their
        loops once per network read, not once per consumer)."""
        if not batch:
            return
        with self._lock:
            if self.closed or self._ended:
                return
            self._items.append(batch)
            self._heard = time.monotonic()
            if self._sleeping:
                self._ring_locked()
            if self._waiter is not None:
                self._wake_async(wakes)

    def touch(self) -> None:
        """The reply goes on, with nothing for this consumer yet: its idle wait restarts.
        (One float written: no lock needed for a reader that compares it.)"""
        self._heard = time.monotonic()

    def _wake_async(self, wakes: Optional["Wakes"] = None) -> None:
        """(lock held) Wake an async consumer waiting on its own loop, now or, given
        ``wakes``, when they are flushed."""
        waiter, self._waiter = self._waiter, None
        if waiter is None:
            return
        if wakes is not None:
            wakes.add(waiter)
        else:  # (its loop closed: nobody is left to wake)
            call_soon_from_afar(waiter.get_loop(), _settle, waiter)

    def end(self, error: Optional[BaseException] = None) -> None:
        """No more chunks: the reply's end (``error`` None) or its failure."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            self._error = error
            if self._sleeping:
                self._ring_locked()
            self._wake_async()

    def _ring_locked(self) -> None:
        """(lock held, the consumer sleeping) wake the sync consumer."""
        self._sleeping = False
        self._bell.release()

    @property
    def full(self) -> bool:
        return len(self._items) >= HIGH and not self.closed and not self._ended

    # -- the consumer's side (its own thread)
    def get(self) -> Optional[List[StreamChunk]]:
        """The next batch; None at the end; raises the reply's error. Waits at most the idle
        timeout plus ``GRACE`` for something to come."""
        with self._lock:
            since = time.monotonic()
            while not self._items:
                if self._error is not None:
                    raise self._error
                if self._ended:
                    return None
                left = self._idle_left(since)
                self._sleeping = True
                rung = False
                self._lock.release()
                try:
                    rung = self._bell.acquire(timeout=min(left, MAX_NAP))
                finally:
                    self._lock.acquire()
                    if self._sleeping:  # nobody rang: it stops sleeping by itself
                        self._sleeping = False
                    elif not rung:  # rung after its wait timed out: the ring is taken now
                        self._bell.acquire()
            return self._take_locked()

    async def aget(self, loop: Optional[asyncio.AbstractEventLoop] = None
                   ) -> Optional[List[StreamChunk]]:
        """``get`` for a coroutine on any event loop (``loop``: the running one, when the
        caller has it at hand): waits without blocking it."""
        since = time.monotonic()
        while True:
            with self._lock:
                if self._items:
                    return self._take_locked()
                if self._error is not None:
                    raise self._error
                if self._ended:
                    return None
                left = self._idle_left(since)
                if loop is None:  # (on Python 3.11 asking is a getpid() system call)
                    loop = asyncio.get_running_loop()
                waiter: "asyncio.Future[None]" = loop.create_future()
                self._waiter = waiter
            # The idle bound: an alarm that wakes the waiter as a put would, no later than
            # ``left`` from when it was armed (so never after the deadline; a later put only
            # moves the deadline on), and is re-armed when it rings. Armed once per run of
            # waits, not made and cancelled per network read (a timer's heap work, a third
            # of a wait's cost).
            alarm = self._alarm
            if alarm is None or alarm.cancelled() or self._alarm_loop is not loop:
                self._alarm = loop.call_later(min(left, MAX_NAP), self._alarm_due)
                self._alarm_loop = loop
            try:
                await waiter
            finally:
                with self._lock:
                    if self._waiter is waiter:
                        self._waiter = None

    def _alarm_due(self) -> None:
        """(On the consumer's loop) the idle alarm: the waiter, if any, wakes and looks at
        the clock (``_idle_left``); its next wait arms the alarm again."""
        self._alarm = None
        with self._lock:
            waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _idle_left(self, since: float) -> float:
        """(lock held) Seconds this consumer may still wait; raises past the idle timeout
        (plus ``GRACE``) counted from its wait's start or the reader's last word."""
        left = max(since, self._heard) + self._idle + GRACE - time.monotonic()
        if left <= 0:
            raise errors.TimeoutError(
                f"stream idle timeout: nothing from the reader within {self._idle:.1f}s "
                f"(+{GRACE:.0f}s)")
        return left

    def _take_locked(self) -> List[StreamChunk]:
        batch = self._items.popleft()
        if len(self._items) == HIGH // 2:
            self._room.set()
        return batch

    def chunks(self) -> Iterator[StreamChunk]:
        """Every chunk in order, to the end (or the error)."""
        while True:
            batch = self.get()
            if batch is None:
                return
            yield from batch

    async def achunks(self) -> AsyncIterator[StreamChunk]:
        """``chunks`` for a coroutine."""
        loop = asyncio.get_running_loop()  # asked once per stream, not once per wait
        while True:
            batch = await self.aget(loop)
            if batch is None:
                return
            for chunk in batch:
                yield chunk

    def leave(self) -> None:
        """The consumer is gone: drop what is queued."""
        with self._lock:
            self.closed = True
            self._items.clear()
        self._room.set()


def _settle(waiter: "asyncio.Future[None]") -> None:
    if not waiter.done():
        waiter.set_result(None)


def _settle_all(waiters: List["asyncio.Future[None]"]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


class Wakes:
    """Async consumers to wake after one network read, grouped by their event loop: one
    call per loop (``call_soon_from_afar``: at most one write to its wake-up socket while
    it has not woken yet), however many of its consumers the read fed. Thirty-two shared
    streams on one loop otherwise cost thirty-two calls per token step."""

    __slots__ = ("_by_loop",)

    def __init__(self) -> None:
        self._by_loop: Dict[asyncio.AbstractEventLoop, List["asyncio.Future[None]"]] = {}

    def add(self, waiter: "asyncio.Future[None]") -> None:
        self._by_loop.setdefault(waiter.get_loop(), []).append(waiter)

    def flush(self) -> None:
        """Wake them (idempotent: what was woken is forgotten)."""
        by_loop, self._by_loop = self._by_loop, {}
        for loop, waiters in by_loop.items():  # (a closed loop: nobody is left to wake)
            call_soon_from_afar(loop, _settle_all, waiters)


async def wait_for_room(feeds: List[Feed], room: Signal) -> None:
    """Wait while every feed still wanted is full (a consumer that reads lets it go on)."""
    while True:
        wanted = [f for f in feeds if not f.closed]
        if not wanted or not all(f.full for f in wanted):
            return
        await room.wait(MAX_NAP)


class ReplyChunks:
    """One streamed reply's bytes -> its chunks, for both faces (``TextStream._chunks``
    reads the sync transport, the async face's stream awaits aiohttp's): ``feed`` yields
    each network read's chunks in order, one event at a time (so a bad event raises after
    the good ones before it were taken: they count in ``partial_text``) and sets
    ``ended`` at the end marker; ``finish`` checks what the reply left when it closed."""

    def __init__(self, adapter: Any, request: Request) -> None:
        self._parse = adapter.stream_parser(request)
        self._decoder = SSEDecoder()
        self.ended = False

    def feed(self, raw: bytes) -> Iterator[StreamChunk]:
        for data in self._decoder.feed(raw):
            parsed = self._parse(data)
            if parsed is None:
                self.ended = True
                return
            yield from parsed

    def finish(self) -> None:
        """The reply closed without the end marker in a read: fine if its unterminated
        last event was the marker, else ``ResponseError`` (the reply is incomplete)."""
        for data in self._decoder.flush():
            if self._parse(data) is None:
                return
        raise errors.ResponseError("stream ended without its end marker ([DONE]); "
                                   "the reply is incomplete")


async def read_reply(response: "AsyncStream", adapter: Any, request: Any, feed: Feed, room: Signal) -> None:
    """The reader of one stream: network reads -> parsed chunks -> ``feed``, until the end
    marker, an error (after the good chunks before it), or cancellation (the consumer left).
    The response is closed when it returns, so the consumer that sees the end finds the
    connection already released."""
    reply = ReplyChunks(adapter, request)
    pieces = response.chunks()
    error: Optional[BaseException] = None
    try:
        async for raw in pieces:
            batch: List[StreamChunk] = []
            try:
                for chunk in reply.feed(raw):
                    batch.append(chunk)
            finally:
                feed.put(batch)  # the good chunks before a bad event count too
            if reply.ended or feed.closed:
                break
            await wait_for_room([feed], room)
        else:
            reply.finish()
    except asyncio.CancelledError:
        error = errors.ClientClosedError("the stream was cancelled (client closed)")
        raise
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer
        error = exc
    finally:
        try:
            await pieces.aclose()
        finally:
            try:
                await response.aclose()
            finally:
                feed.end(error)


class Reader:
    """A sync stream's hold on its reader task: ``close`` (any thread) stops it and drops the
    connection; from a thread other than the loop's it waits (briefly) until that is done."""

    __slots__ = ("feed", "_loop", "_response", "_task", "_done")

    def __init__(self, loop: ClientLoop, response: "AsyncStream", feed: Feed) -> None:
        self.feed = feed
        self._loop = loop
        self._response = response
        self._task: "Optional[asyncio.Task[None]]" = None
        self._done = threading.Event()

    def start(self, coro: Any) -> None:
        """On the loop: run ``coro`` (the reader) as a task."""
        self._task = task = self._loop.start(coro)
        task.add_done_callback(lambda _: self._done.set())

    def wait(self, timeout: float) -> bool:
        """Until the reader has ended (from a thread other than the loop's)."""
        return self._done.wait(timeout)

    def _cancel(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        else:
            self._response.close()

    def close(self, wait: bool = True) -> None:
        """Stop reading: the reader is cancelled on the loop (idempotent)."""
        self.feed.leave()
        if self._done.is_set():
            return
        self._loop.call_soon(self._cancel)
        if wait and not self._loop.in_loop() and self._loop.loop.is_running():
            self._done.wait(_CLOSE_WAIT)
