"""The circuit breaker's public face: ``circuit_state``, ``failure_count``, ``circuit_states``.

A thin facade: each endpoint owns its breaker (``breaker.Circuit``: the state machine, its
prober, the waits and verdicts); this mixin reads and resets the default endpoint's, and
lets the router wait for any of several endpoints' circuits on the client's board of
waiters (``breaker.CircuitWaiters``).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

from ..breaker import CLOSED, CircuitWaiters, can_wait_for_any
from ..errors import ConfigurationError
from ._host import HostBase

__all__ = ["CircuitBreakerMixin"]


class CircuitBreakerMixin(HostBase):
    """README surface: ``circuit_state`` (settable to "CLOSED") and ``failure_count``."""

    #: the client's routed callers waiting for a circuit to close (one board, every endpoint)
    _circuit_waiters: CircuitWaiters

    def _init_circuits(self) -> None:
        self._circuit_waiters = CircuitWaiters(self._clock, self._closing)

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

    def _can_wait_for_circuits(self, endpoint_ids: Sequence[str]) -> bool:
        """True when every one of ``endpoint_ids`` is down and probed on a schedule, so
        that waiting for one of them to come back can end (``breaker.can_wait_for_any``)."""
        return can_wait_for_any([self._endpoint(eid).circuit for eid in endpoint_ids])

    def _wait_for_any_circuit(self, endpoint_ids: Sequence[str], deadline: float,
                              on_closed: Callable[[], None],
                              on_deadline: Callable[[float], None]) -> None:
        """``CircuitWaiters.wait_for_any`` over the circuits of ``endpoint_ids``."""
        self._circuit_waiters.wait_for_any([self._endpoint(eid).circuit for eid in endpoint_ids],
                                           deadline, on_closed, on_deadline)
