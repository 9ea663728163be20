"""Time as a dependency, so breaker, retry, queue aging and batching tests need no sleeps."""

from __future__ import annotations

import threading
import time
from typing import Optional

__all__ = ["Clock", "SystemClock", "FakeClock", "SYSTEM_CLOCK"]


class Clock:
    """``monotonic()`` for durations, ``wall()`` for timestamps, ``sleep()`` that can be cut short."""

    #: True for a clock that moves only when told (a test's): a coroutine's wait then
    #: moves it through ``sleep`` instead of waiting on the event loop's timer
    virtual = False

    def monotonic(self) -> float:
        raise NotImplementedError

    def wall(self) -> float:
        raise NotImplementedError

    def sleep(self, seconds: float, cancel: Optional[threading.Event] = None) -> bool:
        """Wait ``seconds``; return False at once if ``cancel`` is set (client closing)."""
        raise NotImplementedError


class SystemClock(Clock):
    # The library's own functions, bound as they are: a reading is the C call itself, not a
    # Python frame in this module (a request reads the clock about ten times).
    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    def sleep(self, seconds: float, cancel: Optional[threading.Event] = None) -> bool:
        if seconds <= 0:
            return not (cancel and cancel.is_set())
        if cancel is None:
            time.sleep(seconds)
            return True
        return not cancel.wait(seconds)


class FakeClock(Clock):
    """A clock that only moves when told to; ``sleep`` advances it and records the wait."""

    virtual = True

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: "list[float]" = []
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds

    def sleep(self, seconds: float, cancel: Optional[threading.Event] = None) -> bool:
        if cancel is not None and cancel.is_set():
            return False
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        return True


SYSTEM_CLOCK = SystemClock()
