"""The client's asyncio face: thousands of streams on one event loop, no thread per stream.

``astream`` / ``astream_generation`` are ``stream`` / ``stream_generation`` for coroutines.
They share the sync face's state, not a copy of it: the same routing choice
(``Router.order`` over ``Router.routing_candidates``, failing over while a stream opens), the same
circuit breaker (admission, verdicts, the wait for an OPEN circuit), the same per-endpoint
in-flight limit (``InFlightLimit.aacquire``: one FIFO queue for threads and coroutines),
the same retry policy before the first byte (``retry_wait`` / ``breaker.circuit_wait``,
waited with ``asyncio.sleep``), metrics, tracing spans, request validation, the adapter's formatting
and parsing, the SSE decoder with its event-size cap, and the same transport (the
endpoint's ``transport.AsyncTransport``): aiohttp (one session per endpoint and event
loop, proxies and ``trust_env`` included), or a ``transport_factory`` the caller gave,
adapted by ``ThreadedTransport``: each call and read in the client's executor, awaited on
the caller's loop.

Nothing here blocks the loop: no sync transport call, no ``time.sleep``, no wait on a lock
that another thread may hold for long (the breaker's and the limit's locks guard state only,
for microseconds). An OPEN circuit is waited out by the endpoint's circuit
(``breaker.Circuit.aadmit``): a future that the prober's thread settles, or, with no
prober, a sleep until the breaker's next probe window.

Compatible async streams share prompt-list calls exactly as sync ones do: a stream that may
share goes on its endpoint's queue as a job (``StreamingMixin._queue_stream``), the batcher
gathers it on the client's loop with compatible ones from either face, and the caller awaits
the job's future (``_core.loop.await_future``); its chunks then come from its ``SharedHandle``'s
feed (``_pump.Feed.achunks``), read by the shared call's reader on the client's loop. A
stream that goes alone is opened on its caller's loop by ``StreamOpener.aopen`` (``_opener``),
the sync face's opening coroutine.

Non-streamed calls (``arun_inference``, ``achat_completion``, ``agenerate_text``,
``asubmit``) that may share a call share it with their own loop's requests only. When they
would start at once (``Dispatcher.would_start``), the requests of one turn of the caller's
loop are gathered into calls on that loop (``_gather_here``, ``Batcher.handle_group``), so
nothing crosses a thread; otherwise they go through the queue and the batcher on the
client's loop as the sync ones do. Either way the job's ``concurrent.futures.Future`` is
awaited through ``_core.loop.await_future``, a done callback that wakes the caller's loop
(one wake-up for all the results that come together), so no thread waits. One that shares
no call and would start at once (``Dispatcher.claim``) is served in its caller's task
instead (``_serve_here``): the same ``Batcher.run_single`` on the caller's loop, without
the two hand-offs between loops.
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import CancelledError as FutureCancelled, Future
from typing import (TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator, Awaitable, Dict, List,
                    Optional, Set, Sequence, Tuple)

from . import errors, tracing
from .call_shapes import check_timeout, pop_send_options, stream_call
from .errors import ValidationError
from .limits import cap_request
from .mixins._host import HostBase
from ._core.loop import await_future
from ._routing.state import OpeningOrder
from .models import ChatRequest, CompletionRequest, CompletionResult, Request, StreamChunk, \
    check_priority
from .request_build import build_request, chat_request, stream_request
from ._streaming.stream_batching import ALONE, SharedHandle
from .streaming import ReplyChunks, TextStream
from .structured import with_schema

if TYPE_CHECKING:
    from ._core.endpoint import Endpoint
    from .transport import AsyncStream

__all__ = ["AsyncFaceMixin", "AsyncTextStream"]


class AsyncFaceMixin(HostBase):
    """``astream``, ``astream_generation``, ``arun_inference``, ``achat_completion``,
    ``agenerate_text``, ``asubmit`` and ``aclose`` (see the module docstring)."""

    def _init_async_face(self) -> None:
        #: the batcher's turns run on callers' loops (``_gather_here``), held until they end
        self._turns_here: Set["asyncio.Task[None]"] = set()
        #: per (endpoint, caller's loop): the requests held until that loop's turn ends
        self._held_here: Dict[Tuple[str, asyncio.AbstractEventLoop], List[Any]] = {}

    # ------------------------------------------------------------------ streams
    def astream(self, request: Request, endpoint_id: Optional[str] = None,
                fail_fast: Optional[bool] = None, *, priority: int = 1,
                timeout: Optional[float] = None,
                response_model: Any = None) -> "AsyncTextStream":
        """An async iterator (and async context manager) of ``StreamChunk``s. The request is
        checked now; it is sent on the first ``__anext__`` / ``__aenter__``, where opening
        errors raise. An OPEN circuit is waited out before the first byte, within the
        deadline, unless ``fail_fast``."""
        if not isinstance(request, (CompletionRequest, ChatRequest)):
            raise ValidationError(f"must be a CompletionRequest or ChatRequest, not "
                                  f"{type(request).__name__}", field="request")
        self._check_open()
        self._require_streaming()  # (asked again once an "auto" flavor is known: ``_aopen``)
        if endpoint_id is not None:
            self._endpoint(endpoint_id)  # an unknown id raises now
        check_priority(priority)
        if response_model is not None:  # the schema asked for; ``parsed`` at the end
            request = with_schema(request, response_model)
        stream = AsyncTextStream(self, request, endpoint_id, fail_fast, priority,
                                 check_timeout(timeout))
        stream.response_model = response_model
        return stream

    def astream_generation(self, *args: Any, **kwargs: Any) -> AsyncIterator[str]:
        """``stream_generation`` for coroutines: the same call shapes, an async iterator of
        text pieces. Bad input raises here, before anything is sent."""
        options = pop_send_options(kwargs)
        model, prompt, parameters = stream_call(args, kwargs)
        return self.astream(stream_request(self._adapter, prompt, model, parameters),
                            **options).texts()

    async def _aopen(self, request: Request, endpoint_id: Optional[str],
                     fail_fast: Optional[bool], priority: int = 1,
                     timeout: Optional[float] = None) -> "_AioTextStream":
        """Open the stream: routed by the ``routing`` setting when no endpoint is named."""
        await self._asettle_backend()
        self._require_streaming()
        if endpoint_id is None:
            routed = await self._aopen_routed(request, priority, timeout)
            if routed is not None:
                return routed
        return await self._aopen_on(self._endpoint(endpoint_id), request, fail_fast, priority,
                                    timeout)

    async def _aopen_routed(self, request: Request, priority: int = 1,
                            timeout: Optional[float] = None) -> "Optional[_AioTextStream]":
        """``_routed_stream`` for coroutines: the best healthy endpoint first, the next one
        when opening fails in a way another server might not; None when routing is off.
        With a load probe set (``set_load_probe``), a blocking call, the order is worked out
        in the default executor."""
        strategy, lora, ids = self._stream_routing(request)
        if not ids:
            return None
        if self._router.state.probe is None:
            order = self._stream_order(strategy, ids, request)
        else:  # a load probe is a blocking HTTP call: it must not run on the loop
            order = await asyncio.get_running_loop().run_in_executor(
                None, self._stream_order, strategy, ids, request)
        opening = OpeningOrder(order, self._router.is_open)
        for eid in opening:
            try:
                if lora is not None and self._lora_needs_load(eid, lora):
                    await self._alora_load_wait(eid, lora, priority, timeout)
                return await self._aopen_on(self._endpoint(eid), request, None, priority, timeout)
            except Exception as exc:  # noqa: BLE001 - sorted by the routing's rule
                if not self._stream_moves_on(eid, lora, exc):
                    raise
                opening.failed(eid, exc)
        raise opening.exhausted() from opening.last

    async def _aopen_on(self, ep: "Endpoint", request: Request, fail_fast: Optional[bool],
                        priority: int = 1, timeout: Optional[float] = None) -> "_AioTextStream":
        self._check_open()
        if not request.stream:
            request = request.model_copy(update={"stream": True})
        if request.model is None and ep.settings.model:
            request = request.model_copy(update={"model": ep.settings.model})
        request = cap_request(self, request)
        rid = self._new_request_id()
        op = tracing.stream_started(self, ep, request, rid)
        clock = self._clock
        start = clock.monotonic()
        deadline = start + (timeout if timeout is not None else ep.settings.effective_deadline)
        ff = ep.fail_fast(fail_fast)
        try:
            job = self._queue_stream(ep, request, ff, op, rid, start, deadline, priority)
            handle = await _await_stream_job(job, deadline, clock) if job is not None else None
            if handle is not None:  # it shares one prompt-list stream (_streaming/stream_batching.py)
                handle.wait = False  # leaving never blocks this loop
                return _AioSharedTextStream(self, ep, request, handle, start, op)
            http = self._adapter.format_request(request, priority=None, request_id=rid)
            with tracing.working_for(op, rid):
                headers = tracing.with_trace_context(http.headers)  # this stream's span, not the thread's
            # the endpoint's transport on this loop (a transport_factory's in the client's
            # executor, awaited here as the sync face does)
            response = await self._opener.aopen(ep, http, headers,
                                                deadline, request.model, ff, op, rid)
        except BaseException as exc:
            tracing.stream_finished(op, exc, type(exc).__name__, None, None, ())
            self._metrics.record_request(ep.id, request.model, False,
                                         clock.monotonic() - start,
                                         error_type=type(exc).__name__, stream=True)
            raise
        return _AioTextStream(self, ep, request, response, start, op)

    # ------------------------------------------------------------------ non-streamed calls
    async def asubmit(self, request: Request, priority: int = 1,
                      endpoint_id: Optional[str] = None, timeout: Optional[float] = None,
                      fail_fast: Optional[bool] = None) -> CompletionResult:
        """``execute`` for coroutines: queued as ``submit`` queues it (the work runs on the
        client's loop), awaited without a thread, never longer than the call's deadline."""
        await self._asettle_backend()  # (so ``_accept``'s own asking finds nothing to ask)
        accepted = self._accept(request, priority, endpoint_id, check_timeout(timeout),
                                fail_fast, lazy=True)
        # asked once and handed down: on Python 3.11 each asking is a getpid() system call
        loop = asyncio.get_running_loop()
        if isinstance(accepted, Future):  # routed over every endpoint (mixins/routing.py)
            future = accepted
            ep = self._endpoint(endpoint_id)
        else:
            ep, job = accepted
            if job.key is None:  # it shares no call: served here if it would start at once
                if not ep.settings.queue_enabled:
                    return await self._serve_here(ep, job, loop, None)
                if not ep.limit.full and ep.workers.claim(loop):
                    return await self._serve_here(ep, job, loop, ep.workers)
            future = job.future  # (made before the job is handed on: another thread reads it)
            if job.key is None:
                self._start_job(ep, job)
            else:
                # It may share a call with this loop's other callers only (a sync caller's
                # or another loop's request never waits on this loop, which may end first).
                job.key = (job.key, loop)
                if not (ep.settings.queue_enabled and self._gather_here(ep, job, loop)):
                    self._start_job(ep, job)
        limit = (timeout if timeout is not None else ep.settings.effective_deadline) + 1.0
        # a bound against a lost result (the pipeline ends every job by its deadline): a
        # bare timer, cancelled on the way out, is the cheapest such guard per call
        guard = loop.call_later(limit, _expire, future, limit - 1.0)
        try:
            return await await_future(future, loop)
        finally:
            guard.cancel()

    def _gather_here(self, ep: "Endpoint", job: Any, loop: asyncio.AbstractEventLoop) -> bool:
        """A request that may share a call: gathered on its caller's loop (True), or, when
        it would not start at once (``Dispatcher.would_start``: something waits in the
        queue, or no slot is free), left to be queued for the client's loop (False).

        The requests this loop's callers send in one turn of the loop are held until the
        turn ends (``_here_turn``): then each group of compatible ones is the batcher's job
        (``Batcher.handle_group``: it joins a call gathering for its key, or gathers one with
        what comes meanwhile, and sends it) in a task on this loop. Requests and results
        then cross no thread: on a busy machine each crossing is a wake-up of another
        thread, and the two threads' turns cost more than the work. A caller that leaves
        cancels only its own request (``await_future``): the call is all its members'."""
        held = self._held_here.get((ep.id, loop))
        if held is not None:
            held.append(job)  # goes with this loop turn's other requests
            return True
        if ep.limit.full or not ep.workers.would_start():
            return False
        self._held_here[(ep.id, loop)] = [job]
        loop.call_soon(self._here_turn, ep, loop)
        return True

    def _here_turn(self, ep: "Endpoint", loop: asyncio.AbstractEventLoop) -> None:
        """The end of a loop turn: each group of compatible requests held in it (a call's
        worth at most) goes to the batcher in a task of its own, in an empty context."""
        jobs = self._held_here.pop((ep.id, loop))
        by_key: Dict[Any, List[Any]] = {}
        for job in jobs:
            by_key.setdefault(job.key, []).append(job)
        size = max(1, ep.settings.max_batch_size)
        for same in by_key.values():
            for at in range(0, len(same), size):  # each a call's worth at most
                task = contextvars.Context().run(
                    loop.create_task, self._gathered_turn(ep, same[at:at + size], loop))
                self._turns_here.add(task)
                task.add_done_callback(self._turns_here.discard)

    async def _gathered_turn(self, ep: "Endpoint", group: List[Any],
                             loop: asyncio.AbstractEventLoop) -> None:
        """One group's turn: a slot claimed as it starts (a turn that never starts, on a
        loop that closed first, holds none), else the group queues for the client's loop
        (another request took the slot, or queued, meanwhile)."""
        if not ep.workers.claim(loop):
            for job in group:
                self._start_job(ep, job)
            return
        try:
            for job in group:
                job.picked_at = job.enqueued_at
            await self._batcher.handle_group(ep, group)
        except BaseException as exc:  # noqa: BLE001 - a job's error is its caller's
            for job in group:
                job.fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            ep.workers.unclaim(loop)

    async def _serve_here(self, ep: "Endpoint", job: Any, loop: asyncio.AbstractEventLoop,
                          claimed: Any) -> CompletionResult:
        """A request that shares no call, served in its caller's task on its caller's loop
        (the dispatcher's ``claim`` said it would have started it at once): the same
        single-request path the dispatcher runs (``Batcher.run_single``: retries, breaker, slot,
        metrics, tracing), without the two hand-offs between loops. A caller that leaves
        (cancelled) stops its own request, as with aiohttp; a bound of the deadline plus
        a second stands guard as ``asubmit``'s does (then ``TimeoutError``)."""
        job.here = True
        job.picked_at = job.enqueued_at
        task = asyncio.current_task(loop)
        expired: List[bool] = []
        # (an empty context: a cancelled timer waits in the loop's heap for a while, and a
        # copy of the caller's would keep what it refers to alive that long)
        guard = loop.call_later(job.deadline - job.enqueued_at + 1.0, _cancel_for_time,
                                task, expired, context=_NO_CONTEXT)
        saved = tracing.current_work()
        try:
            await self._batcher.run_single(ep, job)
        finally:
            guard.cancel()
            tracing.resume_work(saved)  # the caller's task is not the job's any more
            if claimed is not None:
                claimed.unclaim(loop)
        if expired:  # the guard's own cancel is not the caller's: withdrawn (3.11+)
            uncancel = getattr(task, "uncancel", None)
            if uncancel is not None:
                uncancel()
        try:  # resolved by now (``run_single`` ends every job); kept on the job, no future
            return job.outcome()
        except FutureCancelled:
            if expired:
                raise errors.TimeoutError(f"no result within the call deadline of "
                                          f"{job.deadline - job.enqueued_at:.1f}s") from None
            raise asyncio.CancelledError() from None

    async def arun_inference(self, model_id: Optional[str], inputs: Any,
                             parameters: Optional[Dict[str, Any]] = None, priority: int = 1,
                             endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
                             timeout: Optional[float] = None) -> CompletionResult:
        """``run_inference`` for coroutines (no thread waits for the result)."""
        return await self.asubmit(build_request(inputs, model_id, parameters,
                                                adapter=self._adapter), priority,
                                  endpoint_id, check_timeout(timeout), fail_fast)

    async def agenerate_text(self, prompt: str, model: Optional[str] = None, priority: int = 1, *,
                             endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
                             timeout: Optional[float] = None, **parameters: Any) -> str:
        """``generate_text`` for coroutines."""
        if not isinstance(prompt, str):
            raise ValidationError(f"must be a string, got {type(prompt).__name__}", field="prompt")
        return (await self.arun_inference(model, prompt, parameters, priority, endpoint_id,
                                          fail_fast, timeout)).text

    async def achat_completion(self, messages: Sequence[Dict[str, Any]],
                               model: Optional[str] = None, priority: int = 1, *,
                               endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
                               timeout: Optional[float] = None,
                               **parameters: Any) -> CompletionResult:
        """``chat_completion`` for coroutines."""
        return await self.asubmit(chat_request(self._adapter, messages, model, parameters),
                                  priority, endpoint_id, check_timeout(timeout), fail_fast)

    async def aclose(self) -> None:
        """``close()`` for coroutines: this loop's sessions are closed here, awaited; the rest
        of ``close()`` (it waits for the requests under way) runs in the default executor,
        so the loop is not blocked meanwhile."""
        for ep in list(self._endpoints.values()):
            await ep.aclose_transports()
        await asyncio.get_running_loop().run_in_executor(None, self.close)


async def _await_stream_job(job: Any, deadline: float, clock: Any) -> Optional[SharedHandle]:
    """``_await_stream_job`` for coroutines: the batcher's word on a stream job, awaited
    without a thread; a handle that comes as its caller leaves (cancelled, or its deadline
    passed) is closed, so the shared call does not wait for a reader that never comes."""
    try:
        outcome = await asyncio.wait_for(await_future(job.future),
                                         max(0.0, deadline - clock.monotonic()) + 2.0)
    except asyncio.TimeoutError:
        job.fail(errors.TimeoutError("the stream did not open within its deadline", sent=False))
        if job.future.cancelled():
            raise errors.TimeoutError("the stream did not open within its deadline",
                                      sent=False) from None
        outcome = job.future.result(0)  # its handle, if it came just now; else raises
    except asyncio.CancelledError:
        _abandon(job)
        raise
    return None if outcome == ALONE else outcome


def _abandon(job: Any) -> None:
    """The caller left: a handle delivered to it all the same leaves its shared call."""
    future = job.future
    if not future.cancel() and future.done() and future.exception() is None:
        outcome = future.result()
        if isinstance(outcome, SharedHandle):
            outcome.wait = False
            outcome.close()


_NO_CONTEXT = contextvars.Context()


def _cancel_for_time(task: "Optional[asyncio.Task[Any]]", expired: List[bool]) -> None:
    """``_serve_here``'s guard: the caller's task is cancelled, and told why."""
    if task is not None:
        expired.append(True)
        task.cancel()


def _expire(future: "Future[Any]", deadline: float) -> None:
    """``asubmit``'s guard: the job's future fails with ``TimeoutError`` if still pending."""
    if not future.done():
        try:
            future.set_exception(errors.TimeoutError(
                f"no result within the call deadline of {deadline:.1f}s"))
        except Exception:  # noqa: BLE001 - the pipeline resolved it just now
            pass


class AsyncTextStream:
    """What ``astream`` returns: ``async for chunk in s`` / ``async with ... as s``;
    ``texts()`` for the text pieces; ``aclose()`` stops early (the connection is closed,
    vLLM aborts the generation, and the stream's place is freed). Opened on first use."""

    def __init__(self, client: Any, request: Request, endpoint_id: Optional[str],
                 fail_fast: Optional[bool], priority: int = 1,
                 timeout: Optional[float] = None) -> None:
        self._client = client
        self._request = request
        self._endpoint_id = endpoint_id
        self._fail_fast = fail_fast
        self._priority = priority
        self._timeout = timeout
        self.response_model: Any = None
        self._open: Optional[_AioTextStream] = None
        self._closed = False

    async def _opened(self) -> "_AioTextStream":
        if self._open is None:
            self._open = await self._client._aopen(self._request, self._endpoint_id,
                                                   self._fail_fast, self._priority, self._timeout)
            self._open.response_model = self.response_model
        return self._open

    @property
    def text(self) -> str:
        """Everything received so far."""
        return self._open.text if self._open is not None else ""

    @property
    def usage(self) -> Any:
        return self._open.usage if self._open is not None else None

    @property
    def parsed(self) -> Any:
        """With ``response_model``: the instance, once the stream has ended."""
        return self._open.parsed if self._open is not None else None

    @property
    def finish_reasons(self) -> Dict[int, Optional[str]]:
        return self._open.finish_reasons if self._open is not None else {}

    def __aiter__(self) -> "AsyncTextStream":
        return self

    def __anext__(self) -> Awaitable[StreamChunk]:
        opened = self._open
        if opened is not None:  # (the open stream's own step: no coroutine of ours per chunk)
            return opened._agen.__anext__()
        return self._first()

    async def _first(self) -> StreamChunk:
        if self._closed:
            raise StopAsyncIteration  # closed before it was opened: nothing was sent
        return await (await self._opened())._agen.__anext__()

    async def texts(self) -> AsyncIterator[str]:
        """Only the text pieces; the stream is closed when this generator is closed."""
        try:
            async for chunk in self:
                if chunk.text:
                    yield chunk.text
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop reading and drop the connection (idempotent)."""
        self._closed = True
        if self._open is not None:
            await self._open.aclose()

    async def __aenter__(self) -> "AsyncTextStream":
        await self._opened()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class _AioTextStream(TextStream):
    """An open async stream: ``TextStream``'s lease, bookkeeping, metrics and span, with the
    reply read by ``async for`` (``_agen``) instead of in a thread."""

    _response: "AsyncStream"

    def __init__(self, client: Any, ep: "Endpoint", request: Request, response: "AsyncStream",
                 start: float, op: Any) -> None:
        super().__init__(client, ep, request, response, start, op)
        self._agen = self._arun()

    def __next__(self) -> StreamChunk:
        raise TypeError("an async stream is read with 'async for'")

    async def _achunks(self) -> AsyncIterator[StreamChunk]:
        """The reply's chunks in order, as ``TextStream._chunks``."""
        reply = ReplyChunks(self._client._adapter, self._request)
        async for raw in self._response.chunks():
            for chunk in reply.feed(raw):
                yield chunk
            if reply.ended:
                return
        reply.finish()

    async def _arun(self) -> AsyncGenerator[StreamChunk, None]:
        error: Optional[BaseException] = None
        finished = False
        try:
            async for chunk in self._achunks():
                self._take(chunk)
                yield chunk
            self._parse()
            finished = True
        except GeneratorExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - kept for the metrics, re-raised
            error = self._failed(exc)
            raise
        finally:
            self._finish(finished, error)

    async def aclose(self) -> None:
        """Stop reading; the connection is closed and the stream's place freed."""
        await self._agen.aclose()
        self._finish(False, None)


class _AioSharedTextStream(_AioTextStream):
    """An async caller's stream inside a shared prompt-list call: its own choices from its
    ``SharedHandle``'s feed, read without blocking this loop (_streaming/stream_batching.py)."""

    def _achunks(self) -> AsyncIterator[StreamChunk]:
        return self._response.feed.achunks()  # (the feed's own generator: one step less per chunk)
