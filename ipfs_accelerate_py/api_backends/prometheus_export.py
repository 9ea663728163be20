"""Prometheus export of a client's own metrics (the ``prometheus`` extra: prometheus-client).

The figures are the ones ``get_metrics()`` returns, read at scrape time from the same
bounded structures (nothing is recorded twice, and the hot path does no extra work)::

    from prometheus_client import start_http_server
    from ipfs_accelerate_py.api_backends.prometheus_export import register_prometheus

    register_prometheus(client)     # the default registry; or registry=CollectorRegistry()
    start_http_server(9464, addr="127.0.0.1")

Series carry an ``endpoint`` label (and ``model`` for the per-model ones). Counters are
cumulative until ``get_metrics(reset=True)`` clears them, which Prometheus reads as a counter
reset. Latency quantiles are gauges (``quantile`` label) over the client's latency window;
``_sum``/``_count`` are exact over every request. Names follow OpenTelemetry GenAI where one
exists (``gen_ai_client_operation_duration_seconds``, ``gen_ai_client_token_usage_total``).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

from ._observability.recorder import PERCENTILES

__all__ = ["ClientMetricsCollector", "register_prometheus", "PREFIX"]

PREFIX = "ipfs_accelerate_client"
_CIRCUIT_STATES = ("CLOSED", "OPEN", "HALF-OPEN")


class ClientMetricsCollector:
    """A prometheus-client collector over one client's ``get_metrics()``."""

    def __init__(self, client: Any, prefix: str = PREFIX) -> None:
        self._client = client
        self._prefix = prefix

    def describe(self) -> list:
        """The families a scrape yields, so a registry can refuse duplicate names."""
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            SummaryMetricFamily)

        p = self._prefix
        snap: Dict[str, Any] = self._client.get_metrics()
        scopes = [("endpoint", snap.get("per_endpoint", {})), ("model", snap.get("per_model", {}))]
        for label, by_name in scopes:
            stem = p if label == "endpoint" else f"{p}_model"
            counters = {
                "requests": "Requests that ended (result or error).",
                "successes": "Requests that returned a result.",
                "retries": "Retries actually sent (attempts - 1).",
                "streams": "Streaming requests.",
                "batches": "Shared (batched) calls sent.",
                "batched_requests": "Requests that went out inside a shared call.",
            }
            for key, doc in counters.items():
                fam = CounterMetricFamily(f"{stem}_{key}", doc, labels=[label])
                for name, s in by_name.items():
                    fam.add_metric([name], s.get(key, 0))
                yield fam
            failures = CounterMetricFamily(f"{stem}_failures", "Requests that ended in an error, "
                                           "by error class.", labels=[label, "error_type"])
            tokens = CounterMetricFamily(f"{stem}_gen_ai_client_token_usage",
                                         "Tokens reported by the server's usage.",
                                         labels=[label, "gen_ai_token_type"])
            duration = SummaryMetricFamily(f"{stem}_gen_ai_client_operation_duration_seconds",
                                           "Request latency, queue wait included.",
                                           labels=[label])
            quantiles = GaugeMetricFamily(f"{stem}_operation_duration_quantile_seconds",
                                          "Request latency quantiles over the client's window.",
                                          labels=[label, "quantile"])
            for name, s in by_name.items():
                for error_type, n in s.get("failures_by_type", {}).items():
                    failures.add_metric([name, error_type], n)
                usage = s.get("gen_ai.client.token.usage", {})
                tokens.add_metric([name, "input"], usage.get("input", 0))
                tokens.add_metric([name, "output"], usage.get("output", 0))
                lat = s.get("gen_ai.client.operation.duration", {})
                count = lat.get("count", 0)
                duration.add_metric([name], count_value=count,
                                    sum_value=lat.get("mean", 0.0) * count)
                for pct in PERCENTILES:
                    value: Optional[float] = lat.get(f"p{pct}")
                    if value is not None:
                        quantiles.add_metric([name, str(pct / 100)], value)
            yield from (failures, tokens, duration, quantiles)

        queue = GaugeMetricFamily(f"{p}_queue_length", "Requests waiting in the queue.",
                                  labels=["endpoint"])
        for name, n in snap.get("queue_length", {}).items():
            queue.add_metric([name], n)
        yield queue
        yield GaugeMetricFamily(f"{p}_current_requests", "Requests on the wire now.",
                                value=snap.get("current_requests", 0))
        state = GaugeMetricFamily(f"{p}_circuit_state", "1 for the breaker's current state.",
                                  labels=["endpoint", "state"])
        for name, current in snap.get("circuit_state", {}).items():
            for s in _CIRCUIT_STATES:
                state.add_metric([name, s], 1.0 if s == current else 0.0)
        yield state
        transitions = CounterMetricFamily(f"{p}_circuit_transitions", "Breaker state changes.",
                                          labels=["endpoint", "from_state", "to_state"])
        for key, n in snap.get("circuit_breaker_transitions", {}).items():
            endpoint, _, change = key.rpartition(":")
            old, _, new = change.partition("->")
            transitions.add_metric([endpoint, old, new], n)
        yield transitions


def register_prometheus(client: Any, registry: Any = None,
                        prefix: str = PREFIX) -> ClientMetricsCollector:
    """Expose ``client``'s metrics on ``registry`` (prometheus-client's default one if None).
    A second client on the same registry needs its own ``prefix`` (the registry refuses
    duplicate series). Raises ImportError with the install hint when prometheus-client is missing."""
    try:
        from prometheus_client import REGISTRY
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Prometheus export needs prometheus-client: "
                          "pip install 'ipfs_accelerate_py[prometheus]'") from exc
    collector = ClientMetricsCollector(client, prefix)
    (registry if registry is not None else REGISTRY).register(collector)
    return collector
