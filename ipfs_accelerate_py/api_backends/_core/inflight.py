"""The per-endpoint in-flight limit: how many attempts may be on the wire at once.

``max_concurrent_requests`` is the ceiling, not a setting to tune: the limit moves below it
with what the client measures, in the manner of TCP Vegas and of Netflix's gradient
concurrency limit / Envoy's adaptive concurrency filter (our own formulation, not theirs):

- **Latency.** ``min_rtt``, the best round trip of the last ``RTT_WINDOW`` replies, is the
  server's unloaded time; ``rtt``, a moving average, its present one. When ``rtt`` passes
  ``TOLERANCE`` x ``min_rtt`` the server is queueing: the limit shrinks by the ratio
  (at most halving per reply); otherwise it grows by ``sqrt(limit)`` per reply (the
  headroom that finds spare capacity), smoothed so one reply moves it little.
- **The server's own queue.** A fresh ``endpoint-load-metrics`` report (vLLM's
  ``num_requests_waiting``) above zero means the server already holds more than it runs:
  the limit shrinks by ``QUEUE_BACKOFF`` per report and does not grow. Each report moves
  the limit once: replies that finish before the next report arrives do not read the same
  figure again (the client asks for reports now and then, not on every request, so one
  report may be the freshest for a quarter second; read by every reply it halved the limit
  dozens of times over).
- **App-limited.** While fewer than half the slots are used the limit is not binding, so the
  replies say nothing about it and it stays where it is (a lone caller never lowers it).

The latency signal is **off by default** (``latency=True`` turns it on): against the real
server under the fault-mix and routing tests (stalls, a loaded 2-core machine), round trips
inflated by faults and by other load, not by this client's concurrency, shrank the limit
until queued requests timed out (283 of 400 finished; a routed call waited 263 s). The
server's own queue report is a signal of its queue, not of noise, and stays on.

A smaller limit does not turn work away: with batching on, what arrives while the limit is
reached waits in the queue and joins the next shared call (mixins/batching.py), so under
load the client sends fewer, larger prompt lists, which is what costs the server least.

After an outage (the circuit closed again) the limit restarts at one and grows by one with
every healthy reply, so it doubles each round trip, as TCP's slow start does: a server that
just came back is not hit by the whole queue at once. A caller that finds the limit reached
waits for a slot (bounded by its deadline; nothing has been sent). Slots go to waiters
first come, first served (a queue of tickets, one per waiting coroutine): a caller
that arrives when a slot frees cannot take it from one that has waited, so no waiter
starves while others keep the endpoint busy.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Protocol, Tuple

from .loop import MAX_NAP, settle
from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ClientClosedError, TimeoutError

__all__ = ["InFlightLimit", "LoadFigure"]

#: Replies over which the unloaded round trip (the minimum) is taken; older ones age out, so
#: a server that became slower for good is not judged against a time it no longer makes.
RTT_WINDOW = 200
#: How much slower than the unloaded round trip the present one may be before the limit shrinks.
TOLERANCE = 2.0
#: Weight of one reply in the moving average of the round trip, and in the limit's.
RTT_WEIGHT = 0.2
LIMIT_WEIGHT = 0.2
#: Shrink factor per load report that says requests are waiting in the server's queue.
QUEUE_BACKOFF = 0.9


class LoadFigure(Protocol):
    """What the limit reads of a server load report (``endpoint_load.LoadReport`` is one)."""

    @property
    def waiting(self) -> Optional[float]: ...

    @property
    def at(self) -> float: ...


#: Where the server's latest load report comes from (None: not known or not fresh).
LoadSource = Callable[[], Optional[LoadFigure]]
#: ``release``'s default: no report given, ask ``load_source``
_ASK: Any = object()


class _Ticket:
    """One coroutine's place in the FIFO queue for a slot. ``granted`` is set under the
    limit's lock by whoever hands the slot over; ``wake`` then settles the future the
    waiter awaits on its own loop."""

    __slots__ = ("key", "granted", "loop", "future")

    def __init__(self, key: Hashable, loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.granted = False
        self.loop = loop
        self.future: Optional["asyncio.Future[None]"] = loop.create_future()

    def wake(self) -> None:
        """Called with the limit's lock held."""
        if self.future is not None:
            fut = self.future
            try:
                self.loop.call_soon_threadsafe(settle, fut)
            except RuntimeError:  # its loop is closed: nobody is waiting any more
                pass


class InFlightLimit:
    """A counting gate whose size adapts (see the module docstring). Slots are handed out
    first come, first served (``aacquire``: every attempt is a coroutine, on the client's loop
    or an async stream's)."""

    def __init__(self, maximum: int, clock: Clock = SYSTEM_CLOCK,
                 load_source: Optional[LoadSource] = None, latency: bool = False) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        #: woken whenever a slot may have become free (``await_room`` waits there)
        self._room_waiters: List[Tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]] = []
        self.maximum = maximum
        self._limit = float(maximum)
        self._in_flight = 0
        #: whether a new attempt would have to wait for a slot now (``_note_full_locked``)
        self.full = False
        #: whether the server's load report on a reply sent now could move the limit: it
        #: reads one only while at least half its slots are busy (``_adapt``: below that
        #: the callers, not the limit, set the pace), so a lone caller's requests need none,
        #: and asking slows every request that asks (``LoadBoard.read``). A plain attribute,
        #: refreshed with ``full``.
        self.reads_load = False
        self._queue: Deque[_Ticket] = deque()
        self._ramping = False  # slow start after an outage: +1 per healthy reply
        self._sent_at: Dict[Hashable, float] = {}  # slot key -> when its attempt took the slot
        self._rtts: Deque[float] = deque(maxlen=RTT_WINDOW)
        self._rtt: Optional[float] = None
        self._report_used: Optional[float] = None  # ``at`` of the last report that moved it
        self.load_source = load_source
        #: whether the round trip moves the limit (off by default: see the module docstring)
        self.latency = latency
        self.increases = 0
        self.decreases = 0
        self._note_full_locked()  # (``full`` and ``reads_load`` from one formula each)

    @property
    def limit(self) -> int:
        return max(1, int(self._limit))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Callers queued for a slot now."""
        return len(self._queue)

    def _note_full_locked(self) -> None:
        """Refresh ``full`` (called, with the lock held, wherever slots, the queue for them
        or the limit change): a plain attribute, so that batching reads it for free."""
        self.full = bool(self._queue) or self._in_flight >= max(1, int(self._limit))
        self.reads_load = 2 * (self._in_flight + 1) >= self._limit

    def stats(self) -> Dict[str, Optional[float]]:
        """For metrics: the limit, its ceiling, slots used, callers queued, round trips seen."""
        with self._lock:
            return {"limit": self.limit, "maximum": self.maximum, "in_flight": self._in_flight,
                    "queued": len(self._queue),
                    "min_rtt": min(self._rtts) if self._rtts else None, "rtt": self._rtt,
                    "increases": self.increases, "decreases": self.decreases}

    def resize(self, maximum: int) -> None:
        """A new ceiling (``max_concurrent_requests`` changed)."""
        with self._lock:
            self.maximum = maximum
            self._limit = min(self._limit, float(maximum)) if self._ramping else float(maximum)
            self._grant_locked()

    def slow_start(self) -> None:
        """Restart at one slot (the endpoint just came back)."""
        with self._lock:
            self._limit = 1.0
            self._ramping = True
            self._note_full_locked()

    # ------------------------------------------------------------------ taking a slot
    def _take_now_locked(self, key: Hashable, now: float) -> bool:
        if self._queue or self._in_flight >= self.limit:
            return False
        self._in_flight += 1
        self._sent_at[key] = now
        self._note_full_locked()
        return True

    def _grant_locked(self) -> None:
        """Hand free slots to the longest-waiting callers, in order."""
        while self._queue and self._in_flight < self.limit:
            ticket = self._queue.popleft()
            self._in_flight += 1
            self._sent_at[ticket.key] = self._clock.monotonic()
            ticket.granted = True
            ticket.wake()
        if self._in_flight < self.limit and self._room_waiters:
            self._wake_room_locked()
        self._note_full_locked()

    def _give_up_locked(self, ticket: _Ticket) -> None:
        """A waiter leaves (deadline, close, cancelled): out of the queue, or, if the slot
        reached it meanwhile, the slot goes on to the next in line."""
        if ticket.granted:
            self._in_flight -= 1
            self._sent_at.pop(ticket.key, None)
            self._grant_locked()
        else:
            try:
                self._queue.remove(ticket)
            except ValueError:
                pass
            self._note_full_locked()

    def _refusal(self, start: float, now: float) -> TimeoutError:
        return TimeoutError(
            f"waited {now - start:.2f}s for one of the endpoint's {self.limit} in-flight "
            "slots; the call deadline passed before it was sent", sent=False)

    async def aacquire(self, deadline: float, key: Hashable,
                       cancel: Optional[threading.Event] = None,
                       now: Optional[float] = None) -> float:
        """Take a slot; return the seconds waited. Raises ``TimeoutError`` (nothing sent) at
        monotonic ``deadline`` and ``ClientClosedError`` once ``cancel`` is set; waits in
        the FIFO queue without blocking its event loop. ``key`` names the slot for
        ``release`` (one per attempt: an object the caller keeps, since every coroutine of
        a loop shares one thread); ``now``: the
        caller's reading of the clock, when it has one."""
        start = self._clock.monotonic() if now is None else now
        with self._lock:
            if self._take_now_locked(key, start):
                return 0.0
            # (the loop asked only by a caller that waits: on Python 3.11 each asking is a
            # getpid() system call)
            loop = asyncio.get_running_loop()
            ticket = _Ticket(key, loop=loop)
            self._queue.append(ticket)
            self._note_full_locked()
        try:
            while True:
                with self._lock:
                    if ticket.granted:
                        break
                    if cancel is not None and cancel.is_set():
                        raise ClientClosedError("client closed while waiting to send")
                    now = self._clock.monotonic()
                    if now >= deadline:
                        raise self._refusal(start, now)
                    fut = ticket.future
                    if fut is None or fut.done():  # woken without a slot: wait anew
                        fut = ticket.future = loop.create_future()
                await asyncio.wait({fut}, timeout=min(deadline - now, MAX_NAP))
        except BaseException:
            with self._lock:
                self._give_up_locked(ticket)
            raise
        return self._clock.monotonic() - start

    async def await_room(self, deadline: float, cancel: Optional[threading.Event] = None,
                         stop: Optional[Callable[[], bool]] = None) -> None:
        """Wait, taking nothing, until a slot is free and nobody is queued for it (a batch
        gathers meanwhile). Returns quietly at ``deadline``, on ``cancel`` or once ``stop()``
        (checked at least every second): the caller's ``aacquire`` then says why."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if not (self._queue or self._in_flight >= self.limit):
                    return
                if (stop is not None and stop()) or (cancel is not None and cancel.is_set()):
                    return
                now = self._clock.monotonic()
                if now >= deadline:
                    return
                entry = (loop, loop.create_future())
                self._room_waiters.append(entry)
            try:
                await asyncio.wait({entry[1]}, timeout=min(deadline - now, MAX_NAP))
            finally:
                with self._lock:
                    if entry in self._room_waiters:
                        self._room_waiters.remove(entry)

    def _wake_room_locked(self) -> None:
        for loop, fut in self._room_waiters:
            try:
                loop.call_soon_threadsafe(settle, fut)
            except RuntimeError:  # its loop is closed: nobody is waiting any more
                pass
        self._room_waiters.clear()

    # ------------------------------------------------------------------ giving it back
    def release(self, healthy: bool, key: Hashable, now: Optional[float] = None,
                report: Any = _ASK) -> None:
        """Free a slot; a healthy reply's round trip (and a new server load report) move the
        limit. ``key``: the one given to ``aacquire``;
        ``now``: the caller's reading of the clock as the reply came, when it has one;
        ``report``: the server's fresh load report when the caller has read it off the
        reply (the client does: routing keeps it), else ``load_source`` is asked."""
        if not healthy:
            report = None
        elif report is _ASK:
            report = self._server_report()
        with self._lock:
            sent = self._sent_at.pop(key, None)
            busy = self._in_flight
            self._in_flight -= 1
            if healthy:
                if self._ramping:
                    self._limit = min(self._limit + 1.0, float(self.maximum))
                    self._ramping = self._limit < self.maximum
                elif sent is not None:
                    now = self._clock.monotonic() if now is None else now
                    self._adapt(now - sent, busy, self._queue_signal(report))
            self._grant_locked()

    def _queue_signal(self, report: Optional[LoadFigure]) -> Optional[str]:
        """What ``report`` says of the server's queue: "new" (requests waiting, and no earlier
        reply used this report), "held" (the same report again: the limit must not grow
        while it stands, but one observation shrinks it once however many replies finish
        before the next one arrives), or None (no queue). Called with the lock held."""
        if report is None or report.waiting is None or report.waiting <= 0:
            return None
        if report.at == self._report_used:
            return "held"
        self._report_used = report.at
        return "new"

    def _adapt(self, rtt: float, busy: int, queued: Optional[str]) -> None:
        """One reply's verdict (see the module docstring); called with the lock held."""
        self._rtts.append(rtt)
        self._rtt = rtt if self._rtt is None else self._rtt + RTT_WEIGHT * (rtt - self._rtt)
        if busy < self._limit / 2:
            return  # app-limited: the limit was not what held the callers back
        if queued == "held":
            return
        if queued == "new":
            target = self._limit * QUEUE_BACKOFF
        elif not self.latency:
            target = self._limit + math.sqrt(self._limit)  # back toward the ceiling
        else:
            gradient = max(0.5, min(1.0, TOLERANCE * min(self._rtts) / max(self._rtt, 1e-9)))
            target = self._limit * gradient + (math.sqrt(self._limit) if gradient >= 1.0 else 0.0)
        new = self._limit + LIMIT_WEIGHT * (target - self._limit)
        new = max(1.0, min(float(self.maximum), new))
        if int(new) > int(self._limit):
            self.increases += 1
        elif int(new) < int(self._limit):
            self.decreases += 1
        self._limit = new

    def _server_report(self) -> Optional[LoadFigure]:
        if self.load_source is None:
            return None
        try:
            return self.load_source()
        except Exception:  # noqa: BLE001 - a load report must never fail a request
            return None

    def wake(self) -> None:
        """Wake every waiter (the client is closing): each sees ``cancel`` and leaves."""
        with self._lock:
            for ticket in self._queue:
                ticket.wake()
            self._wake_room_locked()
