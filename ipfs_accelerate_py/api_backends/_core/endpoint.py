"""``Endpoint``: one server as the client sees it, and the parts that serve it.

An endpoint owns its settings and transports, its queue and the dispatcher that serves it
(``queue.py``, ``dispatcher.py``), its in-flight limit (``inflight.py``) and its circuit:
the breaker with its prober (``breaker.py``). It builds those parts in its constructor from
what they need (a clock, the client's loop and ``closing`` event, the metrics recorder, the
board of circuit waiters, the adapter's health request, the job handler), none of it the
client, so a reader sees each part's dependencies where it is made.
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING, Awaitable, Callable, Optional, Tuple

from .loop import ClientLoop
from .breaker import Circuit, CircuitWaiters
from ..clock import Clock
from .inflight import InFlightLimit
from .dispatcher import Dispatcher
from .queue import Job, PriorityRequestQueue
from ..settings import ClientSettings
from ..transport import AsyncTransport, HttpRequest, HttpResponse

if TYPE_CHECKING:
    from .._observability.recorder import MetricsRecorder

__all__ = ["Endpoint", "JobHandler"]

#: What the dispatcher calls for each job it takes off the queue.
JobHandler = Callable[["Endpoint", Job], Awaitable[None]]


class Endpoint:
    """One server as this client sees it: its own settings, transports, queue, dispatcher,
    in-flight limit and circuit (see the module docstring).

    ``handle_job``: what the dispatcher runs for each job (the client's batching and
    retrying call); ``health``: the adapter's health request, which the circuit's prober
    sends through ``probe_transport`` (``None``: the adapter has none); ``name``: a label for
    the endpoint's threads."""

    def __init__(self, endpoint_id: str, settings: ClientSettings, transport: AsyncTransport,
                 loop: ClientLoop, clock: Clock, closing: threading.Event,
                 metrics: "MetricsRecorder", waiters: CircuitWaiters, handle_job: JobHandler,
                 health: Optional[HttpRequest] = None,
                 probe_transport: Optional[AsyncTransport] = None, name: str = "") -> None:
        self.id = endpoint_id
        self.settings = settings
        #: the one seam every request to this server goes through (aiohttp, or the caller's
        #: ``transport_factory`` transport adapted): on the client's loop, or an async
        #: stream's caller's
        self.transport = transport
        #: what ``fetch`` (health checks, the load probe) sends through: the same kind of
        #: transport with connections of its own (default: ``transport`` itself). Kept
        #: apart, a probe neither takes a pooled connection from the requests nor leaves one
        #: for them: a server just back gets the held requests on fresh connections (with
        #: the probe's connection pooled they came 1-2 s late after a real vLLM server's
        #: restart, tests/reliability/test_crash_restart.py), and probes reuse their own
        #: connection instead of opening one each (tests/api_backends/test_soak.py)
        self.probe_transport = probe_transport or transport
        self._loop = loop
        self.queue = PriorityRequestQueue(settings.queue_size, settings.aging_interval, clock)
        self.limit = InFlightLimit(settings.max_concurrent_requests)
        #: the breaker with its prober, its waits and verdicts (breaker.py)
        self.circuit = Circuit(endpoint_id, settings, clock, closing, self.queue, self.limit,
                               metrics, waiters, self.fetch, health, thread_name=name)
        #: the circuit's state machine (read on every attempt: a plain attribute)
        self.breaker = self.circuit.breaker
        self.workers = Dispatcher(self.queue, settings.max_concurrent_requests,
                                  functools.partial(handle_job, self), loop)
        self.priority_supported = True  # cleared when the server refuses a priority field
        self.chat_batch_supported = True  # cleared when the server has no chat batch route
        #: cleared when a shared call's reply did not match it (batching.note_list_mismatch)
        self.list_sharing_ok = True
        self.burst_until = 0.0  # monotonic time until which a lone request may linger
        self._lock = threading.Lock()
        self._open_streams = 0

    def reconfigure(self, settings: ClientSettings) -> None:
        """New settings for this endpoint (``_set_on_all_endpoints``, a profile), and for
        the parts that read them as they go."""
        self.settings = settings
        self.circuit.settings = settings

    def fail_fast(self, asked: Optional[bool]) -> bool:
        """Whether a call fails at once on an OPEN circuit: what its caller ``asked``, else
        the ``fail_fast`` setting."""
        return self.settings.fail_fast if asked is None else bool(asked)

    def fetch(self, request: HttpRequest, timeout: Tuple[float, float]) -> HttpResponse:
        """One request straight through the transport, no queue, breaker or retry (health
        checks, the load probe), for a thread that may block: it runs on the client's loop
        and is waited for here, at most both timeouts and a second (then cancelled). Raises
        what the transport raised; ``RuntimeError`` on the loop itself or once it stopped."""
        return self._loop.run(self.probe_transport.send(request, timeout),
                              timeout[0] + timeout[1] + 1.0)

    def close_transports(self) -> None:
        """Close the transport (and the probes' own, if any), from any thread."""
        self.transport.close()
        if self.probe_transport is not self.transport:
            self.probe_transport.close()

    async def aclose_transports(self) -> None:
        """What the running loop holds of the transports, closed and awaited."""
        await self.transport.aclose()
        if self.probe_transport is not self.transport:
            await self.probe_transport.aclose()

    @property
    def shares_prompt_lists(self) -> bool:
        """Whether calls to this endpoint may be shared (prompt lists, chat batches, shared
        streams): the ``batch_prompt_lists`` setting, or, unset, until a reply mismatched."""
        forced = self.settings.batch_prompt_lists
        return self.list_sharing_ok if forced is None else forced

    @property
    def in_flight(self) -> int:
        """Requests on the wire now: attempts holding an in-flight slot (a complete request's
        whole call, a stream's opening), and streams open after that."""
        return self.limit.in_flight + self._open_streams

    def stream_opened(self) -> None:
        with self._lock:
            self._open_streams += 1

    def stream_closed(self) -> None:
        with self._lock:
            self._open_streams -= 1

    def __repr__(self) -> str:
        return f"<Endpoint {self.id} {self.settings.base_url}>"
