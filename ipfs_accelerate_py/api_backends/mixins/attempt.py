"""The attempt's face on the client: the ``Attempt`` part it makes, and what attempts share.

The attempt itself (breaker admission, an in-flight slot, the transport call, the verdict)
is ``_core/attempt.Attempt``, made here from what it needs (the clock, the ``closing``
event, the adapter, routing's load board). This mixin keeps what every attempt and retry of
the client shares: the executor a caller's sync transport runs in (``ThreadedTransport``;
made on first use), and ``_asleep``, a wait (a retry's backoff) that ``close()`` cuts short.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Optional, Set, Tuple

from .._transports.aio import AioTransport
from .._core.attempt import Attempt
from .._core.loop import settle
from ..errors import ClientClosedError, ConfigurationError
from ._host import HostBase

if TYPE_CHECKING:
    from .._core.endpoint import Endpoint


__all__ = ["AttemptMixin"]

#: Threads for transports called from the loop (made on demand, up to this many).
_THREADED_MAX = 256
_init_lock = threading.Lock()


class AttemptMixin(HostBase):
    """``_attempts``: one attempt (the part); ``_asleep``: a wait that ``close`` ends."""

    #: one attempt of a request, for every endpoint (``Attempt.send`` / ``Attempt.guarded``)
    _attempts: Attempt

    def _init_attempts(self) -> None:
        self._attempts = Attempt(self._clock, self._closing, self._adapter,
                                self._router.state.board)
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

    def _aio_transport(self, ep: "Endpoint") -> "AioTransport":
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

