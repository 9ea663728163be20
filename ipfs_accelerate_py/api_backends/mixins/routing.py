"""Routing across endpoints: pick one by strategy, skip open breakers, fail over.

``route_inference`` orders the candidate endpoints by a strategy, skips every endpoint whose
circuit breaker is OPEN, and sends the request to the first one. When that endpoint fails
in a way another server might not (connection refused or dropped, timeout, 5xx, 429,
its breaker opening, its queue full) the next endpoint gets the request. Errors that are
the caller's (400, 401, 404, validation) are raised at once: another server would refuse
the same request. Only when every endpoint was skipped or failed does the call raise
``NoHealthyEndpointError``, which names what happened at each endpoint.

Strategies (ties always broken by rotation, so equal endpoints share the work):

* ``round-robin``: rotate through the endpoints.
* ``least-loaded``: fewest requests outstanding on the endpoint (routed calls not yet
  finished, or queued plus in flight, whichever is larger), plus what an optional load probe
  reports for the server itself. The probe is a callable ``probe(endpoint) -> float | None``
  (see ``server_metrics.prometheus_probe``), called at most once per ``min_interval`` seconds
  per endpoint, on the routing thread, and its failures count as "no figure".
* ``fastest``: lowest median latency over the endpoint's last routed calls; endpoints with
  no figure yet go first, and every ``EXPLORE_EVERY``-th call rotates instead so that
  estimates of slower endpoints stay fresh.

Nothing here knows a particular server.
"""

from __future__ import annotations

import itertools
import math
import statistics
import threading
from collections import Counter, deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from ..errors import (CircuitOpenError, ConfigurationError, NoHealthyEndpointError, QueueFullError,
                      TransientError, ValidationError)
from .circuit_breaker import OPEN

__all__ = ["RoutingMixin", "STRATEGIES", "FAILOVER_ERRORS", "LoadProbe"]

STRATEGIES = ("round-robin", "least-loaded", "fastest")
#: Failures that another endpoint may not have: the request moves on to the next one.
FAILOVER_ERRORS: Tuple[type, ...] = (TransientError, CircuitOpenError, QueueFullError)
#: Latencies kept per endpoint for ``fastest`` (recent behaviour, not all-time).
LATENCY_WINDOW = 32
#: Every n-th ``fastest`` call rotates, so slower endpoints get measured again.
EXPLORE_EVERY = 16

LoadProbe = Callable[[Any], Optional[float]]
_init_lock = threading.Lock()


class _RoutingState:
    """Per-client routing bookkeeping; every field is guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # One rotation per strategy: callers that mix strategies must not skew each other's
        # (a shared counter stepped by every call gives round-robin a fixed phase).
        self.turns: Dict[str, "itertools.count[int]"] = {name: itertools.count() for name in STRATEGIES}
        self.latencies: Dict[str, Deque[float]] = {}
        self.outstanding: Counter = Counter()
        self.probe: Optional[LoadProbe] = None
        self.min_interval = 1.0
        self.probed: Dict[str, Tuple[float, Optional[float]]] = {}
        self.probing: "set[str]" = set()
        self.routed = 0
        self.served_by: Counter = Counter()
        self.failovers: Counter = Counter()
        self.skipped_open: Counter = Counter()
        self.all_down = 0


class RoutingMixin:
    """``route_inference`` over this client's endpoints (see the module docstring)."""

    def _routing(self) -> _RoutingState:
        state = self.__dict__.get("_routing_state")
        if state is None:
            with _init_lock:
                state = self.__dict__.setdefault("_routing_state", _RoutingState())
        return state

    def set_load_probe(self, probe: Optional[LoadProbe], min_interval: float = 1.0) -> None:
        """Use ``probe(endpoint)`` (a server-side load figure) for ``least-loaded``; None stops.

        ``min_interval``: seconds a figure is reused before the endpoint is asked again.
        """
        if probe is not None and not callable(probe):
            raise ConfigurationError("must be callable or None", field="probe")
        if isinstance(min_interval, bool) or not isinstance(min_interval, (int, float)) or min_interval < 0:
            raise ConfigurationError("must be a number >= 0", field="min_interval")
        state = self._routing()
        with state.lock:
            state.probe = probe
            state.min_interval = float(min_interval)
            state.probed.clear()

    # ------------------------------------------------------------------ ordering
    def _candidates(self, endpoint_ids: Optional[Sequence[str]]) -> List[str]:
        if endpoint_ids is None:
            return list(self.endpoint_ids)  # type: ignore[attr-defined]
        if isinstance(endpoint_ids, str) or not isinstance(endpoint_ids, (list, tuple)):
            raise ValidationError("must be a list of endpoint ids", field="endpoint_ids")
        ids = list(dict.fromkeys(endpoint_ids))
        if not ids:
            raise ValidationError("must name at least one endpoint", field="endpoint_ids")
        for eid in ids:
            self._endpoint(eid)  # type: ignore[attr-defined] - raises for an unknown id
        return ids

    def _probe_value(self, state: _RoutingState, eid: str) -> float:
        """The server-side load figure for ``eid``: cached, refreshed by one thread at a time."""
        with state.lock:
            probe = state.probe
            if probe is None:
                return 0.0
            now = self._clock.monotonic()  # type: ignore[attr-defined]
            at, value = state.probed.get(eid, (None, None))
            fresh = at is not None and now - at < state.min_interval
            if fresh or eid in state.probing:
                return value or 0.0
            state.probing.add(eid)
        try:
            value = probe(self._endpoint(eid))  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a probe must never fail the request
            value = None
        finally:
            with state.lock:
                state.probing.discard(eid)
        with state.lock:
            state.probed[eid] = (self._clock.monotonic(), value)  # type: ignore[attr-defined]
        return float(value or 0.0)

    def endpoint_load(self, endpoint_id: str) -> float:
        """What ``least-loaded`` compares: outstanding requests plus the probe's figure."""
        state = self._routing()
        ep = self._endpoint(endpoint_id)  # type: ignore[attr-defined]
        local = len(ep.queue) + max(ep.in_flight, getattr(ep.workers, "active", 0))
        with state.lock:
            routed = state.outstanding[ep.id]
        return max(local, routed) + self._probe_value(state, ep.id)

    def endpoint_latency_p50(self, endpoint_id: str) -> Optional[float]:
        """Median latency of the endpoint's recent routed calls (None before the first)."""
        state = self._routing()
        with state.lock:
            recent = list(state.latencies.get(endpoint_id, ()))
        return statistics.median(recent) if recent else None

    def routing_order(self, strategy: str = "round-robin",
                      endpoint_ids: Optional[Sequence[str]] = None) -> List[str]:
        """The order ``route_inference`` would try the endpoints in (advances the rotation)."""
        if strategy not in STRATEGIES:
            raise ValidationError(f"must be one of {list(STRATEGIES)}, got {strategy!r}",
                                  field="strategy")
        ids = self._candidates(endpoint_ids)
        state = self._routing()
        with state.lock:
            turn = next(state.turns[strategy])
        k = turn % len(ids)
        rotated = ids[k:] + ids[:k]
        if strategy == "least-loaded":
            # An OPEN endpoint will be skipped anyway: do not probe it, put it last.
            loads = {eid: (math.inf if self._is_open(eid) else self.endpoint_load(eid))
                     for eid in rotated}
            return sorted(rotated, key=loads.__getitem__)  # stable: ties keep the rotation
        if strategy == "fastest" and turn % EXPLORE_EVERY != EXPLORE_EVERY - 1:
            p50 = {eid: self.endpoint_latency_p50(eid) for eid in rotated}
            return sorted(rotated, key=lambda e: -1.0 if p50[e] is None else p50[e])
        return rotated

    def _is_open(self, endpoint_id: str) -> bool:
        ep = self._endpoint(endpoint_id)  # type: ignore[attr-defined]
        return bool(ep.settings.circuit_breaker_enabled and ep.breaker.state == OPEN)

    # ------------------------------------------------------------------ routing
    def route_inference(self, model_id: Optional[str], inputs: Any,
                        parameters: Optional[Dict[str, Any]] = None, priority: int = 1,
                        strategy: str = "round-robin",
                        endpoint_ids: Optional[Sequence[str]] = None) -> Any:
        """``run_inference`` on the best healthy endpoint, failing over to the next ones."""
        order = self.routing_order(strategy, endpoint_ids)
        state = self._routing()
        params = parameters
        tried: List[str] = []
        last: Optional[BaseException] = None
        with state.lock:
            state.routed += 1
        for eid in order:
            if self._is_open(eid):
                with state.lock:
                    state.skipped_open[eid] += 1
                tried.append(f"{eid}: circuit OPEN (skipped)")
                continue
            with state.lock:
                state.outstanding[eid] += 1
            start = self._clock.monotonic()  # type: ignore[attr-defined]
            try:
                result = self.run_inference(model_id, inputs, params, priority,  # type: ignore[attr-defined]
                                            endpoint_id=eid)
            except FAILOVER_ERRORS as exc:
                last = exc
                tried.append(f"{eid}: {type(exc).__name__}: {exc}")
                with state.lock:
                    state.failovers[eid] += 1
                continue
            finally:
                with state.lock:
                    state.outstanding[eid] -= 1
            elapsed = self._clock.monotonic() - start  # type: ignore[attr-defined]
            with state.lock:
                state.latencies.setdefault(eid, deque(maxlen=LATENCY_WINDOW)).append(elapsed)
                state.served_by[eid] += 1
            return result
        with state.lock:
            state.all_down += 1
        raise NoHealthyEndpointError(
            f"no healthy endpoint among {len(order)}: " + "; ".join(tried),
            attempts=tried) from last

    def get_routing_stats(self) -> Dict[str, Any]:
        """Routed calls, which endpoint served them, failovers and skips by endpoint."""
        state = self._routing()
        with state.lock:
            out = {"routed": state.routed, "served_by": dict(state.served_by),
                   "failovers": dict(state.failovers), "skipped_open": dict(state.skipped_open),
                   "no_healthy_endpoint": state.all_down,
                   "outstanding": {k: v for k, v in state.outstanding.items() if v}}
        out["latency_p50"] = {eid: self.endpoint_latency_p50(eid)
                              for eid in self.endpoint_ids}  # type: ignore[attr-defined]
        return out
