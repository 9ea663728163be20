"""The queue's public face: ``queue_enabled``, ``request_queue``, ``current_requests``.

A thin facade: each endpoint owns its queue (``_core/queue.py``) and the dispatcher that
serves it (``_core/dispatcher.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._core.queue import Job, PriorityRequestQueue
from ._host import HostBase

if TYPE_CHECKING:
    from .._core.endpoint import Endpoint

__all__ = ["QueueMixin"]


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
        return self._endpoint(None).queue

    @property
    def current_requests(self) -> int:
        """Requests being sent right now, over every endpoint."""
        return sum(ep.in_flight for ep in self._endpoints.values())

    def _enqueue(self, endpoint: "Endpoint", job: Job) -> None:
        endpoint.queue.put(job)  # its dispatcher is kicked (``on_ready``)

