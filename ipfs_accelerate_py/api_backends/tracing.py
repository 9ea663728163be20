"""OpenTelemetry traces, metrics and request-scoped logs, for whoever configured a provider.

The pipeline calls the hooks below at the points that matter for one request; each hook
costs a dict lookup and returns when no tracer or meter provider is configured (see
``_observability/otel.py``), and nothing here imports ``opentelemetry``. With a tracer provider:

- every submitted request gets a CLIENT span ``{gen_ai.operation.name} {gen_ai.request.model}``
  started in the caller's thread (so it is a child of the caller's current span) and ended
  when its future resolves, with the GenAI request/response attributes;
- its queue wait, the time its circuit held it, waits for the circuit or an in-flight slot
  and each retry are span events;
- a shared (batched) call gets its own span, child of the first caller's span, linked to
  every caller's span (and each caller's span links back), recording the batch size;
- a stream's span records the time to first chunk;
- every HTTP request sent for a traced operation carries W3C ``traceparent`` /
  ``tracestate`` (shared calls and health probes included), so vLLM continues the trace.

With a meter provider the same operations feed ``gen_ai.client.operation.duration``,
``gen_ai.client.token.usage`` and, for streams, ``gen_ai.client.operation.time_to_first_chunk``.

Log lines emitted while a request is being worked on carry ``[request_id=... trace_id=...]``
(and ``record.request_id`` / ``record.trace_id``), tracing or not. Prompts, completions,
headers and URLs' user info are never recorded: the API key cannot reach a span.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import sys
import time
import weakref
from collections import deque
from concurrent.futures import Future
from typing import (TYPE_CHECKING, Any, Awaitable, Callable, Deque, Dict, Iterator, List, Optional,
                    Sequence, Tuple, TypeVar)
from urllib.parse import urlsplit

from ._observability import otel as _otel

if TYPE_CHECKING:
    from ._core.endpoint import Endpoint

__all__ = ["configure", "job_created", "job_started", "shared_call_started",
           "shared_call_ended", "retrying", "waited", "circuit_changed", "in_span",
           "stream_started", "working_for", "stream_adopted",
           "stream_finished",
           "with_trace_context", "RequestLogFilter"]

T = TypeVar("T")
#: waits shorter than this are not worth an event
MIN_WAIT = 0.001


def configure(tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Report to these providers instead of the global ones (None: use the global one).
    Not needed when ``opentelemetry.trace.set_tracer_provider`` was called."""
    _otel.set_providers(tracer_provider, meter_provider)


class _Local:
    """What this thread, or this task of an event loop, is working on: the request (for
    logs) and the span (for events and the wire). Each attribute is a ``ContextVar``: a
    thread sees its own values, and so does each task of the client's loop, where many
    requests are under way on one thread."""

    __slots__ = ()
    _vars: Dict[str, "contextvars.ContextVar[Any]"] = {
        name: contextvars.ContextVar(f"ipfs_accelerate.{name}", default=None)
        for name in ("rid", "future", "op", "span")}
    #: rid (str), future (a weak reference to the job, or to a stream's future: once done
    #: or gone, ``rid`` no longer describes the work), op (_Op), span

    def __getattr__(self, name: str) -> Any:
        try:
            return _Local._vars[name].get()
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        _Local._vars[name].set(value)


_local = _Local()


class _Op:
    """One traced operation: a caller's request, a shared call, or a stream."""

    __slots__ = ("telemetry", "span", "attrs", "t0", "retries", "ended", "metrics",
                 "start_ns", "__weakref__")

    def __init__(self, telemetry: _otel.Telemetry, span: Any, attrs: Dict[str, Any],
                 metrics: bool = True) -> None:
        self.telemetry = telemetry
        self.span = span
        self.attrs = attrs  # the low-cardinality ones, shared with the metrics
        self.t0 = time.monotonic()
        self.start_ns = time.time_ns()
        self.retries = 0
        self.ended = False
        self.metrics = metrics

    def event(self, name: str, attributes: Dict[str, Any], at_ns: Optional[int] = None) -> None:
        if self.span is not None:
            self.span.add_event(name, attributes, at_ns)

    def finish(self, error: Optional[BaseException] = None, error_type: Optional[str] = None,
               result: Any = None, ttft: Optional[float] = None,
               usage: Any = None, finish_reasons: Sequence[str] = ()) -> None:
        """End the span and record the metrics, once."""
        if self.ended:
            return
        self.ended = True
        if error is not None and error_type is None:
            error_type = type(error).__name__
        attrs = self.attrs if error_type is None else {**self.attrs, "error.type": error_type}
        if result is not None:
            usage = result.usage
            finish_reasons = [c.finish_reason for c in result.choices if c.finish_reason]
        ins = usage.prompt_tokens if usage is not None else 0
        outs = usage.completion_tokens if usage is not None else 0
        span = self.span
        if span is not None:
            if usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", ins)
                span.set_attribute("gen_ai.usage.output_tokens", outs)
            if finish_reasons:
                span.set_attribute("gen_ai.response.finish_reasons", list(finish_reasons))
            if result is not None:
                if result.model:
                    span.set_attribute("gen_ai.response.model", result.model)
                if result.id:
                    span.set_attribute("gen_ai.response.id", result.id)
            if self.retries:
                span.set_attribute("http.request.resend_count", self.retries)
            if ttft is not None:
                span.set_attribute("gen_ai.response.time_to_first_chunk", ttft)
                span.add_event("first_chunk", {"gen_ai.response.time_to_first_chunk": ttft},
                               self.start_ns + int(ttft * 1e9))
            if error_type is not None:
                _set_error(span, error_type, error)
            span.end()
        if self.metrics:
            self.telemetry.record(attrs, time.monotonic() - self.t0, ins, outs, ttft)


def _set_error(span: Any, error_type: str, error: Optional[BaseException]) -> None:
    trace = sys.modules["opentelemetry.trace"]
    span.set_attribute("error.type", error_type)
    # Our errors carry no secrets (errors.py redacts); cap the length all the same.
    span.set_status(trace.Status(trace.StatusCode.ERROR,
                                 str(error)[:300] if error is not None else error_type))


@functools.lru_cache(maxsize=64)
def _server(base_url: str) -> Tuple[str, int]:
    """``server.address`` / ``server.port`` of a base URL (never its user info)."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port


def _attrs(client: Any, ep: "Endpoint", request: Any, model: Optional[str]) -> Dict[str, Any]:
    chat = getattr(request, "messages", None) is not None or hasattr(request, "conversations")
    address, port = _server(ep.settings.base_url)
    op = getattr(request, "operation", None) or ("chat" if chat else "text_completion")
    attrs: Dict[str, Any] = {"gen_ai.operation.name": op,
                             "gen_ai.provider.name": client.adapter.name,
                             "server.address": address, "server.port": port}
    if model:
        attrs["gen_ai.request.model"] = model
    return attrs


def _span_name(attrs: Dict[str, Any]) -> str:
    model = attrs.get("gen_ai.request.model")
    return f"{attrs['gen_ai.operation.name']} {model}" if model else attrs["gen_ai.operation.name"]


def _request_attrs(request: Any, rid: str, ep: "Endpoint") -> Dict[str, Any]:
    """The span-only attributes: request parameters and our identifiers."""
    out: Dict[str, Any] = {"ipfs_accelerate.request_id": rid, "ipfs_accelerate.endpoint": ep.id}
    for field, name in (("max_tokens", "gen_ai.request.max_tokens"),
                        ("temperature", "gen_ai.request.temperature"),
                        ("top_p", "gen_ai.request.top_p"), ("seed", "gen_ai.request.seed")):
        value = getattr(request, field, None)
        if value is not None:
            out[name] = value
    n = getattr(request, "n", None)
    if n and n != 1:
        out["gen_ai.request.choice.count"] = n
    return out


def _start(telemetry: _otel.Telemetry, name: str, attributes: Dict[str, Any],
           parent: Any = None, links: Optional[List[Any]] = None) -> Any:
    if telemetry.tracer is None:
        return None
    trace = sys.modules["opentelemetry.trace"]
    ctx = trace.set_span_in_context(parent) if parent is not None else None
    return telemetry.tracer.start_span(name, context=ctx, kind=trace.SpanKind.CLIENT,
                                       attributes=attributes, links=links)


# ---------------------------------------------------------------- queued requests
_jobs: "weakref.WeakKeyDictionary[Future, _Op]" = weakref.WeakKeyDictionary()


def job_created(client: Any, ep: "Endpoint", job: Any) -> None:
    """``submit``, caller's thread: open the request's span under the caller's context."""
    telemetry = _otel.current()
    if telemetry is None:
        return
    attrs = _attrs(client, ep, job.request, job.model)
    span = _start(telemetry, _span_name(attrs),
                  {**attrs, **_request_attrs(job.request, job.request_id, ep),
                   "ipfs_accelerate.priority": job.priority})
    op = _Op(telemetry, span, attrs)
    _jobs[job.future] = op
    job.future.add_done_callback(lambda fut: _job_done(op, fut))


def _job_done(op: _Op, fut: Future) -> None:
    if fut.cancelled():
        op.finish(error_type="CancelledError")
    elif fut.exception() is not None:
        op.finish(error=fut.exception())
    else:
        op.finish(result=fut.result())
    if _local.op is op:
        _local.op = _local.span = None


def _queue_events(op: _Op, ep: "Endpoint", job: Any, now: float) -> None:
    op.event("queue.wait", {"wait.duration_s": max(0.0, now - job.enqueued_at)})
    held = _held(ep, job.enqueued_at, now)
    if held > MIN_WAIT:
        op.event("circuit.wait", {"wait.duration_s": held, "circuit.held_in_queue": True})


_RID, _FUTURE, _OP, _SPAN = (_Local._vars[name] for name in ("rid", "future", "op", "span"))


def current_work() -> Tuple[Any, Any, Any, Any]:
    """What this thread or task works for now, to put back with ``resume_work`` once a job
    served in a caller's own task is done (``job_started`` changed it there): the caller's
    later log lines are not the job's, and nothing the caller's task schedules later holds
    on to the job's future."""
    return (_RID.get(), _FUTURE.get(), _OP.get(), _SPAN.get())


def resume_work(saved: Tuple[Any, Any, Any, Any]) -> None:
    rid, future, op, span = saved
    _RID.set(rid)
    _FUTURE.set(future)
    _OP.set(op)
    _SPAN.set(span)


def job_started(ep: "Endpoint", job: Any, now: float) -> None:
    """A worker took ``job`` to send it alone (``now``: the client's monotonic clock)."""
    _RID.set(job.request_id)
    _FUTURE.set(weakref.ref(job))  # (a job served here has no future: ``Job``)
    op = _jobs.get(job.future) if _jobs else None
    _OP.set(op)
    _SPAN.set(op.span if op is not None else None)
    if op is not None:
        _queue_events(op, ep, job, now)


def shared_call_started(ep: "Endpoint", jobs: Sequence[Any], now: float) -> None:
    """A worker sends ``jobs`` as one call: a span for the call, linked with theirs."""
    _local.rid, _local.future = jobs[0].request_id, weakref.ref(jobs[0])
    _local.op = _local.span = None
    ops = [_jobs.get(j.future) for j in jobs] if _jobs else []
    traced = [(j, o) for j, o in zip(jobs, ops) if o is not None]
    if not traced:
        return
    telemetry = traced[0][1].telemetry
    for j, o in traced:
        _queue_events(o, ep, j, now)
    first = traced[0][1]
    attrs = {**first.attrs, "ipfs_accelerate.batch.size": len(jobs),
             "ipfs_accelerate.request_id": jobs[0].request_id, "ipfs_accelerate.endpoint": ep.id}
    if telemetry.tracer is not None:
        trace = sys.modules["opentelemetry.trace"]
        links = [trace.Link(o.span.get_span_context(),
                            {"ipfs_accelerate.request_id": j.request_id}) for j, o in traced]
        call = _start(telemetry, _span_name(attrs), attrs, parent=first.span, links=links)
        for j, o in traced:
            o.span.set_attribute("ipfs_accelerate.batch.size", len(jobs))
            o.span.add_link(call.get_span_context(), {"ipfs_accelerate.shared_call": True})
    else:
        call = None
    _local.op = _Op(telemetry, call, attrs, metrics=False)  # the callers' ops are measured
    _local.span = call


def shared_call_ended() -> None:
    """The shared call returned or raised (called from a ``finally``)."""
    op = _local.op
    if op is None:
        return
    _local.op = _local.span = None
    error = sys.exc_info()[1]
    op.finish(error=error if isinstance(error, Exception) else None)


# ---------------------------------------------------------------- events on the current span
def retrying(error: BaseException, attempt: int, delay: float) -> None:
    """``acall_with_retries``' ``on_retry``: attempt ``attempt`` failed, the next in ``delay`` s."""
    op = _local.op
    if op is None:
        return
    op.retries += 1
    op.event("retry", {"retry.attempt": attempt + 1, "retry.delay_s": delay,
                       "error.type": type(error).__name__})


def waited(name: str, seconds: float) -> None:
    """An attempt waited ``seconds`` (for the circuit, for an in-flight slot) before sending."""
    if seconds > MIN_WAIT and _local.op is not None:
        _local.op.event(name, {"wait.duration_s": seconds})


def waited_for(op: Any, rid: str, name: str, seconds: float) -> None:
    """``waited``, on ``op`` (an async stream's operation, request ``rid``) when given, else
    on the current task's."""
    if op is None:
        waited(name, seconds)
    else:
        with working_for(op, rid):
            waited(name, seconds)


# ---------------------------------------------------------------- circuit holds
#: per endpoint's circuit, its recent outages as [opened, closed] on the client's monotonic clock
_outages: "weakref.WeakKeyDictionary[Any, Deque[List[Optional[float]]]]" = \
    weakref.WeakKeyDictionary()


def circuit_changed(circuit: Any, new: str, now: float) -> None:
    """Remember when the queue of ``circuit``'s endpoint was held (OPEN with scheduled
    probes .. CLOSED)."""
    spans = _outages.get(circuit)
    if new == "OPEN" and circuit.prober is not None:
        if spans is None:
            spans = _outages[circuit] = deque(maxlen=8)
        if not spans or spans[-1][1] is not None:
            spans.append([now, None])
    elif new == "CLOSED" and spans and spans[-1][1] is None:
        spans[-1][1] = now


def _held(ep: "Endpoint", since: float, now: float) -> float:
    """Seconds of [since, now] during which ``ep``'s queue was held by its circuit."""
    total = 0.0
    for opened, closed in _outages.get(ep.circuit, ()):
        total += max(0.0, min(now if closed is None else closed, now) - max(opened, since))
    return total


# ---------------------------------------------------------------- other calls
@contextlib.contextmanager
def _own_span(name: str, attributes: Dict[str, Any]) -> Iterator[Any]:
    """A span of its own for the block (None when tracing is off): the current work's
    meanwhile, so what the block sends carries its trace context."""
    telemetry = _otel.current()
    if telemetry is None or telemetry.tracer is None:
        yield None
        return
    span = _start(telemetry, name, attributes)
    saved = _local.op, _local.span
    _local.op, _local.span = _Op(telemetry, span, {}, metrics=False), span
    try:
        yield span
    except BaseException as exc:
        _set_error(span, type(exc).__name__, exc)
        raise
    finally:
        span.end()
        _local.op, _local.span = saved


def in_span(name: str, fn: Callable[[], T], **attributes: Any) -> T:
    """Run ``fn`` (a health probe, a raw call) in a span of its own."""
    with _own_span(name, attributes) as span:
        result = fn()
        if span is not None and isinstance(result, bool):
            span.set_attribute("ipfs_accelerate.healthy", result)
        return result


async def ain_span(name: str, fn: Callable[[], Awaitable[T]], **attributes: Any) -> T:
    """``in_span`` for a coroutine (``fn()`` is awaited; the span is this task's meanwhile)."""
    with _own_span(name, attributes):
        return await fn()


# ---------------------------------------------------------------- streams
def stream_started(client: Any, ep: "Endpoint", request: Any, rid: str) -> Optional[_Op]:
    """A stream's operation (None when nothing is configured), under the caller's context.
    The stream keeps it itself (both faces open on a loop, whose coroutines share one
    thread), so its events and trace headers go through ``working_for``."""
    telemetry = _otel.current()
    if telemetry is None:
        return None
    attrs = _attrs(client, ep, request, request.model)
    span = _start(telemetry, _span_name(attrs), {**attrs, **_request_attrs(request, rid, ep)})
    return _Op(telemetry, span, attrs)


@contextlib.contextmanager
def working_for(op: Optional[_Op], rid: str) -> Iterator[None]:
    """Inside the block this thread works for ``op`` (request ``rid``): log lines, span
    events and trace headers are its. Only around code that does not await."""
    saved = (_local.rid, _local.future, _local.op, _local.span)
    _local.rid, _local.future, _local.op = rid, None, op
    _local.span = op.span if op is not None else None
    try:
        yield
    finally:
        _local.rid, _local.future, _local.op, _local.span = saved


def stream_adopted(stream: Any, op: Optional[_Op]) -> Optional[_Op]:
    """``stream`` owns ``op`` now: it ends as "ClosedEarly" if the stream is collected unread."""
    if op is not None:
        weakref.finalize(stream, op.finish, error_type="ClosedEarly")
    return op


def stream_finished(op: Optional[_Op], error: Optional[BaseException], error_type: Optional[str],
                    usage: Any, ttft: Optional[float], finish_reasons: Sequence[Any]) -> None:
    """The stream ended (read to its end, failed, or closed early)."""
    if op is not None:
        op.finish(error=error, error_type=error_type, usage=usage, ttft=ttft,
                  finish_reasons=[r for r in finish_reasons if r])


# ---------------------------------------------------------------- the wire
def with_trace_context(headers: Dict[str, str]) -> Dict[str, str]:
    """``headers`` plus ``traceparent`` / ``tracestate`` of the span this thread works for
    (else of the caller's current span); the same dict when there is nothing to add."""
    if "opentelemetry" not in sys.modules:
        return headers
    span = _local.span
    if span is None:
        telemetry = _otel.current()
        if telemetry is None or telemetry.tracer is None:
            return headers
    from opentelemetry import propagate, trace  # already imported by the user's set-up

    out = dict(headers)
    propagate.inject(out, context=trace.set_span_in_context(span) if span is not None else None)
    return out


# ---------------------------------------------------------------- logs
def _done(work_ref: "Optional[weakref.ref[Any]]") -> bool:
    """Whether the job this thread or task worked for is over (``work_ref``: a weak
    reference to the job, or to a stream's future; either says ``done()``). The context
    holds a weak reference: a timer or task that copied the context (asyncio copies it for
    each) must not keep the job, and its result, alive after the job."""
    if work_ref is None:
        return False
    work = work_ref()
    return work is None or work.done()


# ---------------------------------------------------------------- logs
class RequestLogFilter(logging.Filter):
    """Tags records logged while this thread works on a request with its id (and trace id)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = _local.rid
        if rid is None or _done(_local.future):
            return True
        tag = f"request_id={rid}"
        record.request_id = rid
        span = _local.span
        if span is not None:
            record.trace_id = tid = format(span.get_span_context().trace_id, "032x")
            tag += f" trace_id={tid}"
        if isinstance(record.msg, str) and not record.msg.startswith("[request_id="):
            record.msg = f"[{tag}] {record.msg}"
        return True


_FILTER = RequestLogFilter()
for _name in ("ipfs_accelerate_py.api_backends", "ipfs_accelerate_py.api_backends.transport"):
    logging.getLogger(_name).addFilter(_FILTER)
