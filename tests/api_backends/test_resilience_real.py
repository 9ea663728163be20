"""The README's resilience sections, run VERBATIM against a real vLLM server.

The code blocks under "VllmClient Class", "Priority Queue System", "Circuit Breaker
Pattern", "Request Batching" and "Monitoring System" are read from
``docs/VLLM_TESTING_README.md`` at test time and executed as they stand; the only change is
the base URL (``http://localhost:8000`` -> the real server). The names they rely on but do
not define (``prompt``, ``input_prompts``) are defined first, and the blocks after the first
use the ``client`` the first block built, as a reader of the README would. Each test then
checks that the block did what the README says, on the real server.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List

import pytest

from api_support import README_MODEL, run_snippet
from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers import free_port

pytestmark = pytest.mark.real_server

PROMPT = "What is machine learning?"
INPUT_PROMPTS = [f"Tell me fact number {i} about the sea:" for i in range(10)]
LATENCY_FIELDS = {"count", "min", "max", "mean", "p50", "p90", "p95", "p99"}


def http_calls(metrics: Dict[str, Any]) -> int:
    """HTTP calls behind ``metrics``: one per request, except a batch is one for many."""
    return metrics["requests"] - metrics["batched_requests"] + metrics["batches"]


def test_vllmclient_class_snippet(readme):
    client, result, metrics = readme["client"], readme["result"], readme["metrics"]
    assert isinstance(client, VllmClient)
    assert result.text and result.usage.completion_tokens == 100  # max_tokens honoured
    assert result.finish_reason == "length"
    assert metrics["requests"] == 1 and metrics["successes"] == 1 and metrics["failures"] == 0
    assert metrics["gen_ai.client.token.usage"]["output"] == 100
    assert client.recent_requests[-1]["priority"] == 0 and client.recent_requests[-1]["ok"]
    s = client.settings
    assert (s.max_retries, s.max_concurrent_requests, s.failure_threshold) == (3, 10, 5)


def test_priority_queue_snippet(readme, real_base_url):  # noqa: F811
    ns = dict(readme, prompt=PROMPT)
    run_snippet("Priority Queue System", ns, real_base_url)
    client = ns["client"]
    assert ns["result"].text  # the last (LOW priority) call's result
    assert [e["priority"] for e in list(client.recent_requests)[-3:]] == [0, 1, 2]
    assert client.get_metrics()["successes"] == 1 + 3

    # What the levels mean when requests wait: HIGH submitted after LOW runs first.
    with VllmClient(base_url=real_base_url, max_concurrent_requests=1) as one_lane:
        order: List[str] = []
        lock = threading.Lock()

        def track(name: str):
            def done(_: Any) -> None:
                with lock:
                    order.append(name)
            return done

        blocker = one_lane.submit_inference(README_MODEL, PROMPT, {"max_tokens": 128})
        futures = []
        for name, prio in [("low", 2)] * 3 + [("high", 0)] * 3:
            f = one_lane.submit_inference(README_MODEL, f"{PROMPT} ({name})",
                                          {"max_tokens": 4}, priority=prio)
            f.add_done_callback(track(name))
            futures.append(f)
        assert not blocker.done()  # they all waited behind it
        assert all(f.result(120).usage.completion_tokens == 4 for f in futures)
        assert blocker.result(120).usage.completion_tokens == 128
        assert order == ["high"] * 3 + ["low"] * 3


def test_circuit_breaker_snippet(readme, real_base_url):  # noqa: F811
    out = run_snippet("Circuit Breaker Pattern", readme, real_base_url)
    assert out == "Circuit state: CLOSED\nFailure count: 0\n"
    assert isinstance(readme["metrics"], dict)

    # The server answering 4xx is not a failure of the server: the breaker stays CLOSED.
    client = readme["client"]
    for _ in range(8):
        with pytest.raises(errors.NotFoundError):
            client.run_inference("no-such-model", PROMPT, {"max_tokens": 2})
    assert run_snippet("Circuit Breaker Pattern", readme, real_base_url) == out

    # A server that is gone: two refused connections open the breaker. With fail_fast the
    # next call is rejected at once; the same README lines report it.
    port = free_port()  # a loopback port with nobody listening
    dead = VllmClient(base_url=f"http://127.0.0.1:{port}", failure_threshold=5,
                      max_retries=0, reset_timeout=30, fail_fast=True)
    try:
        for _ in range(2):
            with pytest.raises(errors.ConnectionError):
                dead.run_inference(README_MODEL, PROMPT)
        with pytest.raises(errors.CircuitOpenError):
            dead.run_inference(README_MODEL, PROMPT)
        ns = {"client": dead}
        assert run_snippet("Circuit Breaker Pattern", ns, real_base_url) == \
            "Circuit state: OPEN\nFailure count: 2\n"
    finally:
        dead.close()
    # By default a call waits for the circuit instead, within its deadline.
    waiting = VllmClient(base_url=f"http://127.0.0.1:{port}", max_retries=3, retry_delay=0.05,
                         deadline=2.0)
    try:
        with pytest.raises(errors.CircuitWaitTimeoutError):
            waiting.run_inference(README_MODEL, PROMPT)
        assert waiting.circuit_state != "CLOSED"
    finally:
        waiting.close()


def test_request_batching_snippet(readme, real_base_url):  # noqa: F811
    client = readme["client"]
    client.get_metrics(reset=True)
    ns = dict(readme, input_prompts=INPUT_PROMPTS)
    run_snippet("Request Batching", ns, real_base_url)
    assert (client.batch_enabled, client.max_batch_size, client.batch_timeout) == (True, 8, 0.1)
    results = ns["results"]
    assert len(results) == 10
    assert all(r.text and r.usage.completion_tokens == 16 for r in results)  # vLLM's default
    m = client.get_metrics(reset=True)
    assert m["requests"] == 10 and m["successes"] == 10
    # A loop of blocking calls cannot be batched: each call waits for its own answer
    # before the next one exists. (The README's comment says otherwise; see below.)
    assert m["batches"] == 0 and http_calls(m) == 10

    # The same calls from 10 threads really share HTTP requests.
    rounds, calls, batches = 3, 0, 0
    for _ in range(rounds):
        out = from_threads(10, lambda i: client.run_inference("meta-llama/Llama-2-7b-chat-hf",
                                                              ns["input_prompts"][i]))
        assert all(r.usage.completion_tokens == 16 for r in out)
        m = client.get_metrics(reset=True)
        assert m["requests"] == 10 and m["successes"] == 10
        # Cross-check from the results themselves: each shared call gave its size to each part.
        assert round(sum(1 / r.batch_size for r in out), 6) == http_calls(m)
        calls += http_calls(m)
        batches += m["batches"]
    assert batches >= 1 and calls < 10 * rounds, (calls, batches)


def from_threads(n: int, fn: Callable[[int], Any]) -> List[Any]:
    """``fn(i)`` for i < n, each in its own thread, released together; results in order."""
    barrier = threading.Barrier(n)
    out: List[Any] = [None] * n
    errors_seen: List[BaseException] = []

    def worker(i: int) -> None:
        barrier.wait(30)
        try:
            out[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors_seen.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors_seen and all(r is not None for r in out), errors_seen
    return out


def test_monitoring_snippet(readme, real_base_url):  # noqa: F811
    client = readme["client"]
    # Give every promised statistic something to count: a batch, a failure, per model.
    futures = [client.submit_inference(README_MODEL, p, {"max_tokens": 4})
               for p in INPUT_PROMPTS[:4]]
    assert all(f.result(120).usage.completion_tokens == 4 for f in futures)
    with pytest.raises(errors.NotFoundError):
        client.run_inference("no-such-model", PROMPT, {"max_tokens": 2})
    client.run_inference("tiny-llama", PROMPT, {"max_tokens": 3})

    ns = dict(readme)
    run_snippet("Monitoring System", ns, real_base_url)
    metrics = ns["metrics"]  # the snapshot taken with reset=True
    # Request counts and success/failure rates
    assert metrics["requests"] == 1 + 4 + 1 + 1
    assert metrics["successes"] == 6 and metrics["failures"] == 1
    assert metrics["failures_by_type"] == {"NotFoundError": 1}
    assert metrics["success_rate"] == pytest.approx(6 / 7)
    # Latency statistics (min, max, avg, percentiles); "mean" is the average
    lat = metrics["gen_ai.client.operation.duration"]
    assert LATENCY_FIELDS <= set(lat) and lat["count"] == 7
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"]
    assert LATENCY_FIELDS <= set(metrics["queue_wait_seconds"])
    # Retry statistics (nothing failed transiently on a healthy server)
    assert metrics["retries"] == 0
    # Batch statistics: the four futures waited together and shared calls
    assert metrics["batches"] >= 1 and metrics["batched_requests"] >= 2
    assert metrics["mean_batch_size"] == metrics["batched_requests"] / metrics["batches"]
    # Per-model statistics
    per_model = metrics["per_model"]
    assert per_model[README_MODEL]["requests"] == 1 + 4 + 0
    assert per_model["tiny-llama"]["requests"] == 1
    assert per_model["no-such-model"]["failures"] == 1
    assert LATENCY_FIELDS <= set(per_model[README_MODEL]["gen_ai.client.operation.duration"])
    assert metrics["gen_ai.client.token.usage"]["output"] == 100 + 4 * 4 + 3
    assert metrics["circuit_state"] == {"default": "CLOSED"}
    # ... and reset=True really reset them.
    after = client.get_metrics()
    assert after["requests"] == 0 and after["per_model"] == {} and after["batches"] == 0
