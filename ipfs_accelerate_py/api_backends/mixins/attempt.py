"""One attempt, as a coroutine: breaker admission, an in-flight slot, the transport, the verdict.

Every complete request and every sync stream runs its attempts here, on the client's event
loop (``_loop.py``), and so do the async face's streams on their caller's loop. Nothing here blocks a loop: the
breaker's and the limit's locks guard state for microseconds; an OPEN circuit is waited out
by the endpoint's circuit (``breaker.Circuit.aadmit``: a future the prober's thread settles);
a slot by the limit's FIFO line; a retry's backoff by a timer that ``close()`` cuts short.
The verdicts on the attempt are the circuit's too (``transport_failed``, ``error_reply``).

The bytes move through the endpoint's transport (``ep.transport``, a
``transport.AsyncTransport``): aiohttp (``_aio_transport``), or a ``transport_factory``
transport the caller gave, called in a thread of the client's executor
(``transport.ThreadedTransport``); this mixin owns that executor.

Tracing: a job's task on the client loop carries its request's span in its context
(``tracing``'s state is context-local); an async stream on its caller's loop passes its
operation (``op``, ``rid``) instead, and its events are recorded under ``working_for``.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Optional, Set, Tuple

from .. import errors, tracing
from .._aio_transport import AioTransport
from .._loop import settle
from ..errors import CircuitOpenError, ClientClosedError, ConfigurationError
from ..transport import HttpRequest, HttpResponse
from ._host import HostBase


__all__ = ["AttemptMixin"]

#: Threads for transports called from the loop (made on demand, up to this many).
_THREADED_MAX = 256
_init_lock = threading.Lock()


class AttemptMixin(HostBase):
    """``_asend`` / ``_aguarded``: one attempt; ``_asleep``: a wait that ``close`` ends."""

    def _init_attempts(self) -> None:
        self._sleepers: Set[Tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]] = set()
        self._sleepers_lock = threading.Lock()
        self._threaded: Optional[ThreadPoolExecutor] = None

    # ------------------------------------------------------------------ transports
    def _executor(self) -> ThreadPoolExecutor:
        """The threads a caller's sync transport runs in (made on first use)."""
        executor = self._threaded
        if executor is None:
            with _init_lock:
                if self._threaded is None:
                    self._threaded = ThreadPoolExecutor(
                        _THREADED_MAX, thread_name_prefix=f"{self._adapter.name}-transport")
                executor = self._threaded
        return executor

    def _aio_transport(self, ep: Any) -> "AioTransport":
        """The endpoint's aiohttp transport (one per endpoint; a session per event loop
        inside it); ``ConfigurationError`` when a ``transport_factory`` replaced it."""
        transport = ep.transport
        if not isinstance(transport, AioTransport):
            raise ConfigurationError(f"endpoint {ep.id!r} sends through {transport!r}, "
                                     "not aiohttp", field="transport_factory")
        return transport

    def _close_transports(self, idle: bool) -> None:
        """``close()``, once the endpoints' transports are closed: the executor, whose
        threads are waited for when ``idle`` (no request is under way: they end at once);
        else they end with the calls they are in (each within its read timeout)."""
        if self._threaded is not None:
            self._threaded.shutdown(wait=idle)

    # ------------------------------------------------------------------ one attempt
    async def _asend(self, ep: Any, http: HttpRequest, deadline: float,
                     fail_fast: bool = False) -> HttpResponse:
        """One attempt of a complete request (see ``_aguarded``)."""
        now = self._clock.monotonic()  # one reading on the way down
        self._ask_for_load(ep, http, now)
        sender = ep.transport
        response: HttpResponse = await self._aguarded(
            ep, deadline, ep.settings.timeout, True, lambda timeout: sender.send(http, timeout),
            fail_fast, now)
        return response

    async def _aguarded(self, ep: Any, deadline: float, read_timeout: float, clip_read: bool,
                        io: Callable[[Tuple[float, float]], Awaitable[Any]],
                        fail_fast: bool = False, now: Optional[float] = None,
                        op: Any = None, rid: str = "") -> Any:
        """One attempt under the breaker: admission (waiting out an OPEN circuit unless
        ``fail_fast``), an in-flight slot (its own key: the coroutines of a loop share one
        thread), the deadline, the transport call (``read_timeout`` clipped to the deadline
        when ``clip_read``: a stream's idle timeout is not), and the breaker's verdict (5xx
        and transport faults count against the server; any other answer proves it alive).
        A non-2xx reply is read (capped) and raised as its typed error.

        The clock is read once on the way down (``now``: breaker, slot and deadline share
        it, advanced only by what they waited) and once as the reply comes (slot, load
        report and breaker share that)."""
        clock = self._clock
        if now is None:
            now = clock.monotonic()
        circuit = ep.circuit
        breaker = circuit.breaker
        try:  # a closed circuit admits at once: no wait to await
            probe = ep.settings.circuit_breaker_enabled and breaker.admit(now)
        except CircuitOpenError:
            probe, now = await circuit.aadmit(deadline, fail_fast, now, op, rid)
        key = object()
        try:
            waited = await ep.limit.aacquire(deadline, key, self._closing, now=now)
        except BaseException:
            breaker.release(probe)
            raise
        if waited:
            tracing.waited_for(op, rid, "in_flight_limit.wait", waited)
        released = False
        try:
            remaining = deadline - (now + waited)
            if remaining <= 0:
                breaker.release(probe)
                raise errors.TimeoutError("the call deadline passed before the request was sent",
                                          sent=False)
            timeout = (min(ep.settings.connect_timeout, remaining),
                       min(read_timeout, remaining) if clip_read else read_timeout)
            try:
                response = await io(timeout)
            except BaseException as exc:
                circuit.transport_failed(probe, exc)
                raise
            healthy = response.status < 500
            now = clock.monotonic()  # the one reading as the reply came
            # the server's load report (kept for routing) is the one the slot's verdict reads
            report = self._observe_reply(ep, response.headers, now)
            released = True
            ep.limit.release(healthy, key, now=now, report=report)
        finally:
            if not released:
                ep.limit.release(False, key, now=clock.monotonic())
        if response.status >= 400:
            if not isinstance(response, HttpResponse):  # an error reply to a stream
                response = HttpResponse(response.status, response.headers,
                                        await response.read_body())
            raise circuit.error_reply(self._adapter.parse_error(response), probe)
        breaker.record_success(probe, now)
        return response

    # ------------------------------------------------------------------ waiting
    async def _asleep(self, seconds: float, doing: str) -> None:
        """Sleep ``seconds`` (a test's virtual clock just moves); a client closed meanwhile
        ends it at once with ``ClientClosedError``."""
        if self._clock.virtual:
            if not self._clock.sleep(seconds, self._closing):
                raise ClientClosedError(f"client closed while {doing}")
            await asyncio.sleep(0)
            return
        if self._closing.is_set():
            raise ClientClosedError(f"client closed while {doing}")
        if seconds > 0:
            loop = asyncio.get_running_loop()
            woken = loop.create_future()
            entry = (loop, woken)
            with self._sleepers_lock:
                self._sleepers.add(entry)
            timer = loop.call_later(seconds, settle, woken)
            try:
                await woken
            finally:
                timer.cancel()
                with self._sleepers_lock:
                    self._sleepers.discard(entry)
        if self._closing.is_set():
            raise ClientClosedError(f"client closed while {doing}")

    def _wake_sleepers(self) -> None:
        """``close()``: every ``_asleep`` ends now (it then sees the client closed)."""
        with self._sleepers_lock:
            sleepers = list(self._sleepers)
        for loop, woken in sleepers:
            try:
                loop.call_soon_threadsafe(settle, woken)
            except RuntimeError:  # its loop is closed: nobody waits any more
                pass

