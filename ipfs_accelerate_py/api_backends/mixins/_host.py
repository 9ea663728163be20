"""``Host``: what a mixin may call of the client it is mixed into, and nothing else.

Each mixin holds its own state (made by its ``_init_<concern>()``, which the client's
``__init__`` calls) and reaches the rest of the client only through the members declared
here, so that mypy checks every such call and a reader sees each mixin's dependencies in
one screen. A mixin subclasses ``HostBase``: ``Host`` for the type checker, ``object`` at
run time (a mixin's run-time bases stay plain, and the protocol's stubs never shadow the
real members). Every mixin has it as a base, so it comes after all of them in the MRO: a
member declared here and defined nowhere makes the client abstract, an error for mypy.

Who provides what (and who uses it):

* the client, ``base.BaseApiBackend``: settings, clock, adapter, endpoints, its event loop,
  lifecycle and the request paths (``submit``, ``stream``, ``run_inference``);
* ``attempt.AttemptMixin``: ``_attempts``, one attempt as a coroutine (``_core/attempt.py``:
  retry, streaming), ``_asleep`` (batching, retry, streaming, the async face);
* the client again: ``_opener``, the part that opens a streamed reply
  (``_streaming/opening.py``: streaming, the async face, batching's shared streams);
* ``metrics.MetricsMixin``: ``_metrics``, the recorder (batching, retry, streaming,
  multiplexing); every request's outcome is the request log's (``RequestLog.finish``, handed
  to the batcher), not the client's;
* ``queue.QueueMixin``: ``current_requests`` (metrics);
* ``circuit_breaker.CircuitBreakerMixin``: ``circuit_states`` (metrics), the board of
  callers waiting for a circuit to close (``_circuit_waiters``: routing);
* ``batching.BatchingMixin``: ``_batcher`` (the dispatchers' handler; the async face's
  served-here path);
* ``retry.RetryMixin``: ``_call`` (handed to the batcher);
* ``routing.RoutingMixin``: ``_routed_stream`` (streaming), and its part, the router
  (``_router``, ``_routing/router.py``: its state's load board handed to the attempt, the
  candidates LoRA routing lists, the OPEN check a routed async stream skips by);
* the client again: ``close``.

What is an endpoint's part is reached through the endpoint, not through here: its circuit
(``ep.circuit``, ``breaker.Circuit``: admission, the wait for an OPEN circuit, the verdicts),
queue, dispatcher and in-flight limit, its ``fail_fast`` choice (``endpoint.Endpoint``); a
request never sent is counted by the recorder (``_metrics.record_unsent``).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Protocol

if TYPE_CHECKING:  # types only: the mixins import this module, and these import the mixins
    from ..adapter import BackendAdapter
    from .._core.breaker import CircuitWaiters
    from .._core.attempt import Attempt
    from .._core.batcher import Batcher
    from .._core.endpoint import Endpoint
    from ..clock import Clock
    from ..models import CompletionResult, Request
    from ..settings import ClientSettings
    from ..streaming import TextStream
    from .._routing.router import Router
    from .._streaming.opening import StreamOpener
    from .._core.loop import ClientLoop
    from .._observability.recorder import MetricsRecorder

__all__ = ["Host", "HostBase"]


class Host(Protocol):
    """The client as its mixins see it."""

    # -- the client's own state (base.BaseApiBackend.__init__)
    _settings: ClientSettings
    _clock: Clock
    _adapter: BackendAdapter
    _closing: threading.Event  # set on close(): waits and sleeps end early
    _closed: bool
    _endpoints: Dict[str, "Endpoint"]
    # -- metrics.MetricsMixin
    _metrics: MetricsRecorder

    # -- the client: endpoints
    @property
    def endpoint_ids(self) -> List[str]: ...

    def _endpoint(self, endpoint_id: Optional[str]) -> "Endpoint": ...

    def _set_on_all_endpoints(self, **changes: Any) -> None: ...

    def add_endpoint(self, endpoint_id: Optional[str] = None, **overrides: Any) -> str: ...

    # -- the client: requests
    def _check_open(self) -> None: ...

    def _settle_backend(self) -> None: ...

    async def _asettle_backend(self) -> None: ...

    def _accept(self, request: Request, priority: int, endpoint_id: Optional[str],
                timeout: Optional[float], fail_fast: Optional[bool]) -> Any: ...

    def _start_job(self, ep: "Endpoint", job: Any) -> None: ...

    def _new_request_id(self) -> str: ...

    def submit(self, request: Request, priority: int = 1, endpoint_id: Optional[str] = None,
               timeout: Optional[float] = None,
               fail_fast: Optional[bool] = None) -> "Future[CompletionResult]": ...

    def run_inference(self, model_id: Optional[str], inputs: Any,
                      parameters: Optional[Dict[str, Any]] = None, priority: int = 1,
                      endpoint_id: Optional[str] = None,
                      fail_fast: Optional[bool] = None) -> CompletionResult: ...

    def stream(self, request: Request, endpoint_id: Optional[str] = None,
               fail_fast: Optional[bool] = None) -> "TextStream": ...

    # -- attempt.AttemptMixin: one attempt (the part), and the waits close() ends
    _loop: "ClientLoop"
    _attempts: "Attempt"

    async def _asleep(self, seconds: float, doing: str) -> None: ...

    # -- the client: the part that opens a streamed reply (streaming, async face, batching)
    _opener: "StreamOpener"

    # -- queue.QueueMixin
    @property
    def current_requests(self) -> int: ...

    # -- circuit_breaker.CircuitBreakerMixin
    _circuit_waiters: "CircuitWaiters"

    def circuit_states(self) -> Dict[str, str]: ...

    # -- batching.BatchingMixin
    _batcher: "Batcher"

    # -- retry.RetryMixin, routing.RoutingMixin
    async def _call(self, ep: "Endpoint", request: Request, deadline: float,
                    model: Optional[str], request_id: str, queue_priority: Optional[int] = None,
                    fail_fast: bool = False, first_attempt: int = 0,
                    last_attempt: Optional[int] = None,
                    fresh_id: bool = False) -> CompletionResult: ...

    def _routed_stream(self, request: Any, priority: int = 1,
                       timeout: Optional[float] = None) -> Any: ...

    # -- routing.RoutingMixin: the router (the async face routes its streams as the sync
    # face does; the attempt is handed its load board; LoRA routing reads its candidates)
    _router: "Router"

    # -- the client: closing
    def close(self, timeout: Optional[float] = None) -> None: ...


if TYPE_CHECKING:
    HostBase = Host
else:
    HostBase = object
