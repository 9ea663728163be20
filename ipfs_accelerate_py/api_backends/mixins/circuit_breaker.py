"""Circuit breaker, one per endpoint: stop sending to a server that is failing.

States: ``CLOSED`` (normal) -> ``OPEN`` when the failure rate over the last
``window_size`` calls reaches ``failure_rate_threshold`` (once ``minimum_calls`` were seen)
or after ``failure_threshold`` consecutive failures. ``OPEN`` rejects at once with
``CircuitOpenError`` (nothing is sent). After ``reset_timeout`` the breaker is
``HALF-OPEN``: up to ``half_open_max_calls`` probes go through; a success closes it, a
failure opens it again.

Only server faults count (5xx, connection errors, timeouts): a 400 for a too-long prompt
is the caller's fault and proves the server is alive. The lock guards state only; it is
never held across an HTTP call.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import CircuitOpenError, ConfigurationError

__all__ = ["CircuitBreaker", "CircuitBreakerMixin", "CLOSED", "OPEN", "HALF_OPEN"]

CLOSED, OPEN, HALF_OPEN = "CLOSED", "OPEN", "HALF-OPEN"


class CircuitBreaker:
    """Thread-safe breaker; ``before_call`` admits or rejects, ``record_*`` report outcomes."""

    def __init__(self, failure_threshold: int = 5, reset_timeout: float = 30.0,
                 failure_rate_threshold: float = 0.5, window_size: int = 20,
                 minimum_calls: int = 10, half_open_max_calls: int = 1,
                 clock: Clock = SYSTEM_CLOCK, name: str = "",
                 on_transition: Optional[Callable[[str, str, str], None]] = None) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.failure_rate_threshold = failure_rate_threshold
        self.minimum_calls = minimum_calls
        self.half_open_max_calls = half_open_max_calls
        self.name = name
        self._clock = clock
        self._on_transition = on_transition
        self._lock = threading.Lock()
        self._state = CLOSED
        self._window: Deque[bool] = deque(maxlen=window_size)  # True = failure
        self._window_failures = 0
        self._consecutive = 0
        self._opened_at = 0.0
        self._probes = 0
        self.transitions: List[Tuple[float, str, str]] = []  # bounded below

    # -- reading -------------------------------------------------------------------------
    @property
    def state(self) -> str:
        with self._lock:
            self._maybe_half_open()
            return self._state

    @property
    def failure_count(self) -> int:
        """Consecutive server failures seen (0 after any success)."""
        return self._consecutive

    def retry_in(self) -> float:
        """Seconds until an OPEN breaker lets a probe through (0 when not OPEN)."""
        with self._lock:
            if self._state != OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.reset_timeout - self._clock.monotonic())

    # -- admitting -----------------------------------------------------------------------
    def before_call(self) -> bool:
        """Admit a call or raise ``CircuitOpenError``. Returns True if it is a HALF-OPEN probe."""
        with self._lock:
            self._maybe_half_open()
            if self._state == CLOSED:
                return False
            if self._state == HALF_OPEN and self._probes < self.half_open_max_calls:
                self._probes += 1
                return True
            wait = max(0.0, self._opened_at + self.reset_timeout - self._clock.monotonic())
        what = "OPEN" if self._state == OPEN else "HALF-OPEN (probe in flight)"
        raise CircuitOpenError(
            f"circuit breaker for {self.name or 'endpoint'} is {what}; next probe in {wait:.2f}s",
            retry_at=self._clock.wall() + wait, retry_in=wait, endpoint=self.name)

    def record_success(self, probe: bool = False) -> None:
        with self._lock:
            self._consecutive = 0
            if self._state == HALF_OPEN:
                self._probes = max(0, self._probes - 1) if probe else self._probes
                self._transition(CLOSED)
                return
            if self._state == CLOSED:
                self._push(False)
                self._evaluate()

    def record_failure(self, probe: bool = False) -> None:
        with self._lock:
            self._consecutive += 1
            if self._state == HALF_OPEN:
                self._probes = max(0, self._probes - 1) if probe else self._probes
                self._transition(OPEN)
                return
            if self._state == OPEN:
                return
            self._push(True)
            self._evaluate()

    def release(self, probe: bool) -> None:
        """A probe that ended without a verdict (cancelled): free its slot."""
        if probe:
            with self._lock:
                self._probes = max(0, self._probes - 1)

    def reset(self) -> None:
        """Force CLOSED and forget history (README: ``client.circuit_state = "CLOSED"``)."""
        with self._lock:
            self._consecutive = 0
            self._window.clear()
            self._window_failures = 0
            self._probes = 0
            if self._state != CLOSED:
                self._transition(CLOSED)

    # -- internals (lock held) -----------------------------------------------------------
    def _evaluate(self) -> None:
        """Open on N consecutive failures, or on the window's failure rate (after every call)."""
        n = len(self._window)
        if (self._consecutive >= self.failure_threshold
                or (n >= self.minimum_calls
                    and self._window_failures / n >= self.failure_rate_threshold)):
            self._transition(OPEN)

    def _push(self, failure: bool) -> None:
        if len(self._window) == self._window.maxlen and self._window[0]:
            self._window_failures -= 1
        self._window.append(failure)
        if failure:
            self._window_failures += 1

    def _maybe_half_open(self) -> None:
        if self._state == OPEN and self._clock.monotonic() - self._opened_at >= self.reset_timeout:
            self._transition(HALF_OPEN)

    def _transition(self, new: str) -> None:
        old, self._state = self._state, new
        if new == OPEN:
            self._opened_at = self._clock.monotonic()
            self._probes = 0
        if new in (CLOSED, HALF_OPEN):
            self._window.clear()
            self._window_failures = 0
            self._probes = 0
        self.transitions.append((self._clock.wall(), old, new))
        del self.transitions[:-100]
        if self._on_transition is not None:
            try:
                self._on_transition(self.name, old, new)
            except Exception:  # noqa: BLE001 - a metrics hook must not break the breaker
                pass


class CircuitBreakerMixin:
    """README surface: ``circuit_state`` (settable to "CLOSED") and ``failure_count``."""

    def _new_breaker(self, name: str, settings: Any, clock: Clock,
                     on_transition: Callable[[str, str, str], None]) -> CircuitBreaker:
        return CircuitBreaker(
            failure_threshold=settings.failure_threshold, reset_timeout=settings.reset_timeout,
            failure_rate_threshold=settings.failure_rate_threshold,
            window_size=settings.sliding_window_size, minimum_calls=settings.minimum_calls,
            half_open_max_calls=settings.half_open_max_calls, clock=clock, name=name,
            on_transition=on_transition)

    @property
    def circuit_state(self) -> str:
        """The default endpoint's breaker state: "CLOSED", "OPEN" or "HALF-OPEN"."""
        return self._default_endpoint().breaker.state  # type: ignore[attr-defined]

    @circuit_state.setter
    def circuit_state(self, value: str) -> None:
        if str(value).upper() != CLOSED:
            raise ConfigurationError("can only be set to 'CLOSED' (a manual reset)",
                                     field="circuit_state")
        self._default_endpoint().breaker.reset()  # type: ignore[attr-defined]

    @property
    def failure_count(self) -> int:
        return self._default_endpoint().breaker.failure_count  # type: ignore[attr-defined]

    def circuit_states(self) -> Dict[str, str]:
        """Breaker state of every endpoint, by endpoint id."""
        return {eid: ep.breaker.state for eid, ep in self._endpoints.items()}  # type: ignore[attr-defined]
