"""Probing an OPEN endpoint on the breaker's own schedule, not a caller's.

While an endpoint's circuit is OPEN its callers wait and send nothing; one ``CircuitProber``
thread per endpoint sends the adapter's cheap health request (vLLM: ``GET /health``) first
``first_interval`` seconds after the circuit opened, then at an interval that doubles up to
``max_interval`` while the server stays down. A healthy answer closes the circuit (the
waiters go on, the in-flight limit ramps up from one); a failed one reopens it. So the server
sees at most one request at a time while it is down, and a server that came back is
noticed within ``max_interval``.

``verify`` runs one health check at once for a CLOSED breaker that suspects an outage (a
run of failed calls) and hands the breaker its verdict: a failed check opens the circuit,
which starts the probe loop above.

Between probes the prober also calls ``on_tick`` (the endpoint fails queued requests whose
deadline passed while they waited), at least every ``tick`` seconds.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from .. import tracing
from ..clock import SYSTEM_CLOCK, Clock
from .circuit_breaker import CircuitBreaker, OPEN

__all__ = ["CircuitProber"]

log = logging.getLogger("ipfs_accelerate_py.api_backends")


class CircuitProber:
    """One endpoint's probe loop; ``start`` when its circuit opens (idempotent)."""

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
