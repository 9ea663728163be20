"""The per-endpoint in-flight limit: how many attempts may be on the wire at once.

``max_concurrent_requests`` is the ceiling. After an outage (the circuit closed again) the
limit restarts at one and grows by one with every healthy reply, so it doubles each round
trip, as TCP's slow start does: a server that just came back is not hit by the whole queue
at once, and reaches full concurrency within a few round trips. A caller that finds the
limit reached waits for a slot (bounded by its deadline; nothing has been sent).
"""

from __future__ import annotations

import threading
from typing import Optional

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ClientClosedError, TimeoutError

__all__ = ["InFlightLimit"]

#: Longest single wait on the condition: a bound against a lost wake-up, not a poll interval.
_MAX_NAP = 1.0


class InFlightLimit:
    """A counting gate whose size can restart low and ramp up (see the module docstring)."""

    def __init__(self, maximum: int, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self.maximum = maximum
        self._limit = maximum
        self._in_flight = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def resize(self, maximum: int) -> None:
        """A new ceiling (``max_concurrent_requests`` changed)."""
        with self._cond:
            ramping = self._limit < self.maximum
            self.maximum = maximum
            self._limit = min(self._limit, maximum) if ramping else maximum
            self._cond.notify_all()

    def slow_start(self) -> None:
        """Restart at one slot (the endpoint just came back)."""
        with self._cond:
            self._limit = 1

    def acquire(self, deadline: float, cancel: Optional[threading.Event] = None) -> float:
        """Take a slot; return the seconds waited. Raises ``TimeoutError`` (nothing sent) at
        monotonic ``deadline`` and ``ClientClosedError`` once ``cancel`` is set."""
        start = self._clock.monotonic()
        with self._cond:
            while self._in_flight >= self._limit:
                if cancel is not None and cancel.is_set():
                    raise ClientClosedError("client closed while waiting to send")
                now = self._clock.monotonic()
                if now >= deadline:
                    raise TimeoutError(
                        f"waited {now - start:.2f}s for one of the endpoint's {self._limit} "
                        "in-flight slots; the call deadline passed before it was sent",
                        sent=False)
                self._cond.wait(min(deadline - now, _MAX_NAP))
            self._in_flight += 1
        return self._clock.monotonic() - start

    def release(self, healthy: bool) -> None:
        """Free a slot; a healthy reply grows a ramping limit by one."""
        with self._cond:
            self._in_flight -= 1
            if healthy and self._limit < self.maximum:
                self._limit += 1
                self._cond.notify_all()
            else:
                self._cond.notify()

    def wake(self) -> None:
        """Wake every waiter (the client is closing)."""
        with self._cond:
            self._cond.notify_all()
