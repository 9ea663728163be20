"""The attempt: one try of a request, as a coroutine, under its endpoint's breaker and limit.

Every complete request and every sync stream runs its attempts here, on the client's event
loop, and so do the async face's streams on their caller's loop. In order: the endpoint's
circuit admits it (an OPEN one is waited out: ``breaker.Circuit.aadmit``, a future the
prober's thread settles), its in-flight limit gives it a slot (the limit's FIFO line), the
transport call runs within the call's deadline, and the circuit gives its verdict
(``transport_failed``, ``error_reply``; a reply below 500 proves the server alive). Nothing
here blocks a loop: the breaker's and the limit's locks guard state for microseconds.

The bytes move through the endpoint's transport (``ep.transport``, a
``transport.AsyncTransport``): aiohttp, or the caller's ``transport_factory`` transport run
in the client's executor. The server's load reports ride along: a request asks for one
when the endpoint's last is getting old, and a reply's is kept on the load board (routing
reads it) and handed to the in-flight limit.

Tracing: a job's task on the client loop carries its request's span in its context
(``tracing``'s state is context-local); an async stream on its caller's loop passes its
operation (``op``, ``rid``) instead, and its events are recorded under ``working_for``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional, Tuple

from .. import errors, tracing
from ..clock import Clock
from ..errors import CircuitOpenError
from ..transport import HttpRequest, HttpResponse

if TYPE_CHECKING:
    from ..adapter import BackendAdapter
    from .endpoint import Endpoint
    from ..endpoint_load import LoadBoard

__all__ = ["Attempt"]


class Attempt:
    """One attempt of a request to an endpoint (``send``: a complete request; ``guarded``:
    any transport call, a stream's opening too). One per client, the same for every
    endpoint: what is an endpoint's (its circuit, limit, transport, settings) comes with it.

    ``adapter``: parses an error reply and names the load-report request headers (the
    client hands in another when it learns which API its server speaks: ``adapter`` is
    then set anew); ``board``: where the servers' load reports are kept (routing's);
    ``closing``: set when the client closes, it ends the wait for a slot."""

    def __init__(self, clock: Clock, closing: threading.Event, adapter: "BackendAdapter",
                 board: "LoadBoard") -> None:
        self._clock = clock
        self._closing = closing
        self.adapter = adapter
        self._board = board

    async def send(self, ep: "Endpoint", http: HttpRequest, deadline: float,
                   fail_fast: bool = False) -> HttpResponse:
        """One attempt of a complete request (see ``guarded``), asking for the server's load
        report when something would read it (routing over several endpoints, or this
        endpoint's in-flight limit: ``InFlightLimit.reads_load``) and the endpoint's last
        one is getting old (``LoadBoard.should_ask``: asking costs the server time on every
        request that asks, and one fresh figure a quarter second is plenty)."""
        now = self._clock.monotonic()  # one reading on the way down
        extra = self.adapter.load_report_headers
        board = self._board
        if (extra and http.method == "POST" and not http.stream
                and (board.read or ep.limit.reads_load)
                and board.should_ask(ep.id, now)):
            http.headers.update(extra)
        sender = ep.transport
        response: HttpResponse = await self.guarded(
            ep, deadline, ep.settings.timeout, True, lambda timeout: sender.send(http, timeout),
            fail_fast, now)
        return response

    async def guarded(self, ep: "Endpoint", deadline: float, read_timeout: float,
                      clip_read: bool, io: Callable[[Tuple[float, float]], Awaitable[Any]],
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
            try:
                report = self._board.record_header(ep.id, response.headers, now)
            except Exception:  # noqa: BLE001 - a load report must never fail the request
                report = None
            released = True
            ep.limit.release(healthy, key, now=now, report=report)
        finally:
            if not released:
                ep.limit.release(False, key, now=clock.monotonic())
        if response.status >= 400:
            if not isinstance(response, HttpResponse):  # an error reply to a stream
                response = HttpResponse(response.status, response.headers,
                                        await response.read_body())
            raise circuit.error_reply(self.adapter.parse_error(response), probe)
        breaker.record_success(probe, now)
        return response
