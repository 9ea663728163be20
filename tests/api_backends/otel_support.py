"""Test helpers for the OpenTelemetry tests: in-memory SDK providers and a recording relay.

``OtelCapture`` wires an SDK tracer provider (in-memory span exporter) and meter provider
(in-memory reader) into ``tracing.configure``; ``RecordingRelay`` sits in front of a server's
port on loopback and keeps every byte the client sent, so a test can read the
``traceparent`` the server received (the relay forwards a request only after recording it,
so a reply proves the record is complete).
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any, Dict, List, Tuple

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ipfs_accelerate_py.api_backends import tracing
from reliability.netfaults import TcpRelay

__all__ = ["OtelCapture", "RecordingRelay", "parse_traceparent", "span_id", "trace_id"]

_TRACEPARENT = re.compile(rb"\r\ntraceparent: *([0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2})",
                          re.IGNORECASE)


def trace_id(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


def span_id(span: ReadableSpan) -> str:
    return format(span.context.span_id, "016x")


def parse_traceparent(value: str) -> Tuple[str, str]:
    """``(trace id, parent span id)`` of a W3C ``traceparent`` value."""
    version, tid, sid, _flags = value.split("-")
    assert version == "00"
    return tid, sid


class OtelCapture:
    """SDK providers with in-memory exporters, configured for the client while open."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        tracing.configure(self.tracer_provider, self.meter_provider)

    def close(self) -> None:
        tracing.configure(None, None)
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()

    def spans(self) -> List[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, prefix: str) -> List[ReadableSpan]:
        return [s for s in self.spans() if s.name.startswith(prefix)]

    def metrics(self) -> Dict[str, List[Any]]:
        """Metric name -> its data points (and the metric itself under ``name + ':meta'``)."""
        out: Dict[str, List[Any]] = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out[m.name] = list(m.data.data_points)
                    out[m.name + ":meta"] = [m]
        return out

    def dump(self) -> str:
        """Every finished span and the metrics, as the JSON an exporter would write."""
        spans = [json.loads(s.to_json()) for s in self.spans()]
        data = self.reader.get_metrics_data()
        return json.dumps({"spans": spans, "metrics": json.loads(data.to_json()) if data else {}},
                          indent=1)


class RecordingRelay(TcpRelay):
    """The loopback relay of the reliability tests, also keeping what clients sent."""

    def __init__(self, upstream: Tuple[str, int]) -> None:
        super().__init__(upstream)
        self._sent = bytearray()

    def traceparents(self) -> List[str]:
        with self._lock:
            return [m.decode() for m in _TRACEPARENT.findall(bytes(self._sent))]

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:  # type: ignore[override]
        if src.getsockname()[1] == self.port:  # accepted here: the client's side
            src = _Recording(src, self)
        TcpRelay._pipe(src, dst)  # type: ignore[arg-type]


class _Recording:
    """A socket whose received bytes are appended to the relay's record before they are
    forwarded."""

    def __init__(self, sock: socket.socket, relay: RecordingRelay) -> None:
        self._sock = sock
        self._relay = relay

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        with self._relay._lock:
            self._relay._sent += data
        return data

    def __getattr__(self, name: str):
        return getattr(self._sock, name)
