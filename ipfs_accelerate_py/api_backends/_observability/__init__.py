"""Observability's private parts: the metrics recorder and the request log
(``recorder.py``: counters, bounded latency rings, every request's outcome; its public face
``mixins/metrics.py``), and finding the user's OpenTelemetry providers (``otel.py``; the
spans, trace context and GenAI metrics are ``tracing.py``'s). The public modules stay where
users import them: ``tracing.py``, ``prometheus_export.py`` (a prometheus-client collector
over the recorder) and ``server_metrics.py`` (a server's ``/metrics`` and the load probe).
"""
