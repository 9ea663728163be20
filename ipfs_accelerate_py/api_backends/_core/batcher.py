"""The batcher: compatible requests waiting at the same moment share ONE call.

Completion requests for the same endpoint, model and sampling parameters become one
``/v1/completions`` call whose ``prompt`` is a list; the server answers choice
``index = prompt_i * n + j`` and each caller gets its own slice back. A worker takes what
is already waiting (never holding a lone request back). When it found company (a burst is
under way, or a compatible shared call is in flight) and the batch is not full, it lingers
while compatible requests keep arriving (each within ``batch_linger`` of the last), never
past ``batch_timeout`` after the first request's arrival, then sends. A request that finds
no company while a compatible batch is in flight waits for that batch's callers (within
``batch_timeout``): under closed-loop load that keeps every round to one call. Callers
that are themselves waiting inside the batch cannot add to it, so a fixed wait would only
add latency: the linger ends when the burst does. If the shared call fails with a 4xx,
each request is retried alone so only the bad one fails. A retried failure (5xx, a dropped
connection, a timeout) is retried as up to eight calls of a share of the requests each, so
a run of bad luck, or a prompt that breaks the server, does not fail every caller together.

The ``Batcher`` is the handler an endpoint's dispatcher runs for each job (``handle_job``):
it drops a job past its deadline, gathers its company, and sends it alone or shared through
the call it was given (retries around attempts), resolving every job whatever happens. Its
dependencies are handed in at construction; its public face is ``mixins/batching.py``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import (TYPE_CHECKING, Any, Awaitable, Callable, Dict, Hashable, List, Optional,
                    Protocol, Sequence)

from .. import tracing
from .loop import CallerLoop, ClientLoop, Signal
from .breaker import CLOSED
from ..clock import Clock
from ..models import ChatBatchRequest, ChatRequest, CompletionResult, Request, Usage
from ..errors import (ApiError, ClientClosedError, HTTPStatusError, QueueTimeoutError,
                      ReplyMismatchError, TransientError)
from ..operations import OperationRequest, OperationResult
from ..reply_checks import check_choices, check_usage_adds_up, note_list_mismatch, share_tokens
from .retry import RetryPolicy, retry_wait
from .queue import Job

if TYPE_CHECKING:
    from ..adapter import BackendAdapter
    from .endpoint import Endpoint
    from .._observability.recorder import MetricsRecorder

__all__ = ["Batcher", "batch_key", "merge_requests", "split_result", "share_tokens",
           "prompt_count", "RETRY_PARTS"]

log = logging.getLogger("ipfs_accelerate_py.api_backends")

#: A failed shared call is retried as at most this many calls (see ``_retry_in_parts``).
RETRY_PARTS = 8
#: A member of a failed shared call with less time left than this is not retried.
_LATE = 0.01


class Call(Protocol):
    """One call with its retries (``RetryMixin._call``): format, attempts, parse."""

    def __call__(self, ep: "Endpoint", request: Request, deadline: float, model: Optional[str],
                 request_id: str, queue_priority: Optional[int] = None, fail_fast: bool = False,
                 first_attempt: int = 0, last_attempt: Optional[int] = None,
                 fresh_id: bool = False) -> Awaitable[Any]: ...


class Finish(Protocol):
    """Resolve a job and record what its caller saw (``RequestLog.finish``)."""

    def __call__(self, ep: "Endpoint", job: Job, start: float, result: Optional[Any] = None,
                 error: Optional[BaseException] = None) -> None: ...


def batch_key(endpoint_id: str, request: Request, supports_prompt_list: bool,
              chat_batch: bool = False) -> Optional[Hashable]:
    """The key under which ``request`` may share a call, or None if it must go alone.

    Completions share a call when the backend takes prompt lists; chat requests (one
    choice each: a chat batch refuses ``n``) when ``chat_batch`` says the endpoint takes
    conversation lists."""
    if request.stream:
        return None
    if isinstance(request, ChatRequest):
        if not chat_batch or (request.n or 1) != 1 or request.tools or request.tool_choice:
            return None  # tool calls: not known to be accepted by the batch route
        return (endpoint_id, request.model, "chat", request.sampling_key())
    if not supports_prompt_list or not isinstance(request.prompt, str):
        return None
    return (endpoint_id, request.model, request.sampling_key())


def prompt_count(request: Request) -> int:
    """How many prompts ``request`` carries: its reply has ``prompt_count * n`` choices."""
    if isinstance(request, ChatBatchRequest):
        return len(request.conversations)
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def merge_requests(requests: Sequence[Request]) -> Request:
    """One request carrying every prompt (or conversation, or an operation's inputs), in
    order (sampling fields are equal by key)."""
    first = requests[0]
    if isinstance(first, OperationRequest):  # the operation's own batching rule
        return type(first).merged(requests)  # type: ignore[return-value]
    if isinstance(first, ChatRequest):  # the batch class of the backend's chat requests
        return first.batch_of([r.messages for r in requests])  # type: ignore[union-attr]
    return first.model_copy(update={"prompt": [r.prompt for r in requests]})  # type: ignore[union-attr]


def split_result(result: CompletionResult, count: int, n: int) -> List[CompletionResult]:
    """Each prompt's slice of a batched result, with its own ``usage``; ``batch_usage``
    keeps the whole call's. Token counts the server gave per choice are exact (and must add
    up to the call's); where it gave only the call's sum, that sum is split evenly, so the
    parts still add up. A reply that does not carry exactly the choices asked for is never
    split: ``ReplyMismatchError`` (reply_checks.py)."""
    check_choices(result, count, n)
    parts = result.split_by_prompt(count, n)
    choices = [c for p in parts for c in p.choices]
    every_part = all(p.choices for p in parts)
    if every_part and all(c.prompt_tokens is not None for c in choices):
        ins = [p.choices[0].prompt_tokens or 0 for p in parts]
    else:
        ins = share_tokens(result.usage.prompt_tokens, count)
    if every_part and all(c.completion_tokens is not None for c in choices):
        outs = [sum(c.completion_tokens or 0 for c in p.choices) for p in parts]
    else:
        outs = share_tokens(result.usage.completion_tokens, count)
    check_usage_adds_up(ins, outs, result.usage)
    for part, i, o in zip(parts, ins, outs):
        part.usage = Usage(prompt_tokens=i, completion_tokens=o, total_tokens=i + o)
        part.batch_size = count
        part.batch_usage = result.usage
    return parts


def _requeue(endpoint: "Endpoint", jobs: Sequence[Job]) -> None:
    """Queue jobs that came as a gathered job's company and do not go with its call."""
    for job in jobs:
        endpoint.queue.put(job)


class _Gathering:
    """Per endpoint: the batch a worker holds open while the in-flight limit is reached."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: Dict[Hashable, List[Job]] = {}
        self.room: Dict[Hashable, int] = {}


class Batcher:
    """Each job an endpoint's dispatcher takes: sent alone, or in one shared call with the
    compatible jobs waiting with it (see the module docstring).

    ``call``: one call with its retries; ``finish``: resolve a job and record it;
    ``sleep``: a wait that the client's ``close()`` cuts short; ``share_stream``: streams
    that share one prompt-list stream (``stream_batching.open_shared``); ``adapter``: says
    whether an error means the server lacks a route (the client hands in another when it
    learns which API its server speaks: ``adapter`` is then set anew); ``closing``: set
    when the client closes; ``loop``: the client's loop (the batch's wake-ups)."""

    def __init__(self, clock: Clock, closing: threading.Event, loop: ClientLoop,
                 metrics: "MetricsRecorder", call: Call, finish: Finish,
                 sleep: Callable[[float, str], Awaitable[None]],
                 share_stream: Callable[["Endpoint", List[Job]], Awaitable[None]],
                 adapter: "BackendAdapter") -> None:
        self._clock = clock
        self._closing = closing
        self._loop = loop
        self._metrics = metrics
        self._call = call
        self._finish = finish
        self._sleep = sleep
        self._share_stream = share_stream
        self.adapter = adapter
        #: per endpoint id: the batch a worker holds open while the in-flight limit is reached
        self._gatherings: Dict[str, _Gathering] = {}

    def _gathering(self, endpoint: "Endpoint") -> _Gathering:
        gathering = self._gatherings.get(endpoint.id)
        if gathering is None:  # setdefault: two first callers end with the same one
            gathering = self._gatherings.setdefault(endpoint.id, _Gathering())
        return gathering


    async def handle_job(self, ep: "Endpoint", job: Job) -> None:
        """A dispatcher task's turn (on the client's loop): drop a job past its deadline,
        else send it alone or batched."""
        await self.handle_group(ep, [job])

    async def handle_group(self, ep: "Endpoint", jobs: List[Job]) -> None:
        """``handle_job`` for compatible jobs that came together (the async face's requests
        of one loop turn, never queued: ``AsyncFaceMixin._gather_here``): the first gathers
        its call with the others as its company (what does not fit is queued)."""
        job, company = jobs[0], jobs[1:]
        # one reading for the deadline and the burst checks: the queue's as it handed it over
        now = job.picked_at if job.picked_at is not None else self._clock.monotonic()
        if not self._check_queue_deadline(job, now):
            self._metrics.record_unsent(ep.id, job, self._clock.monotonic())
            _requeue(ep, company)
            return
        batch = await self._collect_batch(ep, job, now, company)
        if not batch:
            return  # handed to the task gathering its batch
        if job.request.stream:  # streams: alone, or one shared prompt-list stream
            await self._share_stream(ep, batch)
        elif len(batch) > 1:
            await self._run_batch(ep, batch)
        else:
            await self.run_single(ep, job)

    def _check_queue_deadline(self, job: Job, now: Optional[float] = None) -> bool:
        """Fail a job that waited past its deadline; True if it may still run. ``now``: the
        caller's reading of the clock, when it has one."""
        if job.future.done():  # the caller gave up (timeout/cancel) while it waited
            return False
        now = self._clock.monotonic() if now is None else now
        if now > job.deadline:
            job.fail(QueueTimeoutError(
                f"request waited {now - job.enqueued_at:.2f}s in the queue, "
                "past its deadline; it was never sent"))
            return False
        return True


    async def run_single(self, ep: "Endpoint", job: Job) -> None:
        start = self._clock.monotonic()
        tracing.job_started(ep, job, start)
        try:
            result = await self._call(ep, job.request, job.deadline, job.model, job.request_id,
                                      job.priority, job.fail_fast)
            if isinstance(result, CompletionResult):  # an operation's result has no choices
                check_choices(result, prompt_count(job.request), job.request.n or 1)
        except BaseException as exc:  # noqa: BLE001 - delivered to the caller
            self._finish(ep, job, start, error=exc)
        else:
            self._finish(ep, job, start, result=result)


    async def _collect_batch(self, endpoint: "Endpoint", job: Job,
                             now: Optional[float] = None,
                             company: Sequence[Job] = ()) -> List[Job]:
        """``job`` and the compatible jobs that share its call (empty: it joined another
        job's). ``company``: compatible jobs that came with it, never queued; what cannot
        go with it is queued (or joins the call gathering for its key)."""
        settings = endpoint.settings
        alone = (job.key is None or not settings.batch_enabled or settings.max_batch_size <= 1
                 # queued before the server turned out to lack the route
                 or (isinstance(job.request, ChatRequest) and not endpoint.chat_batch_supported)
                 # queued before a reply of this server turned out not to match
                 or not endpoint.shares_prompt_lists)
        limit = 1 if alone else settings.max_batch_size
        if len(company) >= limit:
            _requeue(endpoint, company[limit - 1:])
            company = company[:limit - 1]
        if alone:
            return [job]
        if self._hand_over(endpoint, job):  # a worker holding its batch open while the
            _requeue(endpoint, company)     # limit is reached takes it (and what came with it)
            return []
        got = endpoint.queue.join_or_take(job, limit - 1 - len(company))
        if got is None:  # a collector's batch took it (``put`` hands arrivals to it likewise)
            _requeue(endpoint, company)
            return []
        companions, shared_calls = got
        batch = [job, *company] + companions
        # Linger only amid a burst: company is waiting now, a shared call is in flight, or one
        # just finished and its callers are coming back. A lone sequential caller is sent at once.
        burst = (len(batch) > 1 or shared_calls > 0
                 or (self._clock.monotonic() if now is None else now) < endpoint.burst_until)
        if burst and len(batch) < limit and settings.batch_timeout > 0 and settings.batch_linger > 0:
            until = max(job.enqueued_at + settings.batch_timeout,
                        self._clock.monotonic() + settings.batch_linger)
            batch += await endpoint.queue.await_compatible(
                job.key, limit - len(batch), until, settings.batch_linger,
                Signal(self._wakes_here()))
        if len(batch) < limit and endpoint.limit.full:
            batch = await self._gather_while_full(endpoint, job, batch, limit)
        return [j for j in batch if j is job or self._check_queue_deadline(j)]


    def _wakes_here(self) -> "ClientLoop | CallerLoop":
        """What wakes a coroutine on the running loop: the client's, or a caller's that
        gathers its own shared call (``asubmit``)."""
        running = asyncio.get_running_loop()
        return self._loop if self._loop.started and self._loop.loop is running \
            else CallerLoop(running)

    def _hand_over(self, endpoint: "Endpoint", job: Job) -> bool:
        """Give ``job`` to the worker holding its key's batch open while the in-flight limit
        is reached, if one is and has room (True: it took it).

        Tasks started for a burst's first arrivals would otherwise each send what they
        hold while another gathers: several small calls where one would do."""
        gathering = self._gatherings.get(endpoint.id)
        if gathering is None or not gathering.batches:
            return False
        with gathering.lock:
            batch = gathering.batches.get(job.key)
            if batch is not None and len(batch) < gathering.room[job.key]:
                batch.append(job)
                return True
        return False


    async def _gather_while_full(self, endpoint: "Endpoint", job: Job, batch: List[Job],
                                 limit: int) -> List[Job]:
        """The in-flight limit is reached: hold the batch open until a slot frees (at most
        ``batch_timeout``), so what arrives meanwhile joins this call instead of queueing for
        a call of its own."""
        gathering = self._gathering(endpoint)
        key = job.key
        with gathering.lock:
            if key in gathering.batches:
                return batch
            gathering.batches[key] = batch
            gathering.room[key] = limit
        breaker = endpoint.breaker
        try:
            # A circuit that leaves CLOSED ends the wait: what is held here must then do
            # what queued work does (fail-fast and routed work fails over at once).
            # At most batch_timeout: under steady load a freed slot may go to another
            # worker's attempt each time, and a batch must not wait for a lull.
            until = min(job.deadline, self._clock.monotonic() + endpoint.settings.batch_timeout)
            await endpoint.limit.await_room(until, self._closing,
                                            lambda: breaker.state != CLOSED)
        finally:
            with gathering.lock:
                del gathering.batches[key]
                del gathering.room[key]
        if job.fail_fast and breaker.state != CLOSED and endpoint.settings.circuit_breaker_enabled:
            for j in batch:
                if j is not job:
                    endpoint.circuit.refuse(j)
            return [job]  # its own call meets the breaker's fail-fast refusal
        return batch + endpoint.queue.take_compatible(key, limit - len(batch))


    async def _run_batch(self, endpoint: "Endpoint", jobs: List[Job], first_attempt: int = 0,
                         fresh_id: bool = False) -> None:
        """Send ``jobs`` as one call; resolve every job's future whatever happens.

        ``first_attempt``: the attempts these jobs already made (as part of a larger call
        that failed; see ``_retry_in_parts``); ``fresh_id``: the first job's request id was
        not sent before (a part other than the first)."""
        merged = merge_requests([j.request for j in jobs])
        deadline = min(j.deadline for j in jobs)
        model = jobs[0].model
        if first_attempt == 0:  # a batch as formed; its parts are retries
            self._metrics.record_batch(endpoint.id, model, len(jobs))
        start = self._clock.monotonic()
        endpoint.queue.shared_call_started(jobs[0].key)
        tracing.shared_call_started(endpoint, jobs, start)  # a span linked to the callers'
        try:
            try:
                # The shared call carries the first job's id and its most urgent priority.
                # A call of several jobs makes one attempt here: its retry goes in parts.
                # (``fail_fast`` is part of the batching key: every job's is the same)
                result = await self._call(
                    endpoint, merged, deadline, model, jobs[0].request_id,
                    min(j.priority for j in jobs), jobs[0].fail_fast, first_attempt=first_attempt,
                    last_attempt=first_attempt if len(jobs) > 1 else None, fresh_id=fresh_id)
                # Its callers will be back at once (closed-loop load): let their next
                # requests gather.
                endpoint.burst_until = self._clock.monotonic() + endpoint.settings.batch_timeout
            finally:
                endpoint.queue.shared_call_ended(jobs[0].key)
                tracing.shared_call_ended()
        except ReplyMismatchError as exc:
            await self._resend_alone(endpoint, jobs, exc)
            return
        except HTTPStatusError as exc:
            if not isinstance(exc, TransientError):
                if isinstance(merged, ChatBatchRequest) and self.adapter.is_missing_route(exc):
                    endpoint.chat_batch_supported = False
                    log.info("endpoint %s has no chat batch route; chat requests go alone",
                             endpoint.id)
                # One bad prompt (e.g. too long) fails the whole list: find it by going alone.
                # The first job's id already went out with the batch, so its solo call
                # repeats that id on the wire: count it as the retry it is.
                self._metrics.record_retry(endpoint.id, model)
                for j in jobs:
                    await self.run_single(endpoint, j)
                return
            await self._retry_in_parts(endpoint, jobs, exc, first_attempt, deadline, start)
            return
        except ApiError as exc:
            await self._retry_in_parts(endpoint, jobs, exc, first_attempt, deadline, start)
            return
        except BaseException as exc:  # noqa: BLE001 - never lose a caller
            self._fail_jobs(endpoint, jobs, exc, start)
            return
        try:
            if isinstance(result, OperationResult):  # the operation's own split
                parts = result.split([j.request.input_count() for j in jobs])
            else:
                parts = split_result(result, len(jobs), merged.n or 1)
        except ReplyMismatchError as exc:
            await self._resend_alone(endpoint, jobs, exc)
            return
        for j, part in zip(jobs, parts):
            self._finish(endpoint, j, start, result=part)


    async def _resend_alone(self, endpoint: "Endpoint", jobs: List[Job],
                            exc: ReplyMismatchError) -> None:
        """A shared call's reply did not match what was asked: nobody gets a slice of it.
        Each member is sent again alone (its own retries, its own deadline), and the
        endpoint stops sharing calls (``prompt_list_mismatch``) unless a setting forces it."""
        note_list_mismatch(endpoint, self._metrics, jobs[0].model, exc)
        await asyncio.gather(*(self.run_single(endpoint, j) for j in jobs))


    async def _retry_in_parts(self, endpoint: "Endpoint", jobs: List[Job], exc: BaseException,
                              attempt: int, deadline: float, start: float) -> None:
        """A shared call's attempt ``attempt`` failed with ``exc``: retry it as up to
        ``RETRY_PARTS`` calls of an equal share of the jobs each (at the same time), or fail
        every job when it is not retried.

        Why split: a shared call's failure is every caller's failure. Each job still makes at
        most ``max_retries + 1`` attempts, so the mean number of failed callers is the same
        as unbatched (at 28 % faults and 4 retries, 0.28^5 = 0.17 % of callers), but retried
        whole, a 32-prompt call fails its 32 callers together. Simulated over 400 callers in
        13 calls: P(more than 4 callers fail) is 2.2 % retried whole, 2.3 % in halves (the
        halves share their ancestors' luck), 0.4 % in quarters and 0.2 % in eighths, as low
        as 400 unbatched requests. A prompt that makes the server fail is also cut off from
        the others in one retry."""
        if len(jobs) == 1 or not isinstance(exc, ApiError):
            self._fail_jobs(endpoint, jobs, exc, start)
            return
        # The call ran to its most urgent member's deadline: the members whose deadline has
        # come end here; the others are retried within their own (one short deadline in a
        # shared call must not fail callers with time left).
        now = self._clock.monotonic()
        late = [j for j in jobs if j.deadline - now < _LATE]
        if late and len(late) < len(jobs):
            self._fail_jobs(endpoint, late, exc, start)
            jobs = [j for j in jobs if j.deadline - now >= _LATE]
            deadline = min(j.deadline for j in jobs)
        try:
            wait = retry_wait(exc, attempt, RetryPolicy.from_settings(endpoint.settings),
                              deadline, self._clock)
        except ApiError as final:  # not retried, or the deadline comes first
            self._fail_jobs(endpoint, jobs, final, start)
            return
        tracing.retrying(exc, attempt, wait)
        try:
            await self._sleep(wait, "waiting to retry")
        except ClientClosedError as closed:
            self._fail_jobs(endpoint, jobs, closed, start)
            return
        parts, at = [], 0
        for size in share_tokens(len(jobs), min(len(jobs), RETRY_PARTS)):  # sizes that add up
            parts.append(jobs[at:at + size])
            at += size
        # The first part repeats the shared call's request id (its first job's): a retry on
        # the wire. The others carry their own first job's id, sent for the first time.
        # (at the same time; each part ends by its deadline, like any call)
        await asyncio.gather(*(self._run_part(endpoint, part, attempt + 1, i > 0)
                               for i, part in enumerate(parts)))


    async def _run_part(self, endpoint: "Endpoint", jobs: List[Job], first_attempt: int,
                        fresh_id: bool) -> None:
        """``_run_batch`` of one part; whatever escapes it still reaches the callers."""
        try:
            await self._run_batch(endpoint, jobs, first_attempt, fresh_id)
        except BaseException as exc:  # noqa: BLE001 - never lose a caller
            now = self._clock.monotonic()
            self._fail_jobs(endpoint, [j for j in jobs if not j.future.done()], exc, now)


    def _fail_jobs(self, endpoint: "Endpoint", jobs: List[Job], exc: BaseException,
                   start: float) -> None:
        for j in jobs:
            self._finish(endpoint, j, start, error=exc)
