"""Bounded priority queue with aging, served by a fixed pool of worker threads.

Priorities: 0 HIGH, 1 NORMAL, 2 LOW; FIFO within a priority. A waiting request's
effective priority improves by one level every ``aging_interval`` seconds, so LOW work
still runs under a steady stream of HIGH work. ``max_concurrent_requests`` workers block
on a condition variable (no polling, no thread per request). Putting into a full queue
raises ``QueueFullError``. Every job ends: a result, its own error, ``QueueTimeoutError``
when it waited past its deadline, or ``ClientClosedError`` when the client closes.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ClientClosedError, QueueFullError, ValidationError
from ._host import HostBase

__all__ = ["Job", "PriorityRequestQueue", "WorkerPool", "QueueMixin", "PRIORITIES"]

PRIORITIES = (0, 1, 2)
HIGH, NORMAL, LOW = PRIORITIES


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or priority not in PRIORITIES:
        raise ValidationError(f"must be 0 (HIGH), 1 (NORMAL) or 2 (LOW), got {priority!r}",
                              field="priority")
    return priority


class Job:
    """One submitted request and the future its caller waits on."""

    __slots__ = ("request", "priority", "future", "enqueued_at", "deadline", "key", "seq",
                 "model", "request_id", "picked_at", "fail_fast")

    def __init__(self, request: Any, priority: int, deadline: float, key: Optional[Hashable],
                 model: Optional[str], request_id: str, now: float,
                 fail_fast: bool = False) -> None:
        self.request = request
        self.priority = priority
        self.future: Future = Future()
        self.enqueued_at = now
        self.deadline = deadline
        self.key = key  # batching key; None when the request cannot share a call
        self.model = model
        self.request_id = request_id
        self.seq = 0
        #: when a worker took it off the queue (that worker's turn reads no clock of its own)
        self.picked_at: Optional[float] = None
        self.fail_fast = fail_fast  # an OPEN circuit fails it at once instead of holding it

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            try:
                self.future.set_exception(exc)
            except Exception:  # noqa: BLE001 - already resolved by a racing path
                pass

    def succeed(self, result: Any) -> None:
        if not self.future.done():
            try:
                self.future.set_result(result)
            except Exception:  # noqa: BLE001
                pass


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
        lock = threading.Lock()
        self._cond = threading.Condition(lock)      # idle workers wait here
        self._arrived = threading.Condition(lock)   # batch collectors wait here
        # key -> the batch a worker is collecting; compatible arrivals go straight into it
        self._collecting: Dict[Hashable, List[Job]] = {}
        self._collect_room: Dict[Hashable, int] = {}
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
        with self._cond:
            if self._closed:
                raise ClientClosedError("client is closed; request not queued")
            if self._size >= self.maxsize:
                raise QueueFullError(f"request queue is full ({self.maxsize} waiting); "
                                     "raise queue_size or slow down")
            job.seq = next(self._seq)
            buf = self._collecting.get(job.key) if job.key is not None else None
            if buf is not None and len(buf) < self._collect_room[job.key]:
                # A worker is gathering a batch for this key: join it, wake no one else.
                buf.append(job)
                self._arrived.notify_all()
                return
            self._lanes[job.priority].append(job)
            self._size += 1
            self._cond.notify()

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

    def get(self, timeout: Optional[float] = None,
            should_exit: Optional[Callable[[], bool]] = None) -> Optional[Job]:
        """Next job, waiting for one; ``None`` once closed, on timeout, or when
        ``should_exit()`` says this waiter is no longer wanted (a shrinking pool)."""
        with self._cond:
            while not self._size or self._paused:
                if self._closed or (should_exit is not None and should_exit()):
                    return None
                if not self._cond.wait(timeout):
                    return None
            return self._pick()

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> List[Job]:
        """Hold every job (the circuit opened); return the fail-fast ones, removed."""
        with self._cond:
            if not self._paused:
                self._paused, self._paused_at = True, self._clock.monotonic()
            return self._take_where(lambda j: j.fail_fast)

    def resume(self) -> List[float]:
        """Hand jobs out again (the circuit closed); return how long each waiting job was
        held by the pause (seconds)."""
        with self._cond:
            if not self._paused:
                return []
            self._paused = False
            now = self._clock.monotonic()
            held = [now - max(j.enqueued_at, self._paused_at)
                    for lane in self._lanes.values() for j in lane]
            self._cond.notify_all()
            return held

    def remove(self, job: Job) -> bool:
        """Take ``job`` out if it is still waiting; False when a worker has it already."""
        with self._cond:
            return bool(self._take_where(lambda j: j is job))

    def expire(self, now: float) -> List[Job]:
        """Remove and return the jobs whose deadline has passed."""
        with self._cond:
            return self._take_where(lambda j: j.deadline <= now)

    def _take_where(self, pred: Callable[[Job], bool]) -> List[Job]:
        taken: List[Job] = []
        for p, lane in self._lanes.items():
            if any(pred(j) for j in lane):
                taken += [j for j in lane if pred(j)]
                self._lanes[p] = deque(j for j in lane if not pred(j))
        self._size -= len(taken)
        return taken

    def wake_all(self) -> None:
        """Wake every idle waiter (they re-check why they wait)."""
        with self._cond:
            self._cond.notify_all()

    def take_compatible(self, key: Hashable, limit: int) -> List[Job]:
        """Remove up to ``limit`` waiting jobs with batching key ``key`` (oldest first)."""
        if limit <= 0:
            return []
        with self._cond:
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
        """A batch with ``key`` went on the wire (see ``wait_compatible``)."""
        with self._cond:
            self._shared_in_flight[key] = self._shared_in_flight.get(key, 0) + 1

    def shared_call_ended(self, key: Hashable) -> None:
        """That batch came back: wake a collector waiting for its callers."""
        with self._cond:
            left = self._shared_in_flight.get(key, 0) - 1
            if left > 0:
                self._shared_in_flight[key] = left
            else:
                self._shared_in_flight.pop(key, None)
            self._arrived.notify_all()

    def shared_calls_in_flight(self, key: Hashable) -> int:
        return self._shared_in_flight.get(key, 0)

    def collecting(self, key: Hashable) -> bool:
        """Whether a worker is gathering a batch for ``key`` right now."""
        return key in self._collecting

    def collector_room(self, key: Hashable) -> int:
        """Jobs the batch gathered for ``key`` can still take (0: none is gathered)."""
        with self._cond:
            buf = self._collecting.get(key)
            return 0 if buf is None else max(0, self._collect_room.get(key, 0) - len(buf))

    def wait_compatible(self, key: Hashable, limit: int, until: float, gap: float) -> List[Job]:
        """Gather up to ``limit`` jobs with ``key``: those waiting now, then arrivals, which
        come straight to this collector (other workers are not woken for them). Stops when
        full, at monotonic ``until``, or once no compatible job arrived for ``gap`` seconds
        (the burst ended). A second collector for the same key only takes what waits.

        A collector that has found no company yet while a shared call with ``key`` is in
        flight keeps waiting (up to ``until``) for that call to come back, then ``gap`` for
        its callers: under closed-loop load (each caller sends again as soon as it has its
        answer) a request that went alone once would otherwise stay out of phase with the
        batch for good, and every round would cost two calls instead of one."""
        with self._cond:
            out = self._take_locked(key, limit)
            if key in self._collecting or self._closed:
                return out
            buf: List[Job] = []
            self._collecting[key] = buf
            self._collect_room[key] = limit - len(out)
            try:
                last = self._clock.monotonic()
                while len(buf) < self._collect_room[key] and not self._closed:
                    now = self._clock.monotonic()
                    awaiting_batch = not out and not buf and self._shared_in_flight.get(key, 0) > 0
                    wait_for = (until if awaiting_batch else min(until, last + gap)) - now
                    if wait_for <= 0:
                        break
                    seen = len(buf)
                    self._arrived.wait(wait_for)
                    if len(buf) > seen or awaiting_batch:
                        last = self._clock.monotonic()
            finally:
                del self._collecting[key]
                del self._collect_room[key]
            return out + buf

    def close(self) -> List[Job]:
        """Stop accepting; wake every waiter; return what was still queued."""
        with self._cond:
            self._closed = True
            left = [j for lane in self._lanes.values() for j in lane]
            for lane in self._lanes.values():
                lane.clear()
            self._size = 0
            self._cond.notify_all()
            self._arrived.notify_all()
        return left


class WorkerPool:
    """``n`` daemon threads running ``handle(job)`` for each job ``queue`` hands out."""

    def __init__(self, queue: PriorityRequestQueue, n: int, handle: Callable[[Job], None],
                 name: str) -> None:
        self._queue = queue
        self._handle = handle
        self._n = n
        self._name = name
        self._threads: List[threading.Thread] = []
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self.active = 0  # jobs being handled right now

    def ensure_started(self) -> None:
        if len(self._threads) >= self._n:
            return
        with self._lock:
            while len(self._threads) < self._n and not self._queue.closed:
                t = threading.Thread(target=self._run, daemon=True,
                                     name=f"{self._name}-worker-{next(self._numbers)}")
                self._threads.append(t)
                t.start()

    def resize(self, n: int) -> None:
        """Serve with ``n`` threads: start the missing ones, or let surplus idle ones retire."""
        if n < 1:
            raise ValidationError("must be at least 1", field="max_concurrent_requests")
        with self._lock:
            shrinking = n < len(self._threads)
            self._n = n
        if shrinking:
            self._queue.wake_all()
        else:
            self.ensure_started()

    def _surplus(self) -> bool:
        """Called by an idle worker: retire it if the pool holds more threads than wanted."""
        with self._lock:
            if len(self._threads) > self._n:
                me = threading.current_thread()
                if me in self._threads:
                    self._threads.remove(me)
                    return True
            return False

    @property
    def size(self) -> int:
        return self._n

    def _run(self) -> None:
        while True:
            job = self._queue.get(should_exit=self._surplus)
            if job is None:
                return
            with self._lock:
                self.active += 1
            try:
                self._handle(job)
            except BaseException as exc:  # noqa: BLE001 - a worker must never die silently
                job.fail(exc)
            finally:
                with self._lock:
                    self.active -= 1

    def join(self, timeout: float) -> bool:
        """Wait for the threads to end; True when none is alive."""
        end = time.monotonic() + timeout
        threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    def alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)


class QueueMixin(HostBase):
    """README surface: ``queue_enabled``, ``request_queue``, ``current_requests``."""

    @property
    def queue_enabled(self) -> bool:
        return self._settings.queue_enabled

    @queue_enabled.setter
    def queue_enabled(self, value: bool) -> None:
        self._set_on_all_endpoints(queue_enabled=bool(value))

    @property
    def request_queue(self) -> PriorityRequestQueue:
        """The default endpoint's queue (``len()`` is how many wait)."""
        return self._default_endpoint().queue

    @property
    def current_requests(self) -> int:
        """Requests being sent right now, over every endpoint."""
        return sum(ep.in_flight for ep in self._endpoints.values())

    def _enqueue(self, endpoint: Any, job: Job) -> None:
        endpoint.queue.put(job)
        endpoint.workers.ensure_started()

