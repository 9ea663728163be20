"""Metrics' public face: ``get_metrics(reset=False)`` and ``recent_requests``.

A thin facade over two parts in ``_observability/recorder.py``: the recorder
(``MetricsRecorder``: counters and bounded latency rings, percentiles on read), which the
endpoints' parts, the batcher and the retry loop are handed, and the request log
(``RequestLog``: every request's outcome, resolved and recorded once, and the last
requests' records), whose ``finish`` the batcher is handed. ``get_metrics`` adds what the
endpoints hold (circuit states, queue lengths, in-flight limits) to the recorder's snapshot.
"""

from __future__ import annotations

from typing import Any, Deque, Dict

from .._observability.recorder import MetricsRecorder, RequestLog
from ._host import HostBase

__all__ = ["MetricsMixin", "MetricsRecorder"]


class MetricsMixin(HostBase):
    """README surface: ``get_metrics(reset=False)``, ``recent_requests``; a facade over the
    recorder (``_metrics``) and the request log (``_requests``: every request's outcome; one
    never sent is counted by ``MetricsRecorder.record_unsent``)."""

    _metrics: MetricsRecorder
    _requests: RequestLog

    def _init_metrics(self, latency_window: int, recent_requests_size: int) -> None:
        self._metrics = MetricsRecorder(latency_window)
        self._requests = RequestLog(self._metrics, self._clock, recent_requests_size)

    @property
    def recent_requests(self) -> Deque[Dict[str, Any]]:
        """The last requests' outcomes (id, endpoint, model, latency, error), newest last."""
        return self._requests.recent

    def get_metrics(self, reset: bool = False) -> Dict[str, Any]:
        """Counts, latency percentiles, tokens, batches and breaker state; ``reset`` clears."""
        snap = self._metrics.snapshot(reset=reset)
        snap["circuit_state"] = self.circuit_states()
        snap["queue_length"] = {eid: len(ep.queue) for eid, ep in self._endpoints.items()}
        snap["current_requests"] = self.current_requests
        snap["in_flight_limit"] = {eid: ep.limit.limit for eid, ep in self._endpoints.items()}
        snap["in_flight"] = {eid: ep.limit.stats() for eid, ep in self._endpoints.items()}
        return snap
