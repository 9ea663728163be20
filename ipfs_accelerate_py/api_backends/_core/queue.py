"""The bounded priority queue an endpoint's requests wait in, and ``Job``, one request in it.

Priorities: 0 HIGH, 1 NORMAL, 2 LOW; FIFO within a priority. A waiting request's
effective priority improves by one level every ``aging_interval`` seconds, so LOW work
still runs under a steady stream of HIGH work. Jobs are put from any thread; the
endpoint's ``Dispatcher`` (dispatcher.py) takes them. Putting into a full queue raises
``QueueFullError``. Every job ends: a result, its own error, ``QueueTimeoutError`` when it
waited past its deadline, or ``ClientClosedError`` when the client closes. The queue also
serves the batcher: compatible jobs are taken together (``take_compatible``,
``join_or_take``) and arrivals handed to a batch being gathered (``await_compatible``).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from concurrent.futures import CancelledError as FutureCancelled, Future
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Tuple

from .loop import Signal
from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ClientClosedError, QueueFullError
from ..models import PRIORITIES

__all__ = ["Job", "PriorityRequestQueue", "PRIORITIES", "HIGH", "NORMAL", "LOW"]

HIGH, NORMAL, LOW = PRIORITIES


class Job:
    """One submitted request and the future its caller waits on.

    ``lazy``: the future is made only when something asks for it (``future``). A job served
    in its caller's own task (the async face's ``_serve_here``) is read by that task alone,
    so its outcome is kept here instead (``outcome``): a ``concurrent.futures.Future`` is a
    condition, a lock and its notifications, paid per request for a waiter that never
    comes. Any other job hands its future to another thread or task, so it is made with
    the job (or asked for before the job is handed on)."""

    __slots__ = ("request", "priority", "_future", "_outcome", "enqueued_at", "deadline", "key",
                 "seq", "model", "request_id", "picked_at", "fail_fast", "context", "here",
                 "__weakref__")

    def __init__(self, request: Any, priority: int, deadline: float, key: Optional[Hashable],
                 model: Optional[str], request_id: str, now: float,
                 fail_fast: bool = False, lazy: bool = False) -> None:
        self.request = request
        self.priority = priority
        self._future: Optional[Future] = None if lazy else Future()
        #: without a future: (True, result), (False, error), or (False, None) cancelled
        self._outcome: Optional[Tuple[bool, Any]] = None
        self.enqueued_at = now
        self.deadline = deadline
        self.key = key  # batching key; None when the request cannot share a call
        self.model = model
        self.request_id = request_id
        self.seq = 0
        #: when a worker took it off the queue (that worker's turn reads no clock of its own)
        self.picked_at: Optional[float] = None
        self.fail_fast = fail_fast  # an OPEN circuit fails it at once instead of holding it
        #: what the caller attached for the step that serves it (a stream's tracing span)
        self.context: Any = None
        #: served in its caller's own task (``Dispatcher.claim``): a cancellation there is
        #: the caller leaving, not the client's loop stopping
        self.here = False

    @property
    def future(self) -> Future:
        """The job's future, made now if it was not (resolved as the job already is)."""
        future = self._future
        if future is None:
            future = self._future = Future()
            outcome = self._outcome
            if outcome is not None:
                ok, value = outcome
                if ok:
                    future.set_result(value)
                elif value is None:
                    future.cancel()
                else:
                    future.set_exception(value)
        return future

    def done(self) -> bool:
        """Whether the job is resolved (a result, an error, or cancelled)."""
        future = self._future
        return self._outcome is not None if future is None else future.done()

    def _keep(self, outcome: Tuple[bool, Any]) -> bool:
        """(No future) the first resolution is kept; False when one was already."""
        if self._outcome is not None:
            return False
        self._outcome = outcome
        return True

    def outcome(self) -> Any:
        """The result now, or its error raised (``concurrent.futures.CancelledError`` when
        the caller left); the job must be resolved."""
        future = self._future
        if future is not None:
            return future.result(0)
        ok, value = self._outcome  # type: ignore[misc]
        if ok:
            return value
        if value is None:
            raise FutureCancelled()
        raise value

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            if self.here:  # its caller left: the future says so, to whoever reads it
                if self._future is None:
                    self._keep((False, None))
                else:
                    self._future.cancel()
                return
            # the client's loop stopped under it
            exc = ClientClosedError("client closed while the request was in flight")
        future = self._future
        if future is None:
            self._keep((False, exc))
            return
        if not future.done():
            try:
                future.set_exception(exc)
            except Exception:  # noqa: BLE001 - already resolved by a racing path
                pass

    def succeed(self, result: Any) -> bool:
        """Resolve the job with ``result``; False when it was resolved already (its caller
        left, or a racing path ended it): then the caller sees what that path set. One
        look at the future (its lock), not two: this runs once per request."""
        future = self._future
        if future is None:
            return self._keep((True, result))
        try:
            future.set_result(result)
        except Exception:  # noqa: BLE001 - InvalidStateError: resolved or cancelled first
            return False
        return True


class PriorityRequestQueue:
    """Three FIFO lanes; ``get`` picks the lane whose head has the best aged priority."""

    def __init__(self, maxsize: int = 1000, aging_interval: float = 2.0,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.maxsize = maxsize
        self.aging_interval = aging_interval
        self._clock = clock
        self._lanes: Dict[int, Deque[Job]] = {p: deque() for p in PRIORITIES}
        self._size = 0
        self._seq = itertools.count()
        self._lock = threading.Lock()  # every waiter is a coroutine: nothing waits on it
        #: called (outside the lock) when a job may be taken: the dispatcher's ``kick``
        self.on_ready: Callable[[], None] = _nothing
        # key -> the batch a task is collecting; compatible arrivals go straight into it
        self._collecting: Dict[Hashable, List[Job]] = {}
        self._collect_room: Dict[Hashable, int] = {}
        self._collect_wake: Dict[Hashable, Signal] = {}  # each collector's wake-up
        self._collect_last: Dict[Hashable, float] = {}  # when its last company arrived
        # key -> shared (batched) calls in flight: their callers are likely to come back
        self._shared_in_flight: Dict[Hashable, int] = {}
        self._closed = False
        self._paused = False  # the endpoint's circuit is OPEN: hold every job, send nothing
        self._paused_at = 0.0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:  # an empty queue object is still a queue
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise ClientClosedError("client is closed; request not queued")
            if self._size >= self.maxsize:
                raise QueueFullError(f"request queue is full ({self.maxsize} waiting); "
                                     "raise queue_size or slow down")
            job.seq = next(self._seq)
            buf = self._collecting.get(job.key) if job.key is not None else None
            if buf is not None and len(buf) < self._collect_room[job.key]:
                # A task is gathering a batch for this key: join it, wake no one else. The
                # collector needs waking only for its first company (its wait becomes the
                # gap) and when full; else it reads the arrival time when its timer fires.
                buf.append(job)
                self._collect_last[job.key] = self._clock.monotonic()
                if len(buf) == 1 or len(buf) >= self._collect_room[job.key]:
                    self._collect_wake[job.key].set()
                return
            self._lanes[job.priority].append(job)
            self._size += 1
        self.on_ready()

    def _pick(self) -> Optional[Job]:
        now = self._clock.monotonic()
        best: Optional[Job] = None
        best_score = 0.0
        for lane in self._lanes.values():
            if lane:
                head = lane[0]
                score = head.priority - (now - head.enqueued_at) / self.aging_interval
                if best is None or score < best_score or (score == best_score and head.seq < best.seq):
                    best, best_score = head, score
        if best is not None:
            self._lanes[best.priority].popleft()
            self._size -= 1
            best.picked_at = now
        return best

    def take(self) -> Optional[Job]:
        """The next job if one may be taken now (not paused), else None; never waits."""
        with self._lock:
            if not self._size or self._paused:
                return None
            return self._pick()

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> List[Job]:
        """Hold every job (the circuit opened); return the fail-fast ones, removed."""
        with self._lock:
            if not self._paused:
                self._paused, self._paused_at = True, self._clock.monotonic()
            return self._take_where(lambda j: j.fail_fast)

    def resume(self) -> List[float]:
        """Hand jobs out again (the circuit closed); return how long each waiting job was
        held by the pause (seconds)."""
        with self._lock:
            if not self._paused:
                return []
            self._paused = False
            now = self._clock.monotonic()
            held = [now - max(j.enqueued_at, self._paused_at)
                    for lane in self._lanes.values() for j in lane]
        self.on_ready()
        return held

    def remove(self, job: Job) -> bool:
        """Take ``job`` out if it is still waiting; False when a worker has it already."""
        with self._lock:
            return bool(self._take_where(lambda j: j is job))

    def expire(self, now: float) -> List[Job]:
        """Remove and return the jobs whose deadline has passed."""
        with self._lock:
            return self._take_where(lambda j: j.deadline <= now)

    def _take_where(self, pred: Callable[[Job], bool]) -> List[Job]:
        taken: List[Job] = []
        for p, lane in self._lanes.items():
            if any(pred(j) for j in lane):
                taken += [j for j in lane if pred(j)]
                self._lanes[p] = deque(j for j in lane if not pred(j))
        self._size -= len(taken)
        return taken

    def take_compatible(self, key: Hashable, limit: int) -> List[Job]:
        """Remove up to ``limit`` waiting jobs with batching key ``key`` (oldest first)."""
        if limit <= 0:
            return []
        with self._lock:
            return self._take_locked(key, limit)

    def _take_locked(self, key: Hashable, limit: int) -> List[Job]:
        taken: List[Job] = []
        for p, lane in self._lanes.items():
            if not lane or len(taken) >= limit:
                continue
            keep: Deque[Job] = deque()
            for job in lane:
                if len(taken) < limit and job.key == key:
                    taken.append(job)
                else:
                    keep.append(job)
            if len(keep) != len(lane):
                self._lanes[p] = keep
        self._size -= len(taken)
        return taken

    def shared_call_started(self, key: Hashable) -> None:
        """A batch with ``key`` went on the wire (see ``await_compatible``)."""
        with self._lock:
            self._shared_in_flight[key] = self._shared_in_flight.get(key, 0) + 1

    def shared_call_ended(self, key: Hashable) -> None:
        """That batch came back: wake a collector waiting for its callers."""
        with self._lock:
            left = self._shared_in_flight.get(key, 0) - 1
            if left > 0:
                self._shared_in_flight[key] = left
            else:
                self._shared_in_flight.pop(key, None)
            wake = self._collect_wake.get(key)
        if wake is not None:
            wake.set()

    def join_or_take(self, job: Job, limit: int) -> Optional[Tuple[List[Job], int]]:
        """A dispatcher task's first step with a batchable ``job``, in one call: hand it to
        the task collecting its key's batch if that batch has room (None: it joined), else
        take up to ``limit`` compatible waiting jobs, oldest first: ``(those jobs, shared
        calls with the key in flight now)``."""
        key = job.key
        with self._lock:
            buf = self._collecting.get(key)
            if buf is not None and not self._closed and len(buf) < self._collect_room[key]:
                buf.append(job)  # as ``put`` does for an arrival
                self._collect_last[key] = self._clock.monotonic()
                if len(buf) == 1 or len(buf) >= self._collect_room[key]:
                    self._collect_wake[key].set()
                return None
            taken = self._take_locked(key, limit) if limit > 0 else []
            return taken, self._shared_in_flight.get(key, 0)

    def shared_calls_in_flight(self, key: Hashable) -> int:
        return self._shared_in_flight.get(key, 0)

    def collecting(self, key: Hashable) -> bool:
        """Whether a worker is gathering a batch for ``key`` right now."""
        return key in self._collecting

    async def await_compatible(self, key: Hashable, limit: int, until: float, gap: float,
                               wake: Signal) -> List[Job]:
        """Gather up to ``limit`` jobs with ``key``: those waiting now, then arrivals, which
        come straight to this collector (no other task is started for them). Stops when
        full, at monotonic ``until``, or once no compatible job arrived for ``gap`` seconds
        (the burst ended). A second collector for the same key only takes what waits.
        ``wake``: this collector's wake-up (set by ``put``, ``shared_call_ended``, close).

        A collector that has found no company yet while a shared call with ``key`` is in
        flight keeps waiting (up to ``until``) for that call to come back, then ``gap`` for
        its callers: under closed-loop load (each caller sends again as soon as it has its
        answer) a request that went alone once would otherwise stay out of phase with the
        batch for good, and every round would cost two calls instead of one."""
        with self._lock:
            out = self._take_locked(key, limit)
            if key in self._collecting or self._closed:
                return out
            buf: List[Job] = []
            self._collecting[key] = buf
            self._collect_room[key] = limit - len(out)
            self._collect_wake[key] = wake
        try:
            last = self._clock.monotonic()
            while True:
                with self._lock:
                    if len(buf) >= self._collect_room[key] or self._closed:
                        break
                    now = self._clock.monotonic()
                    last = max(last, self._collect_last.get(key, last))
                    awaiting_batch = not out and not buf and self._shared_in_flight.get(key, 0) > 0
                    wait_for = (until if awaiting_batch else min(until, last + gap)) - now
                    if wait_for <= 0:
                        break
                await wake.wait(wait_for)
                if awaiting_batch:  # the batch came back, or company came: the gap starts
                    last = self._clock.monotonic()
        finally:
            with self._lock:
                del self._collecting[key]
                del self._collect_room[key]
                del self._collect_wake[key]
                self._collect_last.pop(key, None)
                out += buf
        return out

    def close(self) -> List[Job]:
        """Stop accepting; wake every waiter; return what was still queued."""
        with self._lock:
            self._closed = True
            left = [j for lane in self._lanes.values() for j in lane]
            for lane in self._lanes.values():
                lane.clear()
            self._size = 0
            wakes = list(self._collect_wake.values())
        for wake in wakes:
            wake.set()
        return left


def _nothing() -> None:
    return None
