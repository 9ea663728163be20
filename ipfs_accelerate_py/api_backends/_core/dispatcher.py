"""The dispatcher: serves one endpoint's queue on the client's event loop.

Up to ``max_concurrent_requests`` jobs are handled at once, each in a task of the client's
loop (no thread per request, none waiting idle); each job goes to the handler the endpoint
was given (the batcher's ``handle_job``: alone or in a shared call, with retries).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Awaitable, Callable, Dict

from .loop import ClientLoop
from ..errors import ValidationError
from .queue import Job, PriorityRequestQueue

__all__ = ["Dispatcher"]


class Dispatcher:
    """Serves one endpoint's queue on the client's loop: up to ``n`` jobs handled at once,
    each by a task that takes the next job when it is done with its own, and ends when
    the queue has none to give (no task waits idle). ``kick`` (from any thread: the
    queue's ``on_ready``) starts tasks for what waits; a handler's error fails its job and
    never stops the service."""

    def __init__(self, queue: PriorityRequestQueue, n: int,
                 handle: Callable[[Job], Awaitable[None]], loop: ClientLoop) -> None:
        self._queue = queue
        self._handle = handle
        self._n = n
        self._loop = loop
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # ``join`` waits on it
        self._joining = 0  # threads in ``join``: only then does a task's end notify
        self._kicked = False  # a fill is scheduled on the loop and has not run yet
        self.active = 0  # jobs served now: tasks (each one job at a time) and claims
        #: claimed jobs per event loop they run on (callers' loops, not the client's)
        self._claims: Dict[Any, int] = {}
        queue.on_ready = self.kick

    def kick(self) -> None:
        """Start tasks for waiting jobs, soon, on the loop (one fill per burst of kicks)."""
        with self._lock:
            if self._kicked:
                return
            self._kicked = True
        self._loop.call_soon(self._fill)

    def _fill(self) -> None:
        with self._lock:
            self._kicked = False  # a kick from now on schedules another fill
        self._top_up()

    def _top_up(self) -> None:
        """Start one task if a job waits and a slot is free. Each task, once it has taken
        its job and that job's first step has run (a batch gathers what waits), tops up
        again: so a burst that one batch takes costs one task, not one per job."""
        with self._lock:
            if not (self.active < self._n and len(self._queue) and not self._queue.paused):
                return
            self.active += 1
        self._loop.spawn(self._serve())

    def claim(self, loop: Any) -> bool:
        """Serve one job in its caller's own task, on ``loop``, instead of queueing it (the
        async face's unshared requests): only when a kick would start it at once anyway
        (nothing waits in the queue, the queue is not paused, a slot is free), so no
        waiting job is passed over. The slot counts as a task's until ``unclaim``."""
        with self._lock:
            if self._would_start_locked():
                self.active += 1
                self._claims[loop] = self._claims.get(loop, 0) + 1
                return True
        return False

    def would_start(self) -> bool:
        """Whether a job would start at once now (``claim``'s test, nothing taken)."""
        with self._lock:
            return self._would_start_locked()

    def _would_start_locked(self) -> bool:
        """A free slot, nothing waiting in the queue, and the queue not paused."""
        return self.active < self._n and not len(self._queue) and not self._queue.paused

    def unclaim(self, loop: Any) -> None:
        """The claimed job is done: its slot is free for what queued meanwhile."""
        with self._lock:
            left = self._claims[loop] - 1
            if left:
                self._claims[loop] = left
            else:
                del self._claims[loop]
            self._ended_locked()
        if len(self._queue):
            self.kick()

    def _ended_locked(self) -> None:
        self.active -= 1
        if self._joining:
            self._changed.notify_all()

    async def _serve(self) -> None:
        try:
            while self.active <= self._n:  # a pool shrunk by ``resize`` loses its surplus
                job = self._queue.take()
                if job is None:
                    return
                self._loop.call_soon(self._top_up)  # runs once this job's first step has
                try:
                    await self._handle(job)
                except BaseException as exc:  # noqa: BLE001 - a job's error is its caller's
                    job.fail(exc)
                    if not isinstance(exc, Exception):
                        raise
        finally:
            with self._lock:
                self._ended_locked()

    def resize(self, n: int) -> None:
        """Serve up to ``n`` jobs at once (surplus tasks end after their current job)."""
        if n < 1:
            raise ValidationError("must be at least 1", field="max_concurrent_requests")
        self._n = n
        self.kick()

    @property
    def size(self) -> int:
        return self._n

    def join(self, timeout: float, skip_loop: Any = None) -> bool:
        """Wait (from another thread) until no job is served; True if none is. Jobs claimed
        on ``skip_loop`` (the loop of the thread that waits, which could not serve them
        while it waits) are not waited for."""
        end = time.monotonic() + timeout
        with self._lock:
            self._joining += 1
            try:
                while self.active > self._claims.get(skip_loop, 0):
                    left = end - time.monotonic()
                    if left <= 0:
                        return False
                    self._changed.wait(left)
                return True
            finally:
                self._joining -= 1
