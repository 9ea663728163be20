"""The client's event loop: one daemon thread per client, where the request pipeline runs.

Why a loop of its own: the pipeline of a complete request (the queue's dispatch, batching,
breaker admission, the in-flight gate, retries, the transport) is written once, as
coroutines. The sync face (``submit``, ``run_inference``, handlers) puts a job in the queue
from the caller's thread and waits on the job's ``concurrent.futures.Future``; the async face
(``asubmit``, ``arun_inference``) awaits the same future from the caller's own loop through
``await_future``. Either way the work runs here, so no thread waits per request, and
a caller's loop is never blocked by the client's I/O.

The loop starts on first use (a client that only streams from threads never starts it) and
stops at ``close()``. ``Signal`` is how a coroutine here waits for a change another thread
makes (a job handed to a batch, a slot freed): set from anywhere, awaited here.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import Any, Callable, Coroutine, List, Optional, Set, Tuple, TypeVar

__all__ = ["ClientLoop", "CallerLoop", "Signal", "MAX_NAP", "settle", "call_soon_from_afar",
           "await_future"]

#: Longest single wait of any waiter (a slot, a circuit, a stream's next read): a bound
#: against a lost wake-up, and how soon a closing client is noticed; not a poll interval.
MAX_NAP = 1.0

T = TypeVar("T")


def settle(future: "asyncio.Future[None]") -> None:
    """Wake whoever awaits ``future`` (a no-op once it is done): run on its loop."""
    if not future.done():
        future.set_result(None)


class _Pending:
    """Calls from other threads waiting to run on one loop, and whether a wake-up of that
    loop is already on its way (see ``call_soon_from_afar``)."""

    __slots__ = ("lock", "calls", "scheduled", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: List[Tuple[Callable[..., Any], Tuple[Any, ...]]] = []
        self.scheduled = False

    def drain(self) -> None:
        """(On the loop) run every call that came since the last wake-up, in order."""
        with self.lock:
            calls, self.calls = self.calls, []
            self.scheduled = False
        for fn, args in calls:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - one call's error is not the others'
                asyncio.get_running_loop().call_exception_handler(
                    {"message": f"error in {fn!r} called from another thread", "exception": exc})


_PENDING: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pending]" = weakref.WeakKeyDictionary()
_PENDING_LOCK = threading.Lock()


def call_soon_from_afar(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """``loop.call_soon_threadsafe(fn, *args)``, with one wake-up per burst: calls made while
    a wake-up of ``loop`` is on its way ride along with it (False: the loop is closed).

    Why: each ``call_soon_threadsafe`` writes to the loop's wake-up socket, and on these
    machines that write, which wakes the other thread, measured 100 us of the writer's time
    in a streaming run (a fifth of the client loop's CPU). A batch's eight results, or a
    network read that feeds many streams, cost one write instead of one each."""
    if asyncio._get_running_loop() is loop:  # its own thread: no wake-up to send
        loop.call_soon(fn, *args)
        return True
    pending = _PENDING.get(loop)
    if pending is None:
        with _PENDING_LOCK:
            pending = _PENDING.setdefault(loop, _Pending())
    with pending.lock:
        pending.calls.append((fn, args))
        if pending.scheduled:
            return True
        pending.scheduled = True
    try:
        loop.call_soon_threadsafe(pending.drain)
    except RuntimeError:  # closed: nobody is left there to run them
        with pending.lock:
            pending.calls.clear()
            pending.scheduled = False
        return False
    return True


def _copy_outcome(source: "Future[T]", destination: "asyncio.Future[T]") -> None:
    if destination.cancelled():
        return
    if source.cancelled():
        destination.cancel()
        return
    exc = source.exception()
    if exc is not None:
        destination.set_exception(exc)
    else:
        destination.set_result(source.result())


def await_future(future: "Future[T]",
                 loop: Optional[asyncio.AbstractEventLoop] = None) -> "asyncio.Future[T]":
    """``asyncio.wrap_future`` for a future resolved on another thread, its outcome brought
    to the running loop (``loop``, when the caller has it at hand) by
    ``call_soon_from_afar``; cancelling the awaitable cancels ``future`` (the pipeline then
    drops its job), as ``wrap_future`` does."""
    if loop is None:
        loop = asyncio.get_running_loop()
    destination: "asyncio.Future[T]" = loop.create_future()

    def resolved(source: "Future[T]") -> None:
        call_soon_from_afar(loop, _copy_outcome, source, destination)

    def left(awaited: "asyncio.Future[T]") -> None:
        if awaited.cancelled():
            future.cancel()

    destination.add_done_callback(left)
    future.add_done_callback(resolved)
    return destination


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (its scheduling costs a fraction of asyncio's,
    and this loop is the client's own: no user code runs on it), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ClientLoop:
    """An asyncio loop in a daemon thread, made on first use, stopped by ``stop``."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._thread_id: Optional[int] = None
        self._tasks: Set["asyncio.Task[Any]"] = set()  # strong references until they end
        self._stopped = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (started now if it was not)."""
        loop = self._loop
        if loop is not None:
            return loop
        with self._lock:
            if self._loop is None:
                if self._stopped:
                    raise RuntimeError("the client's event loop was stopped")
                ready = threading.Event()
                loop = _new_loop()
                self._thread = threading.Thread(target=self._run, args=(loop, ready),
                                                name=f"{self._name}-loop", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    @property
    def started(self) -> bool:
        return self._loop is not None

    def _run(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        self._thread_id = threading.get_ident()
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def in_loop(self) -> bool:
        """Whether the caller runs on this loop's thread (blocking there would deadlock)."""
        return self._thread_id is not None and threading.get_ident() == self._thread_id

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon, from any thread."""
        loop = self.loop
        if self.in_loop():
            loop.call_soon(fn, *args)
        else:  # (stopped meanwhile: nobody is left to wake)
            call_soon_from_afar(loop, fn, *args)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start ``coro`` as a task on the loop (from any thread); it must settle its own
        outcome (a job's future): nothing waits for the task."""
        if self.in_loop():
            self._start(coro)
        else:
            self.call_soon(self._start, coro)

    def _start(self, coro: Coroutine[Any, Any, Any]) -> "asyncio.Task[Any]":
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start(self, coro: Coroutine[Any, Any, T]) -> "asyncio.Task[T]":
        """``spawn`` from the loop itself, returning the task (a stream's reader, which its
        consumer cancels); ``stop`` cancels it with the rest."""
        if not self.in_loop():
            coro.close()
            raise RuntimeError("ClientLoop.start is for coroutines on the loop")
        return self._start(coro)

    def run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from another thread only); past
        ``timeout`` it is cancelled and ``concurrent.futures.TimeoutError`` raised."""
        if self.in_loop():
            coro.close()
            raise RuntimeError("a blocking call on the client's own event loop; "
                               "use the async face (asubmit, arun_inference) there")
        future: "Future[T]" = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()  # the coroutine must not go on once nobody waits for it
            raise

    def stop(self, timeout: float) -> None:
        """Cancel what still runs, stop the loop and wait for its thread (idempotent)."""
        with self._lock:
            self._stopped = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        if self.in_loop():  # close() from a callback of the loop itself: it ends after this
            loop.call_soon(loop.stop)
            return
        try:
            asyncio.run_coroutine_threadsafe(self._cancel_all(), loop).result(timeout)
        except Exception:  # noqa: BLE001 - a task that would not end: stop anyway
            pass
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:
            pass
        thread.join(timeout)

    async def _cancel_all(self) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)


class CallerLoop:
    """A caller's own event loop with ``ClientLoop.call_soon``'s face (from its thread a
    plain ``call_soon``, from any other ``call_soon_from_afar``): what a ``Signal`` needs
    to wake a coroutine that waits there (a shared call gathered on its caller's loop)."""

    __slots__ = ("loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        call_soon_from_afar(self.loop, fn, *args)


class Signal:
    """A wake-up for one coroutine on a ``ClientLoop``: ``set()`` from any thread,
    ``await wait(timeout)`` on the loop. A ``set`` between the waiter's last look at what
    it waits for and its ``wait`` is not lost: the wake runs on the loop, after the waiter
    has begun to wait (or before its look, which then sees the change)."""

    __slots__ = ("_loop", "_future")

    def __init__(self, loop: "ClientLoop | CallerLoop") -> None:
        self._loop = loop
        self._future: "Optional[asyncio.Future[None]]" = None

    def set(self) -> None:
        self._loop.call_soon(self._settle)

    def _settle(self) -> None:
        fut = self._future
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until ``set`` or ``timeout`` seconds, whichever comes first."""
        loop = asyncio.get_running_loop()
        fut = self._future = loop.create_future()
        timer = loop.call_later(max(0.0, timeout), self._settle)
        try:
            await fut
        finally:
            timer.cancel()
            self._future = None
