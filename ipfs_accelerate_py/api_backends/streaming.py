"""Streaming: ``stream()`` opens one SSE reply, and ``TextStream`` reads it to its end.

A stream takes the same breaker, in-flight slot, retry (before the first chunk only) and
metrics as any request; a compatible concurrent stream may share one prompt-list call
instead (``stream_batching``, whose ``SharedTextStream`` subclasses ``TextStream``). What an
open stream holds (its connection, its place in ``current_requests``) is a ``_StreamLease``,
released exactly once: at the end, on close, or when the stream is dropped unread.

One asyncio core, two faces: every stream opens by ``StreamOpener.aopen``
(``_streaming/opening.py``: retry, breaker, slot, as coroutines; the client's ``_opener``). A sync caller's stream opens on the client's loop (the caller's thread
waits for it) and is read there by a reader task that hands the caller its chunks
(``_pump``); the bytes move through the endpoint's transport (aiohttp, or a transport the
caller gave, read in the client's executor: ``transport.ThreadedStream``).
The async face (async_face.py) opens by the same coroutine on its caller's loop.
"""

from __future__ import annotations

import asyncio
import weakref
from concurrent.futures import CancelledError, TimeoutError as FutureTimeout
from typing import (TYPE_CHECKING, Any, Coroutine, Dict, Generator, Iterator, List, Optional,
                    TypeVar, cast)

from . import errors, tracing
from ._core.loop import ClientLoop, Signal
from ._streaming.pump import Feed, ReplyChunks, Reader, read_reply
from .clock import SYSTEM_CLOCK, Clock
from .errors import ApiError, ClientClosedError, ConfigurationError, QueueFullError, TransientError
from .limits import cap_request
from .mixins._host import Host, HostBase
from ._core.queue import NORMAL, Job
from .call_shapes import check_timeout
from .models import Request, StreamChunk, Usage, check_priority
from ._streaming.stream_batching import ALONE, SharedHandle, stream_key
from .structured import parse_answer, with_schema
from .transport import HttpRequest

if TYPE_CHECKING:
    from ._core.endpoint import Endpoint

__all__ = ["StreamingMixin", "TextStream", "SharedTextStream", "ReplyChunks", "run_blocking"]

T = TypeVar("T")
#: Seconds past an opening's deadline its caller waits for the loop (see ``run_blocking``).
_OPEN_GRACE = 2.0


class StreamingMixin(HostBase):
    """``stream()``: one open stream of ``StreamChunk``s, alone or sharing a call (the
    opening both faces share is a part: ``_opener``, ``StreamOpener``)."""

    def _init_streaming(self) -> None:
        """Nothing to set up: shared streams gather in the endpoints' queues."""

    def _require_streaming(self) -> None:
        if not self._adapter.supports_streaming:
            raise ConfigurationError(f"backend {self._adapter.name!r} cannot stream", field="stream")

    def stream(self, request: Request, endpoint_id: Optional[str] = None,
               fail_fast: Optional[bool] = None, *, priority: int = 1,
               timeout: Optional[float] = None, response_model: Any = None) -> "TextStream":
        """Open a stream now (errors raise here) and return an iterator of ``StreamChunk``.

        An OPEN circuit is waited out before the first byte, within the deadline, unless
        ``fail_fast``. The opening and the reading run on the client's loop; the caller's
        thread waits for them (not from the loop itself: use ``astream`` there). With
        ``response_model`` (a pydantic model) the stream asks for its JSON schema and, once
        read to its end, has ``parsed`` (structured.py)."""
        if response_model is not None:
            opened = self.stream(with_schema(request, response_model), endpoint_id, fail_fast,
                                 priority=priority, timeout=timeout)
            opened.response_model = response_model
            return opened
        self._check_open()
        if self._loop.in_loop():
            raise ConfigurationError("a sync stream from the client's event loop would never "
                                     "open; use astream() there", field="stream")
        self._settle_backend()
        self._require_streaming()
        check_priority(priority)
        timeout = check_timeout(timeout)
        routed = self._routed_stream(request, priority, timeout) if endpoint_id is None else None
        if routed is not None:
            return routed
        ep = self._endpoint(endpoint_id)
        if not request.stream:
            request = request.model_copy(update={"stream": True})
        if request.model is None and ep.settings.model:
            request = request.model_copy(update={"model": ep.settings.model})
        request = cap_request(self, request)
        rid = self._new_request_id()
        op = tracing.stream_started(self, ep, request, rid)  # this caller's span, alone or shared
        ff = ep.fail_fast(fail_fast)
        start = self._clock.monotonic()
        deadline = start + (timeout if timeout is not None else ep.settings.effective_deadline)
        try:
            job = self._queue_stream(ep, request, ff, op, rid, start, deadline, priority)
            handle = self._await_stream_job(job, deadline) if job is not None else None
            if handle is not None:  # it shares one prompt-list stream (_streaming/stream_batching.py)
                return SharedTextStream(self, ep, request, handle, start, op)
            http = self._adapter.format_request(request, priority=None, request_id=rid)
            reader = self._open_on_loop(ep, request, http, deadline, ff, op, rid)
        except BaseException as exc:
            tracing.stream_finished(op, exc, type(exc).__name__, None, None, ())
            self._metrics.record_request(ep.id, request.model, False,
                                         self._clock.monotonic() - start,
                                         error_type=type(exc).__name__, stream=True)
            raise
        return TextStream(self, ep, request, reader, start, op)

    def _queue_stream(self, ep: "Endpoint", request: Request, fail_fast: bool, op: Any,
                      rid: str, start: float, deadline: float,
                      priority: int = NORMAL) -> "Optional[Job]":
        """A stream that may share a call goes on the endpoint's queue as a job, where the
        batcher gathers it with compatible ones (both faces); None: it goes alone at once."""
        key = stream_key(ep, request, fail_fast, self._adapter)
        if key is None or ep.queue.paused:
            return None  # alone; while the circuit is OPEN it waits for it as it opens
        job = Job(request, priority, deadline, key, request.model, rid, start, fail_fast)
        job.context = op
        try:
            self._enqueue(ep, job)
        except QueueFullError:
            return None  # a stream never waited in the queue before it could share: alone
        if job.fail_fast and ep.queue.paused and ep.queue.remove(job):
            job.fail(ep.breaker.open_error())  # the circuit opened as it was queued
        return job

    def _await_stream_job(self, job: "Job", deadline: float) -> Optional[SharedHandle]:
        """Wait (caller's thread) for the batcher's word on a stream job: its handle in a
        shared call, or None (``ALONE``: open a plain stream now)."""
        try:
            outcome = job.future.result(max(0.0, deadline - self._clock.monotonic()) + _OPEN_GRACE)
        except FutureTimeout:
            job.fail(errors.TimeoutError("the stream did not open within its deadline",
                                         sent=False))
            outcome = job.future.result(0)  # its handle, if it came just now; else raises
        except CancelledError:
            raise ClientClosedError("client closed while the stream was waiting to open") from None
        return None if outcome == ALONE else outcome

    def _open_on_loop(self, ep: "Endpoint", request: Request, http: HttpRequest,
                      deadline: float, fail_fast: bool, op: Any, rid: str) -> Reader:
        """From the caller's thread: open the reply on the client's loop (``_opener``)
        and start its reader there; the caller then reads the reader's feed."""
        with tracing.working_for(op, rid):
            headers = tracing.with_trace_context(http.headers)  # the stream's span, not the loop's
        loop = self._loop
        room = Signal(loop)
        feed = Feed(room, ep.settings.idle_timeout)
        opener = self._opener

        async def open_and_read() -> Reader:
            response = await opener.aopen(ep, http, headers,
                                          deadline, request.model, fail_fast, op, rid)
            reader = Reader(loop, response, feed)
            reader.start(read_reply(response, self._adapter, request, feed, room))
            return reader

        return run_blocking(loop, open_and_read(), deadline)


def run_blocking(loop: ClientLoop, coro: Coroutine[Any, Any, T], deadline: float,
                 clock: Clock = SYSTEM_CLOCK) -> T:
    """Run ``coro`` (an opening) on the client's loop and wait for it, a little past its
    deadline at most: the coroutine itself stops at the deadline, so the bound only guards
    against a loop that stopped (the client closed) under it."""
    future = asyncio.run_coroutine_threadsafe(coro, loop.loop)
    try:
        return future.result(max(0.0, deadline - clock.monotonic()) + _OPEN_GRACE)
    except FutureTimeout:
        if not future.cancel() and future.done() and future.exception() is None:
            return future.result()  # it opened just now: the caller takes it (and closes it)
        raise errors.TimeoutError("the stream did not open within its deadline") from None
    except CancelledError:
        raise ClientClosedError("client closed while the stream was opening") from None


class _StreamLease:
    """What an open stream holds: its connection and its place in ``current_requests``.

    Released exactly once: when the stream ends, is closed, or is garbage-collected unread
    (a finalizer holds the lease, not the stream, so dropping the stream can trigger it)."""

    __slots__ = ("ep", "response", "released")

    def __init__(self, ep: Endpoint, response: Any) -> None:
        self.ep = ep
        self.response = response
        self.released = False
        ep.stream_opened()

    def release(self) -> bool:
        """Close the connection and leave the endpoint; False if that was done already."""
        if self.released:
            return False
        self.released = True
        try:
            self.response.close()
        finally:
            self.ep.stream_closed()
        return True


def _release_dropped_stream(lease: _StreamLease, metrics: Any, clock: Clock, model: Optional[str],
                            start: float) -> None:
    if lease.release():
        metrics.record_request(lease.ep.id, model, False, clock.monotonic() - start,
                               error_type="ClosedEarly", stream=True)


class TextStream:
    """An open stream: iterate for ``StreamChunk``s, or ``texts()`` for strings. Closing it
    early closes the connection, which makes vLLM abort the generation. A stream dropped
    without being read to its end or closed is closed when it is garbage-collected."""

    def __init__(self, client: Host, ep: Endpoint, request: Request, response: Any,
                 start: float, op: Any = None) -> None:
        self._client = client
        self._ep = ep
        self._request = request
        self._response = response
        self._start = start
        self._ttft: Optional[float] = None
        self._parts: List[str] = []
        self.usage: Optional[Usage] = None
        self.finish_reasons: Dict[int, Optional[str]] = {}
        #: set by ``stream(..., response_model=)``: at the end, ``parsed`` is its instance
        self.response_model: Any = None
        self.parsed: Any = None
        self._gen = self._run()
        self._lease = _StreamLease(ep, response)
        self._trace = tracing.stream_adopted(self, op)  # its span, ended in _finish (tracing.py)
        weakref.finalize(self, _release_dropped_stream, self._lease, client._metrics,
                         client._clock, request.model, start)

    @property
    def text(self) -> str:
        """Everything received so far (choice 0 and others concatenated in arrival order)."""
        return "".join(self._parts)

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> StreamChunk:
        return next(self._gen)

    def texts(self) -> Iterator[str]:
        """Only the text pieces, as a generator that closes the stream when it is closed,
        dropped or exhausted: also before its first ``next`` (the request is already open)."""
        gen = self._texts()
        next(gen)  # run into the try block, so close() before the first piece still closes
        return cast(Iterator[str], gen)  # past the priming None, only strings come

    def _texts(self) -> Iterator[Optional[str]]:
        try:
            yield None  # the priming stop of texts(); never seen by the caller
            for chunk in self:
                if chunk.text:
                    yield chunk.text
        finally:
            self.close()

    def _chunks(self) -> Iterator[StreamChunk]:
        """The reply's chunks in order, as the reader on the client's loop hands them over
        (``_pump``); returns at the end marker, raises if it never came. (A stream sharing
        one call with others gets its own choices the same way: stream_batching.)"""
        feed: Feed = self._response.feed
        return feed.chunks()

    def _run(self) -> Generator[StreamChunk, None, None]:
        error: Optional[BaseException] = None
        finished = False
        try:
            for chunk in self._chunks():
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

    def _take(self, chunk: StreamChunk) -> None:
        """One chunk's bookkeeping: usage, finish reason, time to first text, the text."""
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.finish_reason is not None:
            self.finish_reasons[chunk.index] = chunk.finish_reason
        if chunk.text:
            if self._ttft is None:
                self._ttft = self._client._clock.monotonic() - self._start
            self._parts.append(chunk.text)

    def _parse(self) -> None:
        """The stream ended: with a ``response_model``, its text becomes ``parsed`` (or
        ``StructuredOutputError``, carrying the text, ends the iteration)."""
        if self.response_model is not None:
            reason = self.finish_reasons.get(0)
            self.parsed = parse_answer(self.text, reason, self.response_model)

    def _failed(self, exc: BaseException) -> BaseException:
        """The text so far goes with the error; a transport fault counts against the server.
        (The async face's streams share both: async_face.py.)"""
        if isinstance(exc, (errors.StreamError, errors.ReplyMismatchError)):
            exc.partial_text = self.text
        elif isinstance(exc, ApiError):
            exc.context["partial_text"] = self.text
            if isinstance(exc, TransientError):
                self._ep.breaker.record_failure(False)
        return exc

    def _finish(self, finished: bool, error: Optional[BaseException]) -> None:
        if not self._lease.release():
            return
        c = self._client
        usage = self.usage
        c._metrics.record_request(
            self._ep.id, self._request.model, finished and error is None,
            c._clock.monotonic() - self._start,
            error_type=None if finished and error is None else
            (type(error).__name__ if error else "ClosedEarly"),
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            ttft=self._ttft, stream=True)
        tracing.stream_finished(self._trace, error, None if finished and error is None else
                                (type(error).__name__ if error else "ClosedEarly"),
                                usage, self._ttft, list(self.finish_reasons.values()))

    def close(self) -> None:
        """Stop reading and drop the connection (idempotent)."""
        self._gen.close()
        self._finish(False, None)

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SharedTextStream(TextStream):
    """One caller's stream inside a shared prompt-list call (_streaming/stream_batching.py): its own
    choices, renumbered from 0, and its own usage, read from its ``SharedHandle``'s feed;
    everything else (metrics, TTFT, errors with ``partial_text``) as ``TextStream``."""
