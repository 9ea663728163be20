"""Outages: what the client does while an endpoint's circuit is not CLOSED.

The breaker (circuit_breaker.py) decides the state; this mixin acts on its transitions.
OPEN: the endpoint's queue is held (its fail-fast jobs fail at once) and a prober checks the
server on a schedule; a queued request whose deadline passes meanwhile fails with
``CircuitWaitTimeoutError``, never sent. CLOSED again: the in-flight limit restarts low and
the queue drains. A routed request that finds every endpoint down registers a
``_CircuitWaiter`` (no thread waits): the first circuit to close, or its deadline on a
prober's tick, calls it back.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Callable, List, Sequence

from .. import errors, tracing
from ._host import HostBase
from .circuit_breaker import CLOSED

if TYPE_CHECKING:
    from ..base import Endpoint
    from ..transport import HttpRequest

__all__ = ["CircuitWaitMixin"]

log = logging.getLogger("ipfs_accelerate_py.api_backends")


class _CircuitWaiter:
    """One caller waiting for any of ``endpoints`` to close its circuit (see
    ``CircuitWaitMixin._wait_for_any_circuit``)."""

    __slots__ = ("endpoints", "deadline", "since", "on_closed", "on_deadline")

    def __init__(self, endpoints: "set[str]", deadline: float, since: float,
                 on_closed: Callable[[], None], on_deadline: Callable[[float], None]) -> None:
        self.endpoints = endpoints
        self.deadline = deadline
        self.since = since
        self.on_closed = on_closed
        self.on_deadline = on_deadline


class CircuitWaitMixin(HostBase):
    """Holding, probing and waiting while circuits are down (see the module docstring)."""

    #: callers (routed requests) waiting for any of several circuits to close
    _circuit_waiters: List[_CircuitWaiter]
    _waiters_lock: threading.Lock

    def _init_circuit_wait(self) -> None:
        self._circuit_waiters = []
        self._waiters_lock = threading.Lock()

    def _on_circuit_transition(self, endpoint_id: str, old: str, new: str) -> None:
        """OPEN: hold the endpoint's queue (fail-fast jobs fail now) and start probing.
        CLOSED after an outage: the in-flight limit restarts low and the queue drains."""
        self._metrics.record_transition(endpoint_id, old, new)
        ep = self._endpoints.get(endpoint_id)
        if ep is None:
            return
        tracing.circuit_changed(ep, new, self._clock.monotonic())  # held requests' span events
        if new == CLOSED and old != CLOSED:
            ep.limit.slow_start()
        self._hold_queue_while_down(ep)
        if new == CLOSED:
            self._wake_circuit_waiters(lambda w: endpoint_id in w.endpoints)

    def _hold_queue_while_down(self, ep: Endpoint) -> None:
        """Pause the endpoint's queue (failing its fail-fast jobs) and probe while the circuit
        is not CLOSED; resume it once it is. Read from the breaker's state now, not from the
        transition that called: callbacks of quick successive transitions may run out of
        order in different threads, and the queue must end as the circuit is."""
        if ep.prober is None:
            return
        with ep.circuit_sync:
            down = ep.breaker.state != CLOSED
            failed = ep.queue.pause() if down else []
            held = [] if down else ep.queue.resume()
        for job in failed:
            job.fail(ep.breaker.open_error())
            self._record_unsent(ep, job)
        for seconds in held:
            self._metrics.record_circuit_wait(ep.id, seconds)
        if down:
            ep.prober.start()

    def _can_wait_for_circuits(self, endpoint_ids: Sequence[str]) -> bool:
        """True when every one of ``endpoint_ids`` is down (circuit not CLOSED) and probed on
        a schedule, so that waiting for one of them to come back can end."""
        eps = [self._endpoint(eid) for eid in endpoint_ids]
        return bool(eps) and all(ep.settings.circuit_breaker_enabled and ep.prober is not None
                                 and ep.breaker.state != CLOSED for ep in eps)

    def _wait_for_any_circuit(self, endpoint_ids: Sequence[str], deadline: float,
                              on_closed: Callable[[], None],
                              on_deadline: Callable[[float], None]) -> None:
        """Call ``on_closed()`` once any of ``endpoint_ids`` closes its circuit, or
        ``on_deadline(waited)`` at monotonic ``deadline`` (checked on the probers' ticks);
        from a prober thread, or at once if one closed meanwhile. No thread waits for it."""
        waiter = _CircuitWaiter(set(endpoint_ids), deadline, self._clock.monotonic(),
                                on_closed, on_deadline)
        with self._waiters_lock:
            self._circuit_waiters.append(waiter)
        if not self._can_wait_for_circuits(endpoint_ids) or self._closed:
            self._wake_circuit_waiters(lambda w: w is waiter)  # closed while registering

    def _wake_circuit_waiters(self, which: Callable[[_CircuitWaiter], bool],
                              expired: bool = False) -> None:
        with self._waiters_lock:
            woken = [w for w in self._circuit_waiters if which(w)]
            self._circuit_waiters = [w for w in self._circuit_waiters if not which(w)]
        for w in woken:
            try:
                if expired:
                    w.on_deadline(self._clock.monotonic() - w.since)
                else:
                    w.on_closed()
            except Exception:  # noqa: BLE001 - a waiter's callback must not stop the prober
                log.exception("a circuit waiter's callback failed")

    def _probe_health(self, ep: Endpoint, health: HttpRequest) -> bool:
        """One scheduled probe, from the prober's thread: the server answered the health
        request below 500. It goes through the endpoint's probe transport on the client's
        loop (``Endpoint.fetch``); a failure of any kind is a failed probe."""
        timeout = (min(ep.settings.connect_timeout, 2.0), min(ep.settings.timeout, 5.0))
        try:
            response = ep.fetch(health, timeout)
        except Exception:  # noqa: BLE001 - unreachable, timed out, or the client stopping
            return False
        return response.status < 500

    def _expire_held(self, ep: Endpoint) -> None:
        """Fail the queued requests whose deadline passed while the circuit held them."""
        now = self._clock.monotonic()
        if self._circuit_waiters:
            self._wake_circuit_waiters(lambda w: w.deadline <= now, expired=True)
        for job in ep.queue.expire(now):
            waited = now - job.enqueued_at
            job.fail(errors.CircuitWaitTimeoutError(
                f"waited {waited:.2f}s in the queue for the circuit of {ep.id} "
                f"({ep.breaker.state}); the call deadline passed before it closed, and the "
                "request was never sent", waited=waited, endpoint=ep.id))
            self._metrics.record_circuit_wait(ep.id, waited)
            self._record_unsent(ep, job)

