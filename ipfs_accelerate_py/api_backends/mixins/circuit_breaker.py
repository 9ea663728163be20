"""The circuit breaker's public face: ``circuit_state``, ``failure_count``, ``circuit_states``.

A thin facade: each endpoint owns its breaker (``breaker.Circuit``: the state machine, its
prober, the waits and verdicts); this mixin reads and resets the default endpoint's, and
makes the client's board of callers waiting for a circuit (``breaker.CircuitWaiters``,
which the router and ``close()`` use).
"""

from __future__ import annotations

from typing import Dict

from .._core.breaker import CLOSED, CircuitWaiters
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
        return self._endpoint(None).breaker.state

    @circuit_state.setter
    def circuit_state(self, value: str) -> None:
        if str(value).upper() != CLOSED:
            raise ConfigurationError("can only be set to 'CLOSED' (a manual reset)",
                                     field="circuit_state")
        self._endpoint(None).breaker.reset()

    @property
    def failure_count(self) -> int:
        return self._endpoint(None).breaker.failure_count

    def circuit_states(self) -> Dict[str, str]:
        """Breaker state of every endpoint, by endpoint id."""
        return {eid: ep.breaker.state for eid, ep in self._endpoints.items()}
