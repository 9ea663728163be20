"""The breaker: one endpoint's circuit, whole. When it opens, how callers wait, how it comes back.

Stop SENDING to a server that is down, not serving. Everything about that lives here:

* ``CircuitBreaker``: the state machine (``CLOSED``, ``OPEN``, ``HALF-OPEN``) and its rules;
* ``CircuitProber``: the thread that probes an OPEN endpoint on the breaker's own schedule;
* ``Circuit``: the part each ``Endpoint`` owns: the breaker with its prober, the verdicts on
  an attempt (``transport_failed``, ``error_reply``), an attempt's wait for an OPEN circuit
  (``aadmit``), and the endpoint's queue held while the circuit is down;
* ``CircuitWaiters``: the client's board of routed callers waiting for any of several
  circuits to close (one board, shared by every endpoint's ``Circuit``);
* ``circuit_wait``: how long a call already retrying waits for the next probe window.

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

While OPEN: ``admit`` refuses with ``CircuitOpenError``; an attempt then waits, as a
coroutine on its loop (``Circuit.aadmit``), bounded by its deadline (``fail_fast`` gets the
error at once instead); the endpoint's queue is held (its fail-fast jobs fail at once), and a
queued request whose deadline passes meanwhile fails with ``CircuitWaitTimeoutError``, never
sent. Recovery is noticed in one of two ways:

* scheduled probes (``scheduled_probes``, when the adapter has a cheap health request): a
  ``CircuitProber`` calls ``begin_probe`` / ``end_probe`` on its own schedule; callers never
  probe, so the server sees only the probes while OPEN;
* otherwise, after ``reset_timeout`` the breaker is HALF-OPEN and lets
  ``half_open_max_calls`` real calls through as probes: a success closes it, a failure
  reopens it.

CLOSED again: the in-flight limit restarts low, the queue drains, and the routed callers
waiting for this circuit go on.

The breaker's lock guards state only; it is never held across an HTTP call. Transition
callbacks run after the lock is released, so they may take other locks (the endpoint's queue).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import (TYPE_CHECKING, Any, Callable, Deque, List, Optional, Sequence, Tuple)

from .. import errors, tracing
from .loop import MAX_NAP, settle
from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ApiError, CircuitOpenError, ClientClosedError

if TYPE_CHECKING:  # types only: these modules' packages import this one
    from .inflight import InFlightLimit
    from .._observability.recorder import MetricsRecorder
    from .queue import Job, PriorityRequestQueue
    from .retry import RetryPolicy
    from ..settings import ClientSettings
    from ..transport import HttpRequest, HttpResponse

__all__ = ["CLOSED", "OPEN", "HALF_OPEN", "REFUSED_RUN", "MIN_BREAKER_WAIT", "CircuitBreaker",
           "CircuitProber", "Circuit", "CircuitWaiters", "circuit_wait"]

log = logging.getLogger("ipfs_accelerate_py.api_backends")

CLOSED, OPEN, HALF_OPEN = "CLOSED", "OPEN", "HALF-OPEN"
#: Refused connections in a row that open the breaker (rule 3 above).
REFUSED_RUN = 2
#: Shortest wait for a circuit's probe window (HALF-OPEN with its probe already out says 0).
MIN_BREAKER_WAIT = 0.05

Transition = Callable[[str, str, str], None]
#: One request straight through an endpoint's probe transport (``Endpoint.fetch``).
Fetch = Callable[["HttpRequest", Tuple[float, float]], "HttpResponse"]


# ====================================================================== the state machine
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
        """A coroutine waits for the circuit (``Circuit.aadmit``): counted in ``waiting``."""
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
        coroutine (``Circuit.aadmit``: ``enter_wait`` / ``leave_wait`` count it in
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


# ====================================================================== probing
class CircuitProber:
    """One endpoint's probe loop; ``start`` when its circuit opens (idempotent).

    While the circuit is OPEN its callers wait and send nothing; this thread sends the
    adapter's cheap health request (vLLM: ``GET /health``) first ``first_interval`` seconds
    after the circuit opened, then at an interval that doubles up to ``max_interval`` while
    the server stays down. A healthy answer closes the circuit (the waiters go on, the
    in-flight limit ramps up from one); a failed one reopens it. So the server sees at most
    one request at a time while it is down, and a server that came back is noticed within
    ``max_interval``.

    ``verify`` runs one health check at once for a CLOSED breaker that suspects an outage
    (a run of failed calls) and hands the breaker its verdict: a failed check opens the
    circuit, which starts the probe loop above.

    Between probes the prober also calls ``on_tick`` (the endpoint fails queued requests
    whose deadline passed while they waited), at least every ``tick`` seconds."""

    def __init__(self, breaker: CircuitBreaker, probe: Callable[[], bool],
                 cancel: threading.Event, clock: Clock = SYSTEM_CLOCK,
                 first_interval: float = 0.5, max_interval: float = 1.0,
                 on_probe: Optional[Callable[[bool], None]] = None,
                 on_tick: Optional[Callable[[], None]] = None, tick: float = 0.25,
                 name: str = "probe", flap_max_interval: Optional[float] = None) -> None:
        self._breaker = breaker
        self._probe = probe
        self._cancel = cancel
        self._clock = clock
        self.first_interval = first_interval
        self.max_interval = max(max_interval, first_interval)
        self._on_probe = on_probe
        self._on_tick = on_tick
        self._tick = tick
        self._name = name
        # A circuit that opens again soon after a healthy probe closed it (the health request
        # answers but real calls fail) is probed less and less often, up to this interval
        self.flap_max_interval = max(flap_max_interval or self.max_interval, self.max_interval)
        self._closed_at: Optional[float] = None
        self._flap_interval = first_interval
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._rearmed = False  # the circuit opened (again) since the loop last looked
        self._verify = False  # a suspicion to check

    @property
    def running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def start(self) -> None:
        """The circuit opened: probe it. A loop that is just ending picks this up too."""
        with self._lock:
            self._rearmed = True
            self._ensure_thread()

    def verify(self) -> None:
        """The breaker suspects an outage: check health once, now, and give it the verdict."""
        with self._lock:
            self._verify = True
            self._ensure_thread()

    def _ensure_thread(self) -> None:  # lock held
        if self._cancel.is_set() or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    verify, rearmed = self._verify, self._rearmed
                    if self._cancel.is_set() or not (verify or rearmed):
                        self._thread = None
                        return
                    self._verify = False
                    if not verify:
                        self._rearmed = False
                if verify:
                    self._breaker.verdict(self._check())
                else:
                    self._run()
        except BaseException:
            with self._lock:
                self._thread = None
            raise

    def join(self, timeout: float) -> bool:
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        return not self.running

    def _check(self) -> bool:
        """One health request; its outcome is counted (``on_probe``)."""
        try:
            ok = bool(tracing.in_span("health_check", self._probe, **{
                "ipfs_accelerate.probe": self._name}))  # traceparent on the probe too
        except Exception:  # noqa: BLE001 - a probe that raised is a failed probe
            ok = False
        if self._on_probe is not None:
            self._on_probe(ok)
        return ok

    def _wait_until(self, at: float) -> bool:
        """Sleep until monotonic ``at``, ticking; False when cancelled or no longer OPEN."""
        while True:
            if self._on_tick is not None:
                self._on_tick()
            left = at - self._clock.monotonic()
            if left <= 0:
                return True
            if not self._clock.sleep(min(left, self._tick), self._cancel):
                return False
            if self._breaker.state != OPEN:
                return False  # reset by hand (or closed by a real call): nothing to probe

    def _run(self) -> None:
        """Probe until the circuit closes (or the client closes)."""
        interval = self.first_interval
        now = self._clock.monotonic()
        if self._closed_at is not None and now - self._closed_at < 5 * self.max_interval:
            # it flapped: it was closed by a probe moments ago and failed again at once
            self._flap_interval = interval = min(self._flap_interval * 2, self.flap_max_interval)
        else:
            self._flap_interval = interval
        try:
            while not self._cancel.is_set():
                due = self._clock.monotonic() + interval
                self._breaker.schedule_probe(due)
                if not self._wait_until(due) or not self._breaker.begin_probe():
                    return
                ok = self._check()
                self._breaker.end_probe(ok)
                if ok:
                    self._closed_at = self._clock.monotonic()
                    return
                interval = min(interval * 2, max(self.max_interval, self._flap_interval))
        except BaseException:  # noqa: BLE001 - never die silently with the circuit held
            log.exception("circuit prober %s stopped", self._name)
            raise
        finally:
            if self._on_tick is not None and self._breaker.state == OPEN:
                self._on_tick()


# ====================================================================== a retrying call
def circuit_wait(error: CircuitOpenError, attempt: int, policy: "RetryPolicy", deadline: float,
                 waited: float = 0.0, clock: Clock = SYSTEM_CLOCK) -> float:
    """Seconds a call caught by an outage waits for the circuit's next probe window before
    attempt ``attempt`` is made again (the retry loop's, ``_core/retry.acall_with_retries``;
    the async face waits the same); raises ``error`` when it must not wait: a fresh call
    (attempt 0), a window further off than ``max_retry_delay``, the deadline, or ``waited``
    (its circuit waits so far) plus this one over that budget."""
    budget = max(policy.max_retry_delay, policy.retry_delay)
    if attempt == 0 or (error.retry_in or 0.0) > budget:
        raise error
    wait = max(error.retry_in or 0.0, policy.retry_delay, MIN_BREAKER_WAIT)
    wait *= 1.0 + 0.25 * policy.jitter()  # spread the callers over the probe window
    # in all, a fail-fast call waits for probes no longer than one longest backoff:
    # scheduled probes come every second, and a dead server would hold it to its
    # deadline one short wait at a time (a router fails it over instead)
    if wait >= deadline - clock.monotonic() or waited + wait > budget:
        raise error
    return wait


# ====================================================================== routed waiters
class _CircuitWaiter:
    """One caller waiting for any of ``endpoints`` to close its circuit."""

    __slots__ = ("endpoints", "deadline", "since", "on_closed", "on_deadline")

    def __init__(self, endpoints: "set[str]", deadline: float, since: float,
                 on_closed: Callable[[], None], on_deadline: Callable[[float], None]) -> None:
        self.endpoints = endpoints
        self.deadline = deadline
        self.since = since
        self.on_closed = on_closed
        self.on_deadline = on_deadline


def can_wait_for_any(circuits: Sequence["Circuit"]) -> bool:
    """True when every one of ``circuits`` is down and probed on a schedule, so that waiting
    for one of them to come back can end."""
    return bool(circuits) and all(c.can_wait() for c in circuits)


class CircuitWaiters:
    """The client's callers waiting for any of several circuits to close (a routed request
    that found every endpoint down, or an attempt waiting for its own). One board for all
    the client's endpoints: a ``Circuit`` that closes calls back the waiters that name it,
    and its prober's ticks fail those whose deadline passed. No thread waits: a waiter is a
    pair of callbacks, called from the thread that closed the circuit or ticked."""

    def __init__(self, clock: Clock, closing: threading.Event) -> None:
        self._clock = clock
        self._closing = closing
        self._lock = threading.Lock()
        self._waiters: List[_CircuitWaiter] = []

    def __len__(self) -> int:
        return len(self._waiters)

    def wait_for_any(self, circuits: Sequence["Circuit"], deadline: float,
                     on_closed: Callable[[], None],
                     on_deadline: Callable[[float], None]) -> None:
        """Call ``on_closed()`` once any of ``circuits`` closes, or ``on_deadline(waited)`` at
        monotonic ``deadline`` (checked on the probers' ticks); from a prober thread, or at
        once if one closed meanwhile or the client is closing."""
        waiter = _CircuitWaiter({c.name for c in circuits}, deadline, self._clock.monotonic(),
                                on_closed, on_deadline)
        with self._lock:
            self._waiters.append(waiter)
        if self._closing.is_set() or not can_wait_for_any(circuits):
            self._wake(lambda w: w is waiter)  # closed while registering

    def closed(self, name: str) -> None:
        """The circuit ``name`` closed: its waiters go on."""
        self._wake(lambda w: name in w.endpoints)

    def expire(self, now: float) -> None:
        """Fail the waiters whose deadline passed (``on_deadline``)."""
        if self._waiters:
            self._wake(lambda w: w.deadline <= now, expired=True)

    def close(self) -> None:
        """The client closes: every waiter goes on now, and finds the client closed."""
        self._wake(lambda w: True)

    def _wake(self, which: Callable[[_CircuitWaiter], bool], expired: bool = False) -> None:
        with self._lock:
            woken = [w for w in self._waiters if which(w)]
            self._waiters = [w for w in self._waiters if not which(w)]
        for w in woken:
            try:
                if expired:
                    w.on_deadline(self._clock.monotonic() - w.since)
                else:
                    w.on_closed()
            except Exception:  # noqa: BLE001 - a waiter's callback must not stop the prober
                log.exception("a circuit waiter's callback failed")


# ====================================================================== the endpoint's part
class Circuit:
    """One endpoint's breaker, whole (see the module docstring); the ``Endpoint`` builds it
    from what it needs, none of it the client.

    ``settings``: the breaker's thresholds and probe intervals (``settings`` stays the
    endpoint's current ones: ``Endpoint.reconfigure``); ``queue``: held while the circuit is
    down; ``limit``: restarts low when it closes; ``metrics``: transitions, probes, waits, and
    the requests it fails unsent; ``waiters``: the client's board of routed callers;
    ``health``: the adapter's health request, sent through ``fetch`` (the endpoint's probe
    transport) by the prober (``None``, or the ``fail_fast`` setting: no prober, and after
    ``reset_timeout`` a caller's own request is the probe); ``closing``: set when the
    client closes, it ends waits and the prober."""

    def __init__(self, name: str, settings: "ClientSettings", clock: Clock,
                 closing: threading.Event, queue: "PriorityRequestQueue",
                 limit: "InFlightLimit", metrics: "MetricsRecorder", waiters: CircuitWaiters,
                 fetch: Fetch, health: Optional["HttpRequest"], thread_name: str = "") -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._closing = closing
        self._queue = queue
        self._limit = limit
        self._metrics = metrics
        self._waiters = waiters
        self._fetch = fetch
        self._sync = threading.RLock()  # the queue's hold follows the circuit (hold_queue)
        if settings.fail_fast:
            health = None  # fail_fast keeps the older recovery: a caller's request probes
        self.breaker = CircuitBreaker(
            failure_threshold=settings.failure_threshold, reset_timeout=settings.reset_timeout,
            failure_rate_threshold=settings.failure_rate_threshold,
            window_seconds=settings.sliding_window_seconds,
            window_size=settings.sliding_window_size, minimum_calls=settings.minimum_calls,
            half_open_max_calls=settings.half_open_max_calls, clock=clock, name=name,
            on_transition=self._changed, scheduled_probes=health is not None)
        self.prober: Optional[CircuitProber] = None
        if health is not None:
            probe = health
            self.prober = CircuitProber(
                self.breaker, lambda: self.check_health(probe), closing, clock,
                first_interval=settings.probe_interval,
                max_interval=min(settings.probe_max_interval, settings.reset_timeout),
                on_probe=lambda ok: metrics.record_probe(name, ok), on_tick=self.expire_held,
                name=f"{thread_name or name}-probe", flap_max_interval=settings.reset_timeout)
            self.breaker.on_suspect = self.prober.verify

    # -- reading -------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self.breaker.state

    def can_wait(self) -> bool:
        """True when the circuit is down (not CLOSED) and probed on a schedule, so that
        waiting for it to come back can end."""
        return bool(self.settings.circuit_breaker_enabled and self.prober is not None
                    and self.breaker.state != CLOSED)

    # -- an attempt: admission and verdicts (both faces) ----------------------------------
    async def aadmit(self, deadline: float, fail_fast: bool, now: float,
                     op: Any = None, rid: str = "") -> Tuple[bool, float]:
        """Pass the breaker: ``(is a HALF-OPEN probe, the clock as it passed)``. An OPEN
        circuit raises ``CircuitOpenError`` when ``fail_fast``; otherwise it is waited out
        within ``deadline`` (then ``CircuitWaitTimeoutError``, nothing sent): with a prober,
        until it closes (its thread settles a future of this loop); without, until the
        breaker's next probe window. ``op``, ``rid``: an async stream's span (``tracing``).
        (An attempt tries ``breaker.admit`` itself first: a CLOSED circuit awaits nothing.)"""
        if not self.settings.circuit_breaker_enabled:
            return False, now
        clock = self._clock
        breaker = self.breaker
        start = now
        while True:
            try:
                probe = breaker.admit(now)
                break
            except CircuitOpenError as exc:
                if fail_fast:
                    raise
                if self._closing.is_set():
                    raise ClientClosedError("client closed while waiting for the circuit") from None
                now = clock.monotonic()
                if now >= deadline:
                    self._note_wait(now - start, op, rid)
                    raise errors.CircuitWaitTimeoutError(
                        f"waited {now - start:.2f}s for the circuit of {self.name} "
                        f"({breaker.state}); the call deadline passed before it closed, and "
                        "the request was never sent", waited=now - start,
                        endpoint=self.name) from None
                breaker.enter_wait()
                try:
                    await self._await_change(deadline, exc.retry_in or 0.0)
                finally:
                    breaker.leave_wait()
                now = clock.monotonic()
        self._note_wait(now - start, op, rid)
        return probe, now

    def transport_failed(self, probe: bool, exc: BaseException) -> None:
        """The verdict on an attempt whose transport call raised: a transport fault counts
        against the server, and a dropped connection alone makes it check /health at once;
        anything else (cancelled, closed) only frees a probe's slot."""
        if isinstance(exc, errors.TransientError):
            self.breaker.record_failure(probe, refused=bool(exc.context.get("refused")),
                                        suspect=isinstance(exc, errors.ConnectionError))
        else:
            self.breaker.release(probe)

    def error_reply(self, error: ApiError, probe: bool) -> ApiError:
        """The verdict on a reply of status 400 or more (``error``: the adapter's typed
        error for it, returned for raising): a 5xx counts against the server, any other
        answer proves it alive."""
        if isinstance(error, errors.ServerError):
            self.breaker.record_failure(probe)
        else:
            self.breaker.record_success(probe)
        return error

    async def _await_change(self, deadline: float, retry_in: float) -> None:
        """Wait until the circuit may admit again (see ``aadmit``), at most ``MAX_NAP``."""
        now = self._clock.monotonic()
        nap = min(deadline - now, MAX_NAP)
        if not self.can_wait():
            await asyncio.sleep(max(MIN_BREAKER_WAIT, min(retry_in, nap)))
            return
        loop = asyncio.get_running_loop()
        closed = loop.create_future()

        def wake(*_: Any) -> None:
            try:
                loop.call_soon_threadsafe(settle, closed)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        self._waiters.wait_for_any([self], deadline, wake, wake)
        await asyncio.wait({closed}, timeout=nap)

    def _note_wait(self, waited: float, op: Any, rid: str) -> None:
        if waited > 0.001:
            self._metrics.record_circuit_wait(self.name, waited)
            tracing.waited_for(op, rid, "circuit.wait", waited)

    # -- the endpoint's queue while the circuit is down ----------------------------------
    def refuse(self, job: "Job") -> None:
        """Fail a fail-fast ``job`` that the held queue must not keep (``CircuitOpenError``),
        counted as a request never sent."""
        job.fail(self.breaker.open_error())
        self._metrics.record_unsent(self.name, job, self._clock.monotonic())

    def hold_queue(self) -> None:
        """Pause the endpoint's queue (failing its fail-fast jobs) and probe while the
        circuit is not CLOSED; resume it once it is. Read from the breaker's state now, not
        from the transition that called: callbacks of quick successive transitions may run
        out of order in different threads, and the queue must end as the circuit is."""
        if self.prober is None:
            return
        queue = self._queue
        with self._sync:
            down = self.breaker.state != CLOSED
            failed = queue.pause() if down else []
            held = [] if down else queue.resume()
        for job in failed:
            self.refuse(job)
        for seconds in held:
            self._metrics.record_circuit_wait(self.name, seconds)
        if down:
            self.prober.start()

    def expire_held(self) -> None:
        """The prober's tick: fail the routed waiters and the queued requests whose
        deadline passed while the circuit held them."""
        now = self._clock.monotonic()
        self._waiters.expire(now)
        for job in self._queue.expire(now):
            waited = now - job.enqueued_at
            job.fail(errors.CircuitWaitTimeoutError(
                f"waited {waited:.2f}s in the queue for the circuit of {self.name} "
                f"({self.breaker.state}); the call deadline passed before it closed, and the "
                "request was never sent", waited=waited, endpoint=self.name))
            self._metrics.record_circuit_wait(self.name, waited)
            self._metrics.record_unsent(self.name, job, self._clock.monotonic())

    def check_health(self, health: "HttpRequest") -> bool:
        """One health check, from the prober's thread: the server answered ``health`` below
        500, through the endpoint's probe transport on the client's loop (``fetch``); a
        failure of any kind is a failed check."""
        s = self.settings
        try:
            response = self._fetch(health, (min(s.connect_timeout, 2.0), min(s.timeout, 5.0)))
        except Exception:  # noqa: BLE001 - unreachable, timed out, or the client stopping
            return False
        return response.status < 500

    def join(self, timeout: float) -> None:
        """``close()``: wait (at most ``timeout``) for the prober's thread to end."""
        if self.prober is not None:
            self.prober.join(timeout)

    def _changed(self, name: str, old: str, new: str) -> None:
        """The breaker's transition (outside its lock): counted; OPEN holds the queue and
        starts probing; CLOSED after an outage restarts the in-flight limit low, drains the
        queue, and lets the routed callers waiting for this circuit go on."""
        self._metrics.record_transition(name, old, new)
        tracing.circuit_changed(self, new, self._clock.monotonic())  # held requests' events
        if new == CLOSED and old != CLOSED:
            self._limit.slow_start()
        self.hold_queue()
        if new == CLOSED:
            self._waiters.closed(name)
