"""Routing across endpoints: pick one by strategy, skip open breakers, fail over.

``route_inference`` orders the candidate endpoints by a strategy, skips every endpoint whose
circuit breaker is OPEN, and sends the request to the first one. When that endpoint fails
in a way another server might not (connection refused or dropped, timeout, 5xx, 429,
its breaker opening, its queue full) the next endpoint gets the request. Errors that are
the caller's (400, 401, 404, validation) are raised at once: another server would refuse
the same request. Routed attempts are fail-fast: an endpoint whose circuit opens hands the
request back at once, to fail over. When every candidate is down (its circuit not CLOSED and
probed on a schedule) the request waits, holding no thread, for the first to close, within
its deadline (then ``CircuitWaitTimeoutError``), unless the call is ``fail_fast`` (then
``NoHealthyEndpointError`` at once). Otherwise, when every endpoint was skipped or failed,
the call raises ``NoHealthyEndpointError``, which names what happened at each (or
``TimeoutError`` when the last attempt timed out past the call's own deadline).

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

The decisions (candidates, a strategy's order, loads, the OPEN check, statistics) are the
router's, a part with its dependencies handed in (``_routing/router.py``: ``Router``); this
mixin is routing's public face (``route_inference``, ``route_submit``, ``routing_order``,
``set_load_probe``, ``set_cache_aware_options``, the load reads, ``get_routing_stats``) and
sends and fails over routed calls and streams by the router's order.

Nothing here knows a particular server.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..call_shapes import check_timeout
from ..endpoint_load import LoadReport
from ..errors import (ApiError, CircuitWaitTimeoutError, NoHealthyEndpointError, TimeoutError,
                      ValidationError)
from ..models import check_priority
from ..request_build import build_request
from ._host import HostBase
from .._core.breaker import can_wait_for_any
from .lora_routing import ADAPTER_OPS, LoraLoadError, LoraRoutingMixin
from .._routing.router import Router
from .._routing.state import (OpeningOrder, FAILOVER_ERRORS, LATENCY_WINDOW, STRATEGIES,
                              Attempts, LoadProbe, RoutingState)

__all__ = ["RoutingMixin", "STRATEGIES", "FAILOVER_ERRORS", "LoadProbe"]

class RoutingMixin(LoraRoutingMixin, HostBase):
    """``route_inference`` over this client's endpoints (see the module docstring); a
    request for a LoRA adapter goes where the adapter is (``lora_routing``)."""

    #: the order routed calls try the endpoints in, and routing's state (``_routing/router.py``)
    _router: Router

    def _init_routing(self) -> None:
        self._router = Router(self._endpoint, self._endpoints, self._clock)
        self._init_lora()

    def set_load_probe(self, probe: Optional[LoadProbe], min_interval: float = 1.0) -> None:
        """Use ``probe(endpoint)`` (a server-side load figure) for ``least-loaded``; None stops.

        ``min_interval``: seconds a figure is reused before the endpoint is asked again.
        """
        self._router.set_load_probe(probe, min_interval)

    def set_cache_aware_options(self, prefix_chars: Optional[int] = None,
                                balance_abs_threshold: Optional[float] = None,
                                balance_rel_threshold: Optional[float] = None,
                                load_max_age: Optional[float] = None) -> None:
        """Tune ``cache-aware``: bytes of leading text hashed (UTF-8); the load bound (the
        preferred endpoint is passed over when its load exceeds the lowest by more than the
        absolute threshold AND more than the relative one times); seconds a server's load
        figure stays fresh. None keeps a value."""
        self._router.set_cache_aware_options(prefix_chars, balance_abs_threshold,
                                             balance_rel_threshold, load_max_age)

    def endpoint_load(self, endpoint_id: str) -> float:
        """What ``least-loaded`` compares: outstanding requests plus the probe's figure."""
        return self._router.endpoint_load(endpoint_id)

    def server_load(self, endpoint_id: str) -> Optional[LoadReport]:
        """The server's freshest load report (reply header, else the probe), None if stale."""
        return self._router.server_load(endpoint_id)

    def cache_aware_loads(self, endpoint_ids: Sequence[str]) -> Dict[str, float]:
        """What ``cache-aware`` compares: own outstanding requests, or the server's queue
        where that is larger (a stale or missing server figure counts as the largest fresh
        one, or as 0 when no endpoint has a fresh figure)."""
        return self._router.cache_aware_loads(endpoint_ids)

    def endpoint_latency_p50(self, endpoint_id: str) -> Optional[float]:
        """Median latency of the endpoint's recent routed calls (None before the first)."""
        return self._router.endpoint_latency_p50(endpoint_id)

    def routing_order(self, strategy: str = "round-robin",
                      endpoint_ids: Optional[Sequence[str]] = None,
                      request: Any = None) -> List[str]:
        """The order ``route_inference`` would try the endpoints in (advances the rotation).
        ``cache-aware`` places by ``request``'s leading text."""
        router = self._router
        return router.order(strategy, router.candidates(endpoint_ids), request)[0]

    # ------------------------------------------------------------------ routing
    def route_inference(self, model_id: Optional[str], inputs: Any,
                        parameters: Optional[Dict[str, Any]] = None, priority: int = 1,
                        strategy: str = "round-robin",
                        endpoint_ids: Optional[Sequence[str]] = None, *,
                        endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
                        timeout: Optional[float] = None) -> Any:
        """``run_inference`` on the best healthy endpoint, failing over to the next ones.
        The options every way to send takes (docs/request-parameters.md): ``endpoint_id``
        routes to that one endpoint only; ``fail_fast`` raises ``NoHealthyEndpointError``
        at once when every endpoint is down, instead of waiting for a circuit to close;
        ``timeout`` bounds the whole call, failovers included."""
        if strategy not in STRATEGIES:
            raise ValidationError(f"must be one of {list(STRATEGIES)}, got {strategy!r}",
                                  field="strategy")
        ids = self._router.candidates(_routed_ids(endpoint_ids, endpoint_id))
        request = build_request(inputs, model_id, parameters, adapter=self._adapter)
        # (the options are checked once, by route_submit, before anything is sent)
        return self.route_submit(request, priority, strategy, ids, timeout,
                                 fail_fast=fail_fast).result()

    def route_submit(self, request: Any, priority: int = 1, strategy: str = "round-robin",
                     endpoint_ids: Optional[Sequence[str]] = None,
                     timeout: Optional[float] = None, *, endpoint_id: Optional[str] = None,
                     fail_fast: Optional[bool] = None) -> "Future[Any]":
        """``submit`` a typed request to the best healthy endpoint; the future fails over.
        ``endpoint_id``, ``fail_fast``, ``timeout``: as ``route_inference``'s.

        A failure another endpoint may not have moves the request on, from the callback of
        the failed attempt: no thread waits for a routed request."""
        timeout = check_timeout(timeout)
        check_priority(priority)
        candidates = self._router.candidates(_routed_ids(endpoint_ids, endpoint_id))
        order, key = self._router.order(strategy, candidates, request)
        lora = self._lora_name(request)
        if lora is not None:  # only where the adapter is, or can be loaded (lora_routing.py)
            order = self._lora_order(lora, order)
        state = self._router.state
        with state.lock:
            state.routed += 1
        wait = timeout if timeout is not None else max(
            self._endpoint(eid).settings.effective_deadline for eid in order)
        job = Attempts(order, key, self._clock.monotonic() + wait)
        job.lora = lora
        # (unsaid: as the endpoints' own ``fail_fast`` setting says, when they all agree)
        job.fail_fast = bool(fail_fast) if fail_fast is not None else all(
            self._endpoint(eid).fail_fast(None) for eid in order)
        self._attempt(state, job, 0, request, priority, timeout)
        return job.future

    def _attempt(self, state: RoutingState, job: Attempts, i: int, request: Any,
                 priority: int, timeout: Optional[float]) -> None:
        while i < len(job.order):
            eid = job.order[i]
            i += 1
            if self._router.is_open(eid):
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
        if (not self._closed and not job.fail_fast and self._clock.monotonic() < job.deadline
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
        if isinstance(job.last, TimeoutError) and self._clock.monotonic() >= job.deadline:
            # the call's own deadline ended it, not the endpoints' health: its caller's error
            error: ApiError = TimeoutError(
                f"the call's deadline passed after {len(job.tried)} attempt(s): "
                + "; ".join(job.tried), attempts=job.tried)
        else:
            error = NoHealthyEndpointError(
                f"no healthy endpoint among {len(job.order)}: " + "; ".join(job.tried),
                attempts=job.tried)
        error.__cause__ = job.last
        _resolve(job.future, error=error)

    def _send_attempt(self, state: RoutingState, job: Attempts, i: int, eid: str, request: Any,
                      priority: int, timeout: Optional[float]) -> bool:
        """Send ``request`` to ``eid``: True when handed on (to the attempt's callback, or
        the caller's error settled); False when it failed over at once (try the next)."""
        start = self._clock.monotonic()
        if timeout is not None:  # the call's deadline bounds every attempt, failovers included
            if start >= job.deadline:
                if job.last is None:
                    job.last = TimeoutError("the call's deadline passed before it was sent",
                                            sent=False)
                return False
            timeout = job.deadline - start
        with state.lock:
            state.outstanding[eid] += 1
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
                    Router.note_prefix(state, eid, job.key)
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
        ids = self._router.routing_candidates()
        if len(ids) < 2 and lora is None:
            return None
        return self.route_submit(request, priority, strategy or "round-robin", ids, timeout)

    def _stream_order(self, strategy: str, ids: List[str], request: Any) -> List[str]:
        """A routed stream's order: the strategy's, by adapter affinity for an adapter's."""
        order, _ = self._router.order(strategy, ids, request)
        lora = self._lora_name(request)
        return order if lora is None else self._lora_order(lora, order)

    def _stream_routing(self, request: Any) -> Tuple[Optional[str], Optional[str], List[str]]:
        """(strategy, adapter, endpoints) of a stream that names no endpoint; no endpoints
        when it is not routed (the setting off and no adapter, or one endpoint and no adapter)."""
        strategy = self._settings.routing
        lora = self._lora_name(request)
        if not strategy and lora is None:
            return None, None, []
        ids = self._router.routing_candidates()
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
        opening = OpeningOrder(self._stream_order(strategy, ids, request), self._router.is_open)
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
        return self._router.stats()


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


def _routed_ids(endpoint_ids: Optional[Sequence[str]],
                endpoint_id: Optional[str]) -> Optional[Sequence[str]]:
    """The endpoints a routed call may use: ``endpoint_ids``, or ``endpoint_id`` alone."""
    if endpoint_id is None:
        return endpoint_ids
    if endpoint_ids is not None:
        raise ValidationError("give endpoint_id or endpoint_ids, not both", field="endpoint_id")
    return [endpoint_id]
