"""Prometheus export: the scrape shows the same figures as ``get_metrics()``, and no key."""

from __future__ import annotations

from typing import Dict, Tuple

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.prometheus_export import PREFIX, register_prometheus
from ipfs_accelerate_py.servers.fake_vllm import Fault

KEY = "sk-prometheus-secret-0123456789"


def scrape(registry: CollectorRegistry) -> Tuple[str, Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]]:
    """The exposition text, and every sample as {(name, sorted labels): value}."""
    text = generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def test_a_scrape_shows_what_get_metrics_shows(fake_server, make_client):  # noqa: F811
    client = make_client(fake_server, api_key=KEY, failure_threshold=100)
    for i in range(5):
        client.run_inference("tiny-llama", f"prompt {i}", {"max_tokens": 3})
    fake_server.add_fault(Fault("status", status=400, count=1))
    with pytest.raises(errors.BadRequestError):
        client.run_inference("tiny-llama", "refused", {"max_tokens": 3})
    registry = CollectorRegistry()
    register_prometheus(client, registry)
    text, samples = scrape(registry)
    m = client.get_metrics()
    ep = (("endpoint", "default"),)

    assert samples[(f"{PREFIX}_requests_total", ep)] == m["requests"] == 6
    assert samples[(f"{PREFIX}_successes_total", ep)] == m["successes"] == 5
    assert samples[(f"{PREFIX}_failures_total",
                    (("endpoint", "default"), ("error_type", "BadRequestError")))] == 1
    usage = m["gen_ai.client.token.usage"]
    assert samples[(f"{PREFIX}_gen_ai_client_token_usage_total",
                    (("endpoint", "default"), ("gen_ai_token_type", "output")))] == usage["output"] == 15
    assert samples[(f"{PREFIX}_gen_ai_client_token_usage_total",
                    (("endpoint", "default"), ("gen_ai_token_type", "input")))] == usage["input"] > 0
    lat = m["gen_ai.client.operation.duration"]
    assert samples[(f"{PREFIX}_gen_ai_client_operation_duration_seconds_count", ep)] == 6
    assert samples[(f"{PREFIX}_gen_ai_client_operation_duration_seconds_sum", ep)] == pytest.approx(
        lat["mean"] * 6)
    assert samples[(f"{PREFIX}_operation_duration_quantile_seconds",
                    (("endpoint", "default"), ("quantile", "0.5")))] == pytest.approx(lat["p50"])
    assert samples[(f"{PREFIX}_model_requests_total", (("model", "tiny-llama"),))] == 6
    assert samples[(f"{PREFIX}_circuit_state", (("endpoint", "default"), ("state", "CLOSED")))] == 1
    assert samples[(f"{PREFIX}_circuit_state", (("endpoint", "default"), ("state", "OPEN")))] == 0
    assert samples[(f"{PREFIX}_queue_length", ep)] == 0
    assert KEY not in text


def test_breaker_transitions_and_state_follow_the_breaker(fake_server, make_client):  # noqa: F811
    client = make_client(fake_server, failure_threshold=2, minimum_calls=2, max_retries=0,
                         reset_timeout=60)
    fake_server.add_fault(Fault("status", status=500, count=-1))
    for _ in range(2):
        with pytest.raises(errors.ServerError):
            client.run_inference("tiny-llama", "x", {"max_tokens": 2})
    registry = CollectorRegistry()
    register_prometheus(client, registry)
    _, samples = scrape(registry)
    assert samples[(f"{PREFIX}_circuit_state", (("endpoint", "default"), ("state", "OPEN")))] == 1
    assert samples[(f"{PREFIX}_circuit_transitions_total",
                    (("endpoint", "default"), ("from_state", "CLOSED"), ("to_state", "OPEN")))] == 1
    assert samples[(f"{PREFIX}_failures_total",
                    (("endpoint", "default"), ("error_type", "ServerError")))] == 2


def test_a_second_client_on_one_registry_needs_its_own_prefix(fake_server, make_client):  # noqa: F811
    registry = CollectorRegistry()
    register_prometheus(make_client(fake_server), registry)
    with pytest.raises(ValueError):
        register_prometheus(make_client(fake_server), registry)
    register_prometheus(make_client(fake_server), registry, prefix="second_client")
    _, samples = scrape(registry)
    assert samples[("second_client_queue_length", (("endpoint", "default"),))] == 0
