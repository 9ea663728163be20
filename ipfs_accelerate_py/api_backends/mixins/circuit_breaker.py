"""Circuit breaker, one per endpoint: stop SENDING to a server that is down, not serving.

States: ``CLOSED`` (normal), ``OPEN`` (nothing is sent), ``HALF-OPEN`` (a probe is out).

Opening: on an outage, not on noise. The breaker keeps the outcome of every call of the last
``window_seconds`` (at most ``window_size`` of them) and opens when

1. the window holds at least ``minimum_calls`` calls, at least ``failure_threshold`` of them
   failed, and the failure rate is at least ``failure_rate_threshold``; or
2. the last ``minimum_calls`` calls all failed (old successes in the window do not dilute a
   server that just died); or
3. ``REFUSED_RUN`` connections in a row were refused (nothing listens on the port: no noise
   makes that, and it lets even a lone caller ride out a restart); or
4. with scheduled probes (below): a dropped or refused connection, or ``failure_threshold``
   failures in a row, make the breaker *suspect* an outage and ask ``on_suspect`` for one
   health check at once (one at a time); a failed check opens it (``verdict(False)``), a
   healthy one clears the suspicion (``verdict(True)``).
   Random faults that leave ``/health`` answering never open it this way, and a dead server
   is found after a handful of failed calls, however few callers there are (a batching
   client has only a few calls in flight).

Why the defaults (window 10 s, 30 calls, 80 %, failure_threshold 5) give "random faults at
30 % never open it; a dead server opens it within a second": with independent faults at
p = 0.3, the chance that a window of n = 30 calls holds 24 or more failures is the binomial
tail sum_{k>=24} C(30,k) 0.3^k 0.7^(30-k) = 2.2e-8, and larger windows (more traffic) are
less likely still (n = 50: 3.9e-13); even a union bound over 5 000 evaluations leaves 1.1e-4.
Rule 2 needs 30 failures in a row: 0.3^30 = 2e-16. By contrast the old trigger, 5 consecutive
failures, comes every 1 / 0.3^5 = 412 calls at that fault rate, and a 20-call window at
50 % (20 calls, >= 10 failures: 4.8e-2 per window) tripped on an unlucky run of a 22 % mix.
A dead server fails every call: rule 4 fires on its fifth failed call (plus one health check),
rule 2 within a second at 30 or more attempts a second, rule 3 on the second refused attempt.

Only server faults count (5xx, connection errors, timeouts): a 400 for a too-long prompt is
the caller's fault and proves the server is alive.

While OPEN: ``admit`` refuses with ``CircuitOpenError``; a caller then waits, as a coroutine
on its loop (mixins/attempt.py), bounded by its deadline (``fail_fast`` gets the error at
once instead). Recovery is noticed in one of two ways:

* scheduled probes (``scheduled_probes``, when the adapter has a cheap health request): a
  ``CircuitProber`` (see ``probing.py``) calls ``begin_probe`` / ``end_probe`` on its own
  schedule; callers never probe, so the server sees only the probes while OPEN;
* otherwise, after ``reset_timeout`` the breaker is HALF-OPEN and lets
  ``half_open_max_calls`` real calls through as probes: a success closes it, a failure
  reopens it.

The lock guards state only; it is never held across an HTTP call. Transition callbacks run
after the lock is released, so they may take other locks (the endpoint's queue).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import CircuitOpenError, ConfigurationError
from ._host import HostBase

__all__ = ["CircuitBreaker", "CircuitBreakerMixin", "CLOSED", "OPEN", "HALF_OPEN", "REFUSED_RUN"]

CLOSED, OPEN, HALF_OPEN = "CLOSED", "OPEN", "HALF-OPEN"
#: Refused connections in a row that open the breaker (rule 3 above).
REFUSED_RUN = 2

Transition = Callable[[str, str, str], None]


class CircuitBreaker:
    """Thread-safe breaker; ``admit`` lets a call through (or refuses), ``record_*`` report."""

    def __init__(self, failure_threshold: int = 5, reset_timeout: float = 30.0,
                 failure_rate_threshold: float = 0.8, window_seconds: float = 10.0,
                 minimum_calls: int = 30, half_open_max_calls: int = 1,
                 window_size: int = 10_000, clock: Clock = SYSTEM_CLOCK, name: str = "",
                 on_transition: Optional[Transition] = None,
                 scheduled_probes: bool = False) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.failure_rate_threshold = failure_rate_threshold
        self.window_seconds = window_seconds
        self.minimum_calls = minimum_calls
        self.half_open_max_calls = half_open_max_calls
        self.name = name
        #: True when a prober owns recovery (callers never probe, they wait)
        self.scheduled_probes = scheduled_probes
        self._clock = clock
        self._on_transition = on_transition
        self._lock = threading.Lock()
        self._state = CLOSED
        self._window: Deque[Tuple[float, bool]] = deque(maxlen=window_size)  # (time, failed)
        self._window_failures = 0
        self._consecutive = 0
        self._refused_run = 0
        self._opened_at = 0.0
        self._next_probe_at: Optional[float] = None
        self._probes = 0
        self._pending: List[Tuple[str, str]] = []
        self._waiting = 0
        #: called (outside the lock) when rule 4 suspects an outage; answer with ``verdict``
        self.on_suspect: Optional[Callable[[], None]] = None
        self._suspect = False
        self._suspect_pending = False
        self.transitions: List[Tuple[float, str, str]] = []  # bounded below

    # -- reading -------------------------------------------------------------------------
    @property
    def state(self) -> str:
        with self._lock:
            self._maybe_half_open()
        self._flush()
        return self._state

    @property
    def failure_count(self) -> int:
        """Consecutive server failures seen (0 after any success)."""
        return self._consecutive

    def retry_in(self) -> float:
        """Seconds until an OPEN breaker sends its next probe (0 when not OPEN)."""
        with self._lock:
            return self._retry_in_locked()

    @property
    def waiting(self) -> int:
        """Callers waiting for the circuit to close right now (coroutines between
        ``enter_wait`` and ``leave_wait``)."""
        return self._waiting

    def enter_wait(self) -> None:
        """A coroutine waits for the circuit (mixins/attempt.py): counted in ``waiting``."""
        with self._lock:
            self._waiting += 1

    def leave_wait(self) -> None:
        with self._lock:
            self._waiting -= 1

    def open_error(self) -> CircuitOpenError:
        """The ``CircuitOpenError`` a fail-fast caller gets now (with ``retry_in``)."""
        with self._lock:
            return self._open_error()

    def window_counts(self) -> Tuple[int, int]:
        """(calls, failures) in the current window."""
        with self._lock:
            self._prune(self._clock.monotonic())
            return len(self._window), self._window_failures

    # -- admitting -----------------------------------------------------------------------
    def before_call(self) -> bool:
        """Admit a call or raise ``CircuitOpenError`` at once. True if it is a probe."""
        return self.admit()

    def admit(self, now: Optional[float] = None) -> bool:
        """Let a call through now, or raise ``CircuitOpenError`` (with ``retry_in``): True
        if it is the HALF-OPEN probe. Waiting out an OPEN circuit is the caller's, as a
        coroutine (mixins/attempt.py: ``enter_wait`` / ``leave_wait`` count it in
        ``waiting``). ``now``: the caller's reading of the clock, when it has one."""
        now = self._clock.monotonic() if now is None else now
        try:
            with self._lock:
                self._maybe_half_open(now)
                if self._state == CLOSED:
                    return False
                if (self._state == HALF_OPEN and not self.scheduled_probes
                        and self._probes < self.half_open_max_calls):
                    self._probes += 1
                    return True
                raise self._open_error()
        finally:
            self._flush()

    def record_success(self, probe: bool = False, now: Optional[float] = None) -> None:
        """A reply that proves the server alive (``now``: the caller's clock reading, if any)."""
        with self._lock:
            self._consecutive = 0
            self._refused_run = 0
            if self._state == HALF_OPEN:
                if probe:
                    self._probes = max(0, self._probes - 1)
                self._transition(CLOSED)
            elif self._state == CLOSED:
                self._push(False, now)
        self._flush()

    def record_failure(self, probe: bool = False, refused: bool = False,
                       suspect: bool = False) -> None:
        """A server fault; ``refused``: the connection was refused (nothing listens);
        ``suspect``: a fault that alone makes an outage likely (a dropped connection)."""
        with self._lock:
            self._consecutive += 1
            self._refused_run = self._refused_run + 1 if refused else 0
            if self._state == HALF_OPEN:
                if probe:
                    self._probes = max(0, self._probes - 1)
                if not self.scheduled_probes:
                    self._transition(OPEN)
            elif self._state == CLOSED:
                self._push(True)
                if self._should_open():
                    self._transition(OPEN)
                elif (self.scheduled_probes and not self._suspect
                      and (suspect or refused or self._consecutive >= self.failure_threshold)):
                    self._suspect = self._suspect_pending = True
        self._flush()

    def verdict(self, healthy: bool) -> None:
        """The answer to ``on_suspect``: the health check failed (open) or passed (clear)."""
        with self._lock:
            self._suspect = False
            if self._state == CLOSED:
                if healthy:
                    self._consecutive = 0
                else:
                    self._transition(OPEN)
        self._flush()

    def release(self, probe: bool) -> None:
        """A probe that ended without a verdict (cancelled): free its slot."""
        if probe:
            with self._lock:
                self._probes = max(0, self._probes - 1)

    def reset(self) -> None:
        """Force CLOSED and forget history (README: ``client.circuit_state = "CLOSED"``)."""
        with self._lock:
            self._consecutive = 0
            self._refused_run = 0
            self._window.clear()
            self._window_failures = 0
            self._probes = 0
            if self._state != CLOSED:
                self._transition(CLOSED)
        self._flush()

    # -- scheduled probes (the prober's side) --------------------------------------------
    def schedule_probe(self, at: float) -> None:
        """The prober's next probe is due at monotonic ``at`` (for ``retry_in``)."""
        with self._lock:
            self._next_probe_at = at

    def begin_probe(self) -> bool:
        """OPEN -> HALF-OPEN for a scheduled probe; False when not OPEN (reset meanwhile)."""
        with self._lock:
            if self._state != OPEN:
                return False
            self._transition(HALF_OPEN)
        self._flush()
        return True

    def end_probe(self, ok: bool) -> None:
        """The scheduled probe's verdict: CLOSED on success, OPEN again on failure."""
        with self._lock:
            if self._state == HALF_OPEN:
                self._transition(CLOSED if ok else OPEN)
        self._flush()

    # -- internals (lock held) -----------------------------------------------------------
    def _should_open(self) -> bool:
        n, f = len(self._window), self._window_failures
        if self._refused_run >= REFUSED_RUN or self._consecutive >= self.minimum_calls:
            return True
        return (n >= self.minimum_calls and f >= self.failure_threshold
                and f / n >= self.failure_rate_threshold)

    def _push(self, failure: bool, now: Optional[float] = None) -> None:
        now = self._clock.monotonic() if now is None else now
        if len(self._window) == self._window.maxlen and self._window[0][1]:
            self._window_failures -= 1
        self._window.append((now, failure))
        if failure:
            self._window_failures += 1
        self._prune(now)

    def _prune(self, now: float) -> None:
        cutoff = now - self.window_seconds
        window = self._window
        while window and window[0][0] < cutoff:
            if window.popleft()[1]:
                self._window_failures -= 1

    def _retry_in_locked(self) -> float:
        if self._state != OPEN:
            return 0.0
        now = self._clock.monotonic()
        if self.scheduled_probes:
            return max(0.0, (self._next_probe_at or now) - now)
        return max(0.0, self._opened_at + self.reset_timeout - now)

    def _open_error(self) -> CircuitOpenError:
        wait = self._retry_in_locked()
        what = "OPEN" if self._state == OPEN else "HALF-OPEN (probe in flight)"
        return CircuitOpenError(
            f"circuit breaker for {self.name or 'endpoint'} is {what}; next probe in {wait:.2f}s",
            retry_at=self._clock.wall() + wait, retry_in=wait, endpoint=self.name)

    def _maybe_half_open(self, now: Optional[float] = None) -> None:
        if (self._state == OPEN and not self.scheduled_probes
                and (self._clock.monotonic() if now is None else now) - self._opened_at
                >= self.reset_timeout):
            self._transition(HALF_OPEN)

    def _transition(self, new: str) -> None:
        old, self._state = self._state, new
        if new == OPEN:
            self._opened_at = self._clock.monotonic()
            self._probes = 0
        if new != CLOSED:
            self._suspect = False
        if new == CLOSED:
            self._window.clear()
            self._window_failures = 0
            self._consecutive = 0
            self._refused_run = 0
            self._probes = 0
            self._next_probe_at = None
        self.transitions.append((self._clock.wall(), old, new))
        del self.transitions[:-100]
        self._pending.append((old, new))

    def _flush(self) -> None:
        """Run transition callbacks (and a suspicion) outside the lock, in order."""
        if self._suspect_pending:
            with self._lock:
                ask, self._suspect_pending = self._suspect_pending, False
            if ask and self.on_suspect is not None:
                try:
                    self.on_suspect()
                except Exception:  # noqa: BLE001 - a failed check request leaves it CLOSED
                    self.verdict(True)
        if not self._pending:  # the common case, read without the lock
            return
        with self._lock:
            pending, self._pending = self._pending, []
        if self._on_transition is None:
            return
        for old, new in pending:
            try:
                self._on_transition(self.name, old, new)
            except Exception:  # noqa: BLE001 - a metrics hook must not break the breaker
                pass


class CircuitBreakerMixin(HostBase):
    """README surface: ``circuit_state`` (settable to "CLOSED") and ``failure_count``."""

    def _new_breaker(self, name: str, settings: Any, clock: Clock, on_transition: Transition,
                     scheduled_probes: bool) -> CircuitBreaker:
        return CircuitBreaker(
            failure_threshold=settings.failure_threshold, reset_timeout=settings.reset_timeout,
            failure_rate_threshold=settings.failure_rate_threshold,
            window_seconds=settings.sliding_window_seconds,
            window_size=settings.sliding_window_size, minimum_calls=settings.minimum_calls,
            half_open_max_calls=settings.half_open_max_calls, clock=clock, name=name,
            on_transition=on_transition, scheduled_probes=scheduled_probes)

    @property
    def circuit_state(self) -> str:
        """The default endpoint's breaker state: "CLOSED", "OPEN" or "HALF-OPEN"."""
        return self._default_endpoint().breaker.state

    @circuit_state.setter
    def circuit_state(self, value: str) -> None:
        if str(value).upper() != CLOSED:
            raise ConfigurationError("can only be set to 'CLOSED' (a manual reset)",
                                     field="circuit_state")
        self._default_endpoint().breaker.reset()

    @property
    def failure_count(self) -> int:
        return self._default_endpoint().breaker.failure_count

    def circuit_states(self) -> Dict[str, str]:
        """Breaker state of every endpoint, by endpoint id."""
        return {eid: ep.breaker.state for eid, ep in self._endpoints.items()}
