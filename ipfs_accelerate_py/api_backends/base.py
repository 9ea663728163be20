"""``BaseApiBackend``: the request pipeline every backend shares. Nothing here knows vLLM.

    submit(request) ──> queue (priority, aging) ──> dispatcher task ──> batch collect
        ──> call: [breaker admit ─> adapter.format_request ─> transport ─> adapter.parse_*]
                  wrapped in the retry loop, bounded by the call's deadline
        ──> metrics + recent_requests ──> the caller's future

Everything right of the queue runs as coroutines on the client's own event loop
(``_loop.ClientLoop``, one thread per client): the sync face (``run_inference``,
``generate_text``, ``chat_completion``, handlers, ``submit``) queues a job from the caller's
thread and waits on its future; the async face (async_face.py) awaits the same future.
Streams (streaming.py) take the same breaker, retry (before the first chunk only) and
metrics. Each endpoint (_core/endpoint.py) owns the parts that serve it: its queue and dispatcher,
in-flight limit and circuit (_core/breaker.py: the breaker with its prober, an attempt's wait and
verdicts), built from what each needs. Each concern's public face is a mixin holding its own
state (mixins/), calling of this class only what ``mixins/_host.Host`` declares. A backend
is a subclass that names its adapter (``backend_name``); the adapter comes from the plugin
manager.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import threading
import weakref
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import (Any, Callable, ClassVar, Dict, Hashable, Iterator, List, Optional, Sequence,
                    Tuple, Union)

from . import errors, tracing
from .adapter import BackendAdapter
from .clock import SYSTEM_CLOCK, Clock
from .context import learn_model_lengths
from .limits import RequestLimits, cap_request
from .errors import ClientClosedError, ConfigurationError, ValidationError
from ._core.endpoint import Endpoint
from ._core.batcher import batch_key
from .mixins.batching import BatchingMixin
from .mixins.circuit_breaker import CircuitBreakerMixin
from .mixins.metrics import MetricsMixin
from .mixins.multiplexing import MultiplexingMixin
from ._core.queue import Job
from .mixins.queue import QueueMixin
from .mixins.attempt import AttemptMixin
from ._core.loop import ClientLoop
from .mixins.retry import RetryMixin
from .mixins.routing import RoutingMixin
from .async_face import AsyncFaceMixin
from .call_shapes import check_timeout, pop_send_options, stream_call
from .request_build import build_request, chat_request, stream_request
from .models import (ChatRequest, CompletionRequest, CompletionResult, Request, check_priority,
                     updated)
from .operations import OperationRequest, OperationsMixin
from .plugins import get_backend
from .settings import ClientSettings
from .streaming import StreamingMixin, TextStream
from ._streaming.opening import StreamOpener
from ._transports.aio import AioTransport
from .transport import (AsyncTransport, HttpRequest, HttpResponse, RequestsTransport, Transport,
                        as_async_transport)

__all__ = ["BaseApiBackend", "Endpoint", "TextStream", "build_request"]

log = logging.getLogger("ipfs_accelerate_py.api_backends")

TransportFactory = Callable[[ClientSettings], Transport]
_LOOPBACK = ("localhost", "127.", "::1", "[::1]")


def default_transport(settings: ClientSettings) -> Transport:
    """A sync transport built from ``settings`` as the client builds its own (key, TLS,
    proxies, ``trust_env``, the reply cap): a ``RequestsTransport``. The client does not use
    it unless told to (aiohttp carries its requests); it is what a ``transport_factory``
    that wraps a real transport starts from (a counting or rewriting one), and a one-off
    sync request outside the client."""
    verify: Any = settings.ca_bundle or settings.verify_tls
    return RequestsTransport(settings.base_url, settings.api_key_value,
                             pool_size=max(settings.max_concurrent_requests, 10), verify=verify,
                             trust_env=settings.trust_env, proxies=settings.proxies,
                             extra_headers=settings.extra_headers,
                             max_response_bytes=settings.max_response_bytes)


class BaseApiBackend(QueueMixin, BatchingMixin, RetryMixin, AttemptMixin, CircuitBreakerMixin,
                     MetricsMixin, MultiplexingMixin, RoutingMixin, StreamingMixin,
                     AsyncFaceMixin, OperationsMixin):
    """A resilient client for one backend kind, over one or many endpoints."""

    #: the adapter's registered name; subclasses set it
    backend_name: ClassVar[str] = ""

    def __init__(self, settings: Optional[ClientSettings] = None, *,
                 adapter: Optional[BackendAdapter] = None,
                 transport_factory: Optional[TransportFactory] = None,
                 clock: Optional[Clock] = None, **overrides: Any) -> None:
        if adapter is None:
            if not self.backend_name:
                raise ConfigurationError("a backend needs backend_name or an adapter",
                                         field="backend_name")
            adapter = get_backend(self.backend_name)
        self._adapter = adapter
        if settings is None:
            settings = ClientSettings.from_env(adapter.env_prefix, overrides)
        elif any(v is not None for v in overrides.values()):
            settings = settings.replace(**overrides)
        self._settings = settings
        self._clock = clock or SYSTEM_CLOCK
        #: a caller's transports, one per endpoint (None: aiohttp, ``AioTransport``)
        self._transport_factory = transport_factory
        #: where the pipeline's coroutines run (started by the first request)
        self._loop = ClientLoop(f"{self.backend_name or 'api'}-client")
        self._closing = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        #: this client's output caps and known context lengths, by model (limits.py)
        self.request_limits = RequestLimits()
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self._endpoint_ids = itertools.count(1)
        self._endpoints: Dict[str, Endpoint] = {}
        # each mixin's own state (mixins/_host.py: what they may use of this class)
        self._init_metrics(settings.latency_window, settings.recent_requests_size)
        self._init_circuits()
        self._init_routing()
        self._init_attempts()
        #: opens every streamed reply, both faces' and the shared streams'
        self._opener = StreamOpener(self._attempts, self._aretry)
        self._init_batching()
        self._init_streaming()
        self._init_async_face()
        self._endpoints["default"] = self._make_endpoint("default", settings)
        _live_clients.add(self)

    # ------------------------------------------------------------------ endpoints
    def _make_endpoint(self, endpoint_id: str, settings: ClientSettings) -> Endpoint:
        self._warn_plain_http_key(settings)
        transport = self._new_transport(settings)
        return Endpoint(endpoint_id, settings, transport, self._loop, self._clock, self._closing,
                        self._metrics, self._circuit_waiters, self._batcher.handle_job,
                        self._adapter.health_request(),
                        self._probe_transport(settings, transport),
                        name=f"{self.backend_name or 'api'}-{endpoint_id}")

    def _new_transport(self, settings: ClientSettings) -> AsyncTransport:
        """An endpoint's transport: aiohttp, or what the caller's ``transport_factory``
        makes (a sync one adapted to the seam, run in the client's executor)."""
        if self._transport_factory is None:
            return AioTransport.from_settings(settings)
        return as_async_transport(self._transport_factory(settings), self._executor())

    @staticmethod
    def _probe_transport(settings: ClientSettings, transport: AsyncTransport) -> AsyncTransport:
        """The probes' transport: aiohttp's, a second one (its own connections: see
        ``Endpoint.probe_transport``); a caller's transport, that transport itself."""
        if isinstance(transport, AioTransport):
            return AioTransport.from_settings(settings)
        return transport

    def _renew_transport(self, ep: Endpoint) -> None:
        """A caller's transport made again from the endpoint's settings now (its pool was
        sized from the old concurrency); calls in flight finish on the old one, which is
        closed. aiohttp's pool has no size to change: its transport stays."""
        if self._transport_factory is None:
            return
        old, ep.transport = ep.transport, self._new_transport(ep.settings)
        ep.probe_transport = ep.transport
        old.close()

    _warned_hosts: "set[str]" = set()

    def _warn_plain_http_key(self, settings: ClientSettings) -> None:
        """Warn once per host when a key would cross a network in clear text."""
        if settings.api_key is None or not settings.base_url.startswith("http://"):
            return
        host = settings.base_url[len("http://"):].split("/")[0].rsplit(":", 1)[0]
        if host.startswith(_LOOPBACK) or host in BaseApiBackend._warned_hosts:
            return
        BaseApiBackend._warned_hosts.add(host)
        log.warning("an API key will be sent over plain http to %s; use https", host)

    def add_endpoint(self, endpoint_id: Optional[str] = None, **overrides: Any) -> str:
        """Add an endpoint (own session, key, limits, queue, breaker, stats); return its id."""
        settings = self._settings.replace(**overrides)
        with self._lock:
            if self._closed:
                raise ClientClosedError("client is closed")
            eid = endpoint_id or f"endpoint_{next(self._endpoint_ids)}"
            if eid in self._endpoints:
                raise ConfigurationError(f"endpoint {eid!r} exists already", field="endpoint_id")
            self._endpoints[eid] = self._make_endpoint(eid, settings)
        self._router.note_endpoints()
        return eid

    def _endpoint(self, endpoint_id: Optional[str]) -> Endpoint:
        if endpoint_id is None:
            return self._endpoints["default"]
        try:
            return self._endpoints[endpoint_id]
        except (KeyError, TypeError):
            raise ConfigurationError(f"no endpoint {endpoint_id!r}; known: {sorted(self._endpoints)}",
                                     field="endpoint_id") from None

    def _default_endpoint(self) -> Endpoint:
        return self._endpoints["default"]

    def _set_on_all_endpoints(self, **changes: Any) -> None:
        self._settings = self._settings.replace(**changes)
        for ep in self._endpoints.values():
            ep.reconfigure(ep.settings.replace(**changes))

    @property
    def settings(self) -> ClientSettings:
        return self._settings

    @property
    def adapter(self) -> BackendAdapter:
        return self._adapter

    @property
    def endpoint_ids(self) -> List[str]:
        return list(self._endpoints)

    # ------------------------------------------------------------------ submitting
    def _new_job(self, ep: Endpoint, request: Request, priority: int,
                 timeout: Optional[float], fail_fast: bool = False, lazy: bool = False) -> Job:
        now = self._clock.monotonic()
        deadline = now + (timeout if timeout is not None else ep.settings.effective_deadline)
        model = request.model or ep.settings.model
        if request.model is None and model is not None:
            request = updated(request, {"model": model})  # a valid name (settings)
        request = cap_request(self, request)
        adapter = self._adapter
        s = ep.settings
        key: Optional[Hashable] = None
        if not (s.batch_enabled and s.max_batch_size > 1 and ep.shares_prompt_lists):
            pass  # never shares: no key to work out (its sampling key costs a model dump)
        elif isinstance(request, OperationRequest):  # the operation's own batching rule
            shared = request.share_key()
            key = None if shared is None else (ep.id, shared)
        else:
            key = batch_key(ep.id, request, adapter.supports_prompt_list,
                            s.batch_chat and adapter.supports_chat_batch and ep.chat_batch_supported)
        if key is not None:
            key = (key, fail_fast)  # fail-fast and waiting callers never share a call
        rid = self._new_request_id()
        job = Job(request, priority, deadline, key, model, rid, now, fail_fast, lazy)
        tracing.job_created(self, ep, job)  # a span under the caller's context (tracing.py)
        return job

    def _new_request_id(self) -> str:
        """Unique per process and client: the prefix is random, the count is this client's."""
        return f"{self._id_prefix}-{next(self._ids)}"

    def submit(self, request: Request, priority: int = 1, endpoint_id: Optional[str] = None,
               timeout: Optional[float] = None,
               fail_fast: Optional[bool] = None) -> "Future[CompletionResult]":
        """Queue ``request``; the future resolves to a result or a typed error, always.

        While the endpoint's circuit is OPEN the request waits for it (within its deadline);
        ``fail_fast`` (default: the ``fail_fast`` setting) rejects it with
        ``CircuitOpenError`` instead."""
        accepted = self._accept(request, priority, endpoint_id, timeout, fail_fast)
        if isinstance(accepted, Future):
            return accepted
        ep, job = accepted
        self._start_job(ep, job)
        return job.future

    def _accept(self, request: Request, priority: int, endpoint_id: Optional[str],
                timeout: Optional[float], fail_fast: Optional[bool], lazy: bool = False
                ) -> Union["Future[CompletionResult]", Tuple[Endpoint, Job]]:
        """``submit``'s checks and choice, for both faces: the routed call's future when
        routing over every endpoint took it, else ``(endpoint, its job)``, the job not
        started yet (``lazy``: its future made only when asked for: ``Job``)."""
        check_priority(priority)
        timeout = check_timeout(timeout)
        self._settle_backend()
        if not isinstance(request, (CompletionRequest, ChatRequest, OperationRequest)):
            raise ValidationError(f"must be a CompletionRequest, ChatRequest or OperationRequest, not "
                                  f"{type(request).__name__}", field="request")
        if request.stream:
            raise ValidationError("streaming requests go through stream(), not submit()",
                                  field="stream")
        if self._closed:
            raise ClientClosedError("client is closed")
        if endpoint_id is None and (self._settings.routing or self._lora_book.parents):
            # (a dict, not a call: every request reads it; an adapter known: lora_routing.py)
            routed = self._routed_submit(request, priority, timeout)
            if routed is not None:  # the routing setting: over every endpoint (mixins/routing.py)
                return routed
        ep = self._endpoint(endpoint_id)
        return ep, self._new_job(ep, request, priority, timeout, ep.fail_fast(fail_fast), lazy)

    def _use_adapter(self, adapter: BackendAdapter) -> None:
        """Speak through ``adapter`` from now on, the client and the parts that read it (the
        attempt, the batcher, the shared streams): a backend that learns its server's API on the first call
        (``_settle_backend``) switches here."""
        self._adapter = adapter
        self._attempts.adapter = adapter
        self._batcher.adapter = adapter
        self._shared_streams.adapter = adapter

    def _settle_backend(self) -> None:
        """What a backend must learn from its server before the first call is queued
        (``VllmClient``: which API it speaks, for ``api_flavor="auto"``); asked by the first
        call, not by the constructor. Nothing here."""

    async def _asettle_backend(self) -> None:
        """``_settle_backend`` for coroutines (the async face awaits it on its caller's loop
        before anything reads the adapter). Nothing here."""

    def _start_job(self, ep: Endpoint, job: Job) -> None:
        """Queue ``job`` for ``ep``'s dispatcher (or, queue off, start it on the loop)."""
        if ep.settings.queue_enabled:
            self._enqueue(ep, job)
            if job.fail_fast and ep.queue.paused and ep.queue.remove(job):
                ep.circuit.refuse(job)  # the circuit opened as it was queued
        else:
            self._loop.spawn(self._batcher.handle_job(ep, job))

    def execute(self, request: Request, priority: int = 1, endpoint_id: Optional[str] = None,
                timeout: Optional[float] = None,
                fail_fast: Optional[bool] = None) -> CompletionResult:
        """``submit`` and wait; never longer than the call's deadline (plus a little grace).
        Not from the client's own loop (a done callback of its futures): use ``asubmit``."""
        if self._loop.in_loop():
            raise errors.ConfigurationError(
                "a blocking call from the client's event loop would never finish; "
                "use submit() or the async face there", field="execute")
        fut = self.submit(request, priority, endpoint_id, timeout, fail_fast)
        ep = self._endpoint(endpoint_id)
        limit = (timeout if timeout is not None else ep.settings.effective_deadline) + 1.0
        try:
            return fut.result(limit)
        except FutureTimeout:
            if not fut.done():
                try:
                    fut.set_exception(errors.TimeoutError(
                        f"no result within the call deadline of {limit - 1.0:.1f}s"))
                except Exception:  # noqa: BLE001 - the worker resolved it just now
                    pass
            return fut.result(0)

    # ------------------------------------------------------------------ one call
    # ``_call`` (retries around one attempt) is RetryMixin._call (mixins/retry.py)
    def request_raw(self, http: HttpRequest, endpoint_id: Optional[str] = None,
                    timeout: Optional[float] = None) -> HttpResponse:
        """A non-inference call (models, version, metrics) with breaker and retries."""
        self._check_open()
        ep = self._endpoint(endpoint_id)
        limit = timeout or ep.settings.effective_deadline
        response: HttpResponse = self._loop.run(self._arequest_raw(http, ep, limit), limit + 1.0)
        return response

    async def _arequest_raw(self, http: HttpRequest, ep: Endpoint, timeout: float) -> HttpResponse:
        deadline = self._clock.monotonic() + timeout
        ff = ep.settings.fail_fast
        response: HttpResponse = await tracing.ain_span(f"{http.method} {http.path}", lambda: self._aretry(
            ep, lambda n: self._attempts.send(ep, http, deadline, ff), deadline, None))
        return response

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("client is closed")

    # ------------------------------------------------------------------ high level, generic
    def run_inference(self, model_id: Optional[str], inputs: Any,
                      parameters: Optional[Dict[str, Any]] = None, priority: int = 1,
                      endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
                      timeout: Optional[float] = None) -> CompletionResult:
        """Text, a list of texts (ONE call, a prompt list) or chat messages -> a result."""
        request = build_request(inputs, model_id, parameters, adapter=self._adapter)
        return self.execute(request, priority, endpoint_id, check_timeout(timeout), fail_fast)

    def submit_inference(self, model_id: Optional[str], inputs: Any,
                         parameters: Optional[Dict[str, Any]] = None, priority: int = 1,
                         endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
                         timeout: Optional[float] = None) -> "Future[CompletionResult]":
        """Non-blocking ``run_inference``: returns a future (lets one thread fill a batch)."""
        return self.submit(build_request(inputs, model_id, parameters, adapter=self._adapter),
                           priority, endpoint_id, check_timeout(timeout), fail_fast)

    def generate_text(self, prompt: str, model: Optional[str] = None, priority: int = 1, *,
                      endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
                      timeout: Optional[float] = None, **parameters: Any) -> str:
        """One prompt -> the generated text."""
        if not isinstance(prompt, str):
            raise ValidationError(f"must be a string, got {type(prompt).__name__}", field="prompt")
        return self.run_inference(model, prompt, parameters, priority, endpoint_id, fail_fast,
                                  timeout).text

    def chat_completion(self, messages: Sequence[Dict[str, Any]], model: Optional[str] = None,
                        priority: int = 1, *, endpoint_id: Optional[str] = None,
                        fail_fast: Optional[bool] = None, timeout: Optional[float] = None,
                        **parameters: Any) -> CompletionResult:
        """Chat messages -> the assistant's reply (``.text``)."""
        return self.execute(chat_request(self._adapter, messages, model, parameters), priority,
                            endpoint_id, check_timeout(timeout), fail_fast)

    def stream_generation(self, *args: Any, **kwargs: Any) -> Iterator[str]:
        """A prompt or chat messages -> an iterator of text pieces as the server makes them.

        Takes the call shapes of ``run_inference`` as well as the short one:
        ``stream_generation(prompt, model=..., **sampling)``,
        ``stream_generation(model_id=..., inputs=..., parameters={...})`` and
        ``stream_generation(MODEL, prompt, parameters={...})`` (see ``call_shapes``)."""
        options = pop_send_options(kwargs)
        model, prompt, parameters = stream_call(args, kwargs)
        return self.stream(stream_request(self._adapter, prompt, model, parameters),
                           **options).texts()

    def list_models(self, endpoint_id: Optional[str] = None) -> List[Dict[str, Any]]:
        """The models the server serves (dicts with at least ``id``). Their ``max_model_len``
        is remembered: from then on a ``max_tokens`` that cannot fit is refused before sending."""
        resp = self.request_raw(self._adapter.models_request(), endpoint_id)
        models = self._adapter.parse_models(resp)
        learn_model_lengths(self, models)
        self._lora_learn(endpoint_id, models)  # adapters (``parent``) and where they are
        return models

    def create_endpoint_handler(self, model: Optional[str] = None,
                                parameters: Optional[Dict[str, Any]] = None) -> Callable[[Any], Any]:
        """The framework's one-argument handler, built by the adapter, bound to this client."""
        return self._adapter.create_endpoint_handler(self, model, parameters)

    # ------------------------------------------------------------------ lifecycle
    def close(self, timeout: Optional[float] = None) -> None:
        """Stop serving, fail what is still queued, release connections. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._closing.set()
        self._circuit_waiters.close()  # they find the client closed
        self._wake_sleepers()  # retries' backoffs end now (attempt.py)
        for ep in self._endpoints.values():
            ep.limit.wake()  # callers waiting for a slot see the close
            for job in ep.queue.close():
                job.fail(ClientClosedError("client closed before this request was sent"))
                self._metrics.record_unsent(ep.id, job, self._clock.monotonic())
        wait = timeout if timeout is not None else self._settings.timeout + 1.0
        end = self._clock.monotonic() + wait
        here = _running_loop()  # its own requests cannot end while this thread waits
        idle = True
        for ep in self._endpoints.values():
            # the jobs being sent end (answered, or failed closing)
            idle = ep.workers.join(max(0.0, end - self._clock.monotonic()), here) and idle
            ep.circuit.join(wait)
        for ep in self._endpoints.values():
            ep.close_transports()
        self._close_transports(idle)  # aiohttp sessions, on their loops; the executor
        self._loop.stop(wait)
        _live_clients.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "BaseApiBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self._settings.base_url} endpoints={len(self._endpoints)}"
                f"{' closed' if self._closed else ''}>")

def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_live_clients: "weakref.WeakSet[BaseApiBackend]" = weakref.WeakSet()


@atexit.register
def _close_all_clients() -> None:
    """Close every client still open at interpreter exit (workers, sockets)."""
    for client in list(_live_clients):
        try:
            client.close(timeout=2.0)
        except Exception:  # noqa: BLE001
            pass
