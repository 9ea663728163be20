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
  ``num_requests_waiting``, read off every reply) above zero means the server already holds
  more than it runs: the limit shrinks by ``QUEUE_BACKOFF`` per reply and does not grow.
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
waits for a slot (bounded by its deadline; nothing has been sent).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Callable, Deque, Dict, Optional

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ClientClosedError, TimeoutError

__all__ = ["InFlightLimit"]

#: Longest single wait on the condition: a bound against a lost wake-up, not a poll interval.
_MAX_NAP = 1.0
#: Replies over which the unloaded round trip (the minimum) is taken; older ones age out, so
#: a server that became slower for good is not judged against a time it no longer makes.
RTT_WINDOW = 200
#: How much slower than the unloaded round trip the present one may be before the limit shrinks.
TOLERANCE = 2.0
#: Weight of one reply in the moving average of the round trip, and in the limit's.
RTT_WEIGHT = 0.2
LIMIT_WEIGHT = 0.2
#: Shrink factor per reply while the server reports requests waiting in its queue.
QUEUE_BACKOFF = 0.9

#: Where the server's latest queue length comes from (None: not known or not fresh).
LoadSource = Callable[[], Optional[float]]


class InFlightLimit:
    """A counting gate whose size adapts (see the module docstring)."""

    def __init__(self, maximum: int, clock: Clock = SYSTEM_CLOCK,
                 load_source: Optional[LoadSource] = None, latency: bool = False) -> None:
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self.maximum = maximum
        self._limit = float(maximum)
        self._in_flight = 0
        self._ramping = False  # slow start after an outage: +1 per healthy reply
        self._sent_at: Dict[int, float] = {}  # thread -> when its attempt took its slot
        self._rtts: Deque[float] = deque(maxlen=RTT_WINDOW)
        self._rtt: Optional[float] = None
        self.load_source = load_source
        #: whether the round trip moves the limit (off by default: see the module docstring)
        self.latency = latency
        self.increases = 0
        self.decreases = 0

    @property
    def limit(self) -> int:
        return max(1, int(self._limit))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def full(self) -> bool:
        """Whether a new attempt would have to wait for a slot now."""
        return self._in_flight >= self.limit

    def stats(self) -> Dict[str, Optional[float]]:
        """For metrics: the limit, its ceiling, slots used, round trips seen (seconds)."""
        with self._cond:
            return {"limit": self.limit, "maximum": self.maximum, "in_flight": self._in_flight,
                    "min_rtt": min(self._rtts) if self._rtts else None, "rtt": self._rtt,
                    "increases": self.increases, "decreases": self.decreases}

    def resize(self, maximum: int) -> None:
        """A new ceiling (``max_concurrent_requests`` changed)."""
        with self._cond:
            self.maximum = maximum
            self._limit = min(self._limit, float(maximum)) if self._ramping else float(maximum)
            self._cond.notify_all()

    def slow_start(self) -> None:
        """Restart at one slot (the endpoint just came back)."""
        with self._cond:
            self._limit = 1.0
            self._ramping = True

    def acquire(self, deadline: float, cancel: Optional[threading.Event] = None) -> float:
        """Take a slot; return the seconds waited. Raises ``TimeoutError`` (nothing sent) at
        monotonic ``deadline`` and ``ClientClosedError`` once ``cancel`` is set."""
        start = self._clock.monotonic()
        with self._cond:
            self._wait_locked(start, deadline, cancel)
            self._in_flight += 1
            now = self._clock.monotonic()
            self._sent_at[threading.get_ident()] = now
        return now - start

    def wait_for_room(self, deadline: float, cancel: Optional[threading.Event] = None,
                      stop: Optional[Callable[[], bool]] = None) -> None:
        """Wait, taking nothing, until a slot is free (a batch gathers meanwhile). Returns
        quietly at ``deadline``, on ``cancel`` or once ``stop()`` (checked at least every
        second): the caller's ``acquire`` then says why."""
        try:
            with self._cond:
                self._wait_locked(self._clock.monotonic(), deadline, cancel, stop)
        except (TimeoutError, ClientClosedError):
            pass

    def _wait_locked(self, start: float, deadline: float, cancel: Optional[threading.Event],
                     stop: Optional[Callable[[], bool]] = None) -> None:
        while self._in_flight >= self.limit:
            if stop is not None and stop():
                return
            if cancel is not None and cancel.is_set():
                raise ClientClosedError("client closed while waiting to send")
            now = self._clock.monotonic()
            if now >= deadline:
                raise TimeoutError(
                    f"waited {now - start:.2f}s for one of the endpoint's {self.limit} "
                    "in-flight slots; the call deadline passed before it was sent",
                    sent=False)
            self._cond.wait(min(deadline - now, _MAX_NAP))

    def release(self, healthy: bool) -> None:
        """Free a slot; a healthy reply's round trip (and the server's queue) move the limit."""
        waiting = self._server_waiting() if healthy else None
        with self._cond:
            sent = self._sent_at.pop(threading.get_ident(), None)
            busy = self._in_flight
            self._in_flight -= 1
            before = self.limit
            if healthy:
                if self._ramping:
                    self._limit = min(self._limit + 1.0, float(self.maximum))
                    self._ramping = self._limit < self.maximum
                elif sent is not None:
                    self._adapt(self._clock.monotonic() - sent, busy, waiting)
            if self.limit > before:
                self._cond.notify_all()
            else:
                self._cond.notify()

    def _adapt(self, rtt: float, busy: int, waiting: Optional[float]) -> None:
        """One reply's verdict (see the module docstring); called with the lock held."""
        self._rtts.append(rtt)
        self._rtt = rtt if self._rtt is None else self._rtt + RTT_WEIGHT * (rtt - self._rtt)
        if busy < self._limit / 2:
            return  # app-limited: the limit was not what held the callers back
        if waiting is not None and waiting > 0:
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

    def _server_waiting(self) -> Optional[float]:
        if self.load_source is None:
            return None
        try:
            return self.load_source()
        except Exception:  # noqa: BLE001 - a load report must never fail a request
            return None

    def wake(self) -> None:
        """Wake every waiter (the client is closing)."""
        with self._cond:
            self._cond.notify_all()
