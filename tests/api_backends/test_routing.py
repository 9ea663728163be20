"""``route_inference``: strategies, breaker skips, failover, and 300 requests over real servers.

The unit tests route over the project's vLLM test double (real HTTP on loopback, with
scripted latency and faults) and over ports where nothing listens. The real-server test
routes 300 requests over two real vLLM servers, one of them key-protected, plus a dead URL.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import pytest

from ipfs_accelerate_py.api_backends import FakeClock, VllmClient, errors
from ipfs_accelerate_py.api_backends.base import build_request
from ipfs_accelerate_py.api_backends.vllm import VLLM_LOAD_METRIC, vllm_load_probe
from ipfs_accelerate_py.servers.fake_vllm import Fault
from support import wait_until
from api_support import client_over
from ipfs_accelerate_py.servers import free_port as find_free_port
from support import REAL_SERVER_API_KEY

FAST = {"max_tokens": 4, "temperature": 0}


def dead_url() -> str:
    return f"http://127.0.0.1:{find_free_port()}"  # nothing listens there: connection refused


# ---------------------------------------------------------------------------- ordering
def test_round_robin_rotates():
    with client_over({"a": dead_url(), "b": dead_url(), "c": dead_url()}) as c:
        orders = [c.routing_order("round-robin", ["a", "b", "c"]) for _ in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_strategy_and_endpoint_ids_are_checked_before_sending(counting_listener):
    with client_over({"a": counting_listener.base_url}) as c:
        with pytest.raises(errors.ValidationError) as info:
            c.route_inference("tiny-llama", "hi", strategy="random")
        assert info.value.field == "strategy"
        with pytest.raises(errors.ConfigurationError, match="nope"):
            c.route_inference("tiny-llama", "hi", endpoint_ids=["a", "nope"])
        with pytest.raises(errors.ValidationError, match="endpoint_ids"):
            c.route_inference("tiny-llama", "hi", endpoint_ids=[])
        with pytest.raises(errors.ValidationError, match="temperature"):
            c.route_inference("tiny-llama", "hi", {"temperature": -1}, endpoint_ids=["a"])
    assert counting_listener.connections == 0


def test_load_probe_is_asked_at_most_once_per_interval_per_endpoint():
    clock = FakeClock()
    calls: Counter = Counter()
    figures = {"a": 5.0, "b": 0.0, "c": 2.0}

    def probe(endpoint: Any) -> Optional[float]:
        calls[endpoint.id] += 1
        if endpoint.id == "c" and calls["c"] > 1:
            raise RuntimeError("a broken probe must not break routing")
        return figures[endpoint.id]

    with client_over({"a": dead_url(), "b": dead_url(), "c": dead_url()}, clock=clock) as c:
        c.set_load_probe(probe, min_interval=1.0)
        for _ in range(10):
            assert c.routing_order("least-loaded", ["a", "b", "c"]) == ["b", "c", "a"]
        assert calls == {"a": 1, "b": 1, "c": 1}
        clock.advance(0.5)
        c.routing_order("least-loaded", ["a", "b", "c"])
        assert calls == {"a": 1, "b": 1, "c": 1}
        clock.advance(0.5)
        figures["a"] = 0.0
        order = c.routing_order("least-loaded", ["a", "b", "c"])
        assert calls == {"a": 2, "b": 2, "c": 2}
        assert order[-1] != "a" and set(order[:2]) >= {"a"}  # a idle now; c's probe failed -> 0
        assert c.endpoint_load("b") == 0.0


def test_least_loaded_avoids_the_busy_endpoint(fakes):
    busy, idle = fakes
    busy.latency = 1.0
    with client_over({"busy": busy.base_url, "idle": idle.base_url}) as c:
        pending = [c.submit_inference("tiny-llama", f"p{i}", {"max_tokens": 2, "seed": i},
                                      endpoint_id="busy") for i in range(3)]
        assert c.endpoint_load("busy") >= 1 and c.endpoint_load("idle") == 0
        for _ in range(6):
            assert c.routing_order("least-loaded", ["busy", "idle"])[0] == "idle"
            c.route_inference("tiny-llama", "hi", FAST, strategy="least-loaded",
                              endpoint_ids=["busy", "idle"])
        assert c.get_routing_stats()["served_by"] == {"idle": 6}
        for f in pending:
            f.result(10)


def test_fastest_prefers_the_low_latency_endpoint(fakes):
    slow, fast = fakes
    slow.latency = 0.05
    with client_over({"slow": slow.base_url, "fast": fast.base_url}) as c:
        for _ in range(40):
            c.route_inference("tiny-llama", "hi", FAST, strategy="fastest",
                              endpoint_ids=["slow", "fast"])
        served = c.get_routing_stats()["served_by"]
        assert served["fast"] >= 35 and served.get("slow", 0) >= 1  # measured, then explored
        assert c.endpoint_latency_p50("slow") > c.endpoint_latency_p50("fast")


# ---------------------------------------------------------------------------- failover
def test_failover_on_5xx_and_refused_connections_then_skip_open_breakers(fakes):
    broken, good = fakes
    broken.add_fault(Fault("status", status=500, count=-1, path="/"))  # /health too
    urls = {"broken": broken.base_url, "dead": dead_url(), "good": good.base_url}
    with client_over(urls, max_retries=0, failure_threshold=2, minimum_calls=2,
                       reset_timeout=60) as c:
        for _ in range(12):
            r = c.route_inference("tiny-llama", "hi", FAST, endpoint_ids=list(urls))
            assert r.usage.completion_tokens == 4
        stats = c.get_routing_stats()
        assert stats["served_by"] == {"good": 12}
        # rotation: [broken, dead, good], [dead, good, broken], [good, broken, dead], ...
        # broken is reached 4 times, dead 8 times. broken fails twice, then its breaker is
        # OPEN; dead's first refused connection has the breaker check /health (refused too):
        # OPEN after one failure, or two if the next routed call came before the verdict
        assert stats["failovers"]["broken"] == 2 and stats["skipped_open"]["broken"] == 2
        assert stats["failovers"]["dead"] in (1, 2)
        assert stats["failovers"]["dead"] + stats["skipped_open"]["dead"] == 8
        assert c.circuit_states()["broken"] == c.circuit_states()["dead"] == "OPEN"
        assert broken.request_count["/v1/completions"] == 2  # nothing sent while OPEN


def test_every_endpoint_down_raises_no_healthy_endpoint_when_fail_fast():
    urls = {"x": dead_url(), "y": dead_url()}
    with client_over(urls, max_retries=0, failure_threshold=1, minimum_calls=1,
                       reset_timeout=60, fail_fast=True) as c:
        with pytest.raises(errors.NoHealthyEndpointError) as info:
            c.route_inference("tiny-llama", "hi", FAST, endpoint_ids=["x", "y"])
        assert "x: ConnectionError" in str(info.value) and "y: ConnectionError" in str(info.value)
        assert isinstance(info.value.__cause__, errors.ConnectionError)
        with pytest.raises(errors.NoHealthyEndpointError, match="circuit OPEN"):
            c.route_inference("tiny-llama", "hi", FAST, endpoint_ids=["x", "y"])
        assert c.get_routing_stats()["no_healthy_endpoint"] == 2


def _both_down_and_open(c: Any, a: Any, b: Any) -> None:
    """Both servers gone, and the circuits of endpoints "a" and "b" opened by refused
    connections (two each)."""
    a.down()
    b.down()
    for eid in ("a", "b", "a", "b"):
        with pytest.raises(errors.ApiError):
            c.run_inference("tiny-llama", "x", FAST, endpoint_id=eid, fail_fast=True)
    wait_until(lambda: "CLOSED" not in (c.circuit_states()["a"], c.circuit_states()["b"]),
               what="both circuits to open")


def test_every_endpoint_down_waits_for_the_first_circuit_to_close(fakes):
    """Both servers go away: the routed request waits (no thread holds it) and is served
    by the first endpoint whose probe finds its server back; a short deadline ends a wait
    with a typed error."""
    a, b = fakes
    with client_over({"a": a.base_url, "b": b.base_url}, max_retries=0) as c:
        _both_down_and_open(c, a, b)
        waiting = c.route_submit(build_request("hi", "tiny-llama", FAST), endpoint_ids=["a", "b"])
        wait_until(lambda: c.get_routing_stats()["waited_for_a_circuit"] == 1,
                   what="the routed request to wait")
        assert not waiting.done()
        late = c.route_submit(build_request("late", "tiny-llama", FAST), endpoint_ids=["a", "b"],
                              timeout=0.3)
        with pytest.raises(errors.CircuitWaitTimeoutError):
            late.result(5)
        b.up()
        assert waiting.result(10).usage.completion_tokens == 4
        assert b.request_count["/v1/completions"] == 1
        a.up()


def test_a_routed_calls_timeout_bounds_its_failovers(fakes):
    """``timeout`` is the whole routed call's: an attempt held until it passes leaves no time
    for the next endpoint (nothing is sent there), and the caller gets ``TimeoutError``."""
    a, b = fakes
    with client_over({"a": a.base_url, "b": b.base_url}, max_retries=0) as c:
        for server in (a, b):
            server.add_fault(Fault("gate", count=-1))
        try:
            with pytest.raises(errors.TimeoutError) as info:
                c.route_inference("tiny-llama", "hi", FAST, endpoint_ids=["a", "b"], timeout=0.5)
            assert not isinstance(info.value, errors.NoHealthyEndpointError)
            sent = a.request_count["/v1/completions"] + b.request_count["/v1/completions"]
            assert sent == 1
        finally:
            for server in (a, b):
                server.release_stalls()


def test_fail_fast_on_a_routed_call_waits_for_no_circuit(fakes):
    """Every endpoint down: a routed call that is not ``fail_fast`` waits for a circuit to
    close; one that is raises ``NoHealthyEndpointError`` at once, waiting for none."""
    a, b = fakes
    with client_over({"a": a.base_url, "b": b.base_url}, max_retries=0) as c:
        _both_down_and_open(c, a, b)
        with pytest.raises(errors.NoHealthyEndpointError, match="circuit OPEN"):
            c.route_inference("tiny-llama", "now", FAST, endpoint_ids=["a", "b"], fail_fast=True)
        assert c.get_routing_stats()["waited_for_a_circuit"] == 0
        late = c.route_submit(build_request("late", "tiny-llama", FAST), endpoint_ids=["a", "b"],
                              timeout=0.3)
        with pytest.raises(errors.CircuitWaitTimeoutError):
            late.result(5)
        assert c.get_routing_stats()["waited_for_a_circuit"] == 1
        a.up()
        b.up()


def test_callers_errors_are_raised_not_failed_over(fakes):
    a, b = fakes
    with client_over({"a": a.base_url, "b": b.base_url}) as c:
        with pytest.raises(errors.NotFoundError):
            c.route_inference("no-such-model", "hi", FAST, endpoint_ids=["a", "b"])
        assert a.request_count["/v1/completions"] + b.request_count["/v1/completions"] == 1


# ---------------------------------------------------------------------------- real servers
@pytest.mark.real_server
def test_300_routed_requests_over_two_real_servers_and_a_dead_url(
        real_vllm_server, real_vllm_server_with_key, monkeypatch):
    # The "keyless" endpoint must really carry no key: an ambient VLLM_API_KEY would be
    # every endpoint's default (CI sets a canary one).
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    keyless, keyed = real_vllm_server.base_url, real_vllm_server_with_key.base_url
    client = VllmClient(base_url=keyless, timeout=60)
    try:
        client.create_endpoint(endpoint_id="keyless", base_url=keyless)
        client.create_endpoint(endpoint_id="keyed", base_url=keyed, api_key=REAL_SERVER_API_KEY)
        client.create_endpoint(endpoint_id="dead", base_url=dead_url(), reset_timeout=120)
        probe_calls: Counter = Counter()
        real_probe = vllm_load_probe()

        def counting_probe(endpoint: Any) -> Optional[float]:
            probe_calls[endpoint.id] += 1
            return real_probe(endpoint)

        client.set_load_probe(counting_probe)
        ids = ["keyless", "keyed", "dead"]
        strategies = ["round-robin", "least-loaded", "fastest"]
        threads_before = threading.active_count()

        def one(i: int) -> Any:
            began = time.monotonic()
            result = client.route_inference("tiny-llama", f"request {i}",
                                            {"max_tokens": 3, "temperature": 0},
                                            strategy=strategies[i % 3], endpoint_ids=ids)
            return result, time.monotonic() - began

        start = time.monotonic()
        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(one, range(300)))
        elapsed = time.monotonic() - start
        results = [r for r, _ in outcomes]
        assert len(results) == 300 and all(r.usage.completion_tokens == 3 for r in results)
        # No routed call waits for the dead endpoint's 120 s probe window: it fails over.
        slowest = max(seconds for _, seconds in outcomes)
        assert slowest < 60, f"a routed call took {slowest:.0f}s"

        routing = client.get_routing_stats()
        served = routing["served_by"]
        print(f"\n300 routed requests in {elapsed:.1f}s: served_by={served} "
              f"failovers={routing['failovers']} skipped_open={routing['skipped_open']} "
              f"probe_calls={dict(probe_calls)}")
        assert sum(served.values()) == 300 and "dead" not in served
        # Round-robin alone gives each live server about a third of its 100 calls (a turn
        # that starts at the dead endpoint falls through to the next one); "fastest" and
        # "least-loaded" may favour either server, so that is the share to expect.
        assert served["keyless"] >= 25 and served["keyed"] >= 25
        assert client.circuit_states()["dead"] == "OPEN"
        assert routing["skipped_open"]["dead"] > 0
        # the probe asked each live server at most once a second
        for eid in ("keyless", "keyed"):
            assert 1 <= probe_calls[eid] <= elapsed + 2

        stats = client.get_stats()
        per = stats["endpoints"]
        for key in ("requests", "successes", "failures", "output_tokens"):
            assert stats["total"][key] == sum(s[key] for s in per.values())
        assert per["keyless"]["successes"] + per["keyed"]["successes"] == 300
        assert per["dead"]["successes"] == 0 and per["dead"]["failures"] == routing["failovers"]["dead"]
        assert per["keyless"]["output_tokens"] + per["keyed"]["output_tokens"] == 900
        assert stats["total"]["requests"] == 300 + per["dead"]["failures"]
        # one worker pool per endpoint, and the prober of the endpoint whose circuit is OPEN
        assert threading.active_count() <= threads_before + 3 * 10 + 1

        # Each key stays with its own endpoint: the same server refuses an endpoint without it,
        # and one with another endpoint's key; the keyless server takes keyless requests.
        client.create_endpoint(endpoint_id="keyed-without-key", base_url=keyed)
        client.create_endpoint(endpoint_id="keyed-wrong-key", base_url=keyed, api_key="sk-other")
        for eid in ("keyed-without-key", "keyed-wrong-key"):
            with pytest.raises(errors.AuthenticationError):
                client.make_request_with_endpoint(eid, "hi", model="tiny-llama",
                                                  parameters={"max_tokens": 2})
        assert client.make_request_with_endpoint(
            "keyless", "hi", model="tiny-llama", parameters={"max_tokens": 2}).usage.completion_tokens == 2
        assert client._endpoint("keyless").settings.api_key is None
        assert VLLM_LOAD_METRIC == "vllm:num_requests_waiting"
    finally:
        client.close()
