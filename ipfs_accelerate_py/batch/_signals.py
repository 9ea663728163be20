"""SIGINT / SIGTERM: stop reading, let the requests in flight finish, leave a resumable file.

The first signal sets ``stopped`` (the runner reads no further line and gives the requests
in flight ``grace`` seconds); a second one ends the grace at once. Nothing is written from
the handler itself: the runner commits the lines it has, so the file stays whole.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any, Callable, Dict, Optional

__all__ = ["StopSignal"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal:
    """Set by SIGINT / SIGTERM once installed on a loop (``install``; ``restore`` undoes)."""

    def __init__(self, notify: Optional[Callable[[str], None]] = None) -> None:
        self._notify = notify  # told the signal's name once it is taken (the CLI says so)
        self.stopped = asyncio.Event()
        self.hurry = asyncio.Event()  # a second signal: no more grace
        self.by: Optional[str] = None
        self._old: Dict[int, Any] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for sig in _SIGNALS:
            try:
                self._old[sig] = signal.getsignal(sig)
                loop.add_signal_handler(sig, self.trigger, sig.name)
            except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
                self._old.pop(sig, None)

    def trigger(self, name: str = "stop") -> None:
        if self.stopped.is_set():
            self.hurry.set()
            return
        self.by = name
        self.stopped.set()
        if self._notify is not None:
            self._notify(name)

    def restore(self) -> None:
        if self._loop is None:
            return
        for sig, old in self._old.items():
            self._loop.remove_signal_handler(sig)
            signal.signal(sig, old)
        self._old.clear()
