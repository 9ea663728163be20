"""OpenTelemetry traces, metrics and request-tagged logs (issue 15), with the SDK's in-memory
exporters against the test double, and the trace context on the wire of the real server.

Every assertion reads what the SDK exported or what the server received; nothing in the
client is patched.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import List

import pytest

# Without the SDK (a venv without the test extra) these tests cannot run; the rest of the
# suite is what shows that nothing changes then.
pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace as otel_trace  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from api_support import (COMPLETIONS, OtelCapture, RecordingRelay,  # noqa: E402
                         parse_traceparent, request_ids, span_id, trace_id)
from support import wait_until  # noqa: E402
from ipfs_accelerate_py.api_backends import errors  # noqa: E402
from ipfs_accelerate_py.api_backends._observability import otel as _otel  # noqa: E402
from ipfs_accelerate_py.api_backends.base import build_request  # noqa: E402
from ipfs_accelerate_py.api_backends.vllm import VllmClient  # noqa: E402
from ipfs_accelerate_py.servers.fake_vllm import Fault  # noqa: E402

P = {"max_tokens": 2}
ROOT = Path(__file__).resolve().parents[2]


def events(span, name: str) -> List[dict]:
    return [dict(e.attributes) for e in span.events if e.name == name]


def wire_contexts(server, path: str = COMPLETIONS) -> List[tuple]:
    return [parse_traceparent(r.headers["traceparent"]) for r in server.requests
            if r.path == path]


def test_a_batched_call_of_three_callers_is_one_call_span_linked_to_their_three_spans(
        fake_server, make_client, otel):
    c = make_client(fake_server, max_concurrent_requests=1)
    fake_server.add_fault(Fault("gate", count=1))  # held until released
    blocker = c.submit_inference(None, "blocker", {"max_tokens": 3})
    wait_until(lambda: fake_server.request_count[COMPLETIONS] == 1, what="the blocker sent")
    futures = [c.submit_inference(None, f"job {i}", P) for i in range(3)]
    assert len(c.request_queue) == 3  # all three wait behind the one worker
    assert fake_server.release_stalls() == 1
    blocker.result(5)
    results = [f.result(5) for f in futures]
    assert [r.batch_size for r in results] == [3, 3, 3]

    spans = otel.spans()
    shared = [s for s in spans if s.attributes.get("ipfs_accelerate.batch.size") == 3
              and "gen_ai.request.max_tokens" not in s.attributes]
    assert len(shared) == 1
    call = shared[0]
    callers = sorted((s for s in spans if s is not call
                      and s.attributes.get("ipfs_accelerate.batch.size") == 3),
                     key=lambda s: s.attributes["ipfs_accelerate.request_id"])
    assert len(callers) == 3 and len(spans) == 5  # the blocker, three callers, their call
    # the shared call went out with the first caller's request id
    assert call.attributes["ipfs_accelerate.request_id"] == request_ids(fake_server)[1] \
        == callers[0].attributes["ipfs_accelerate.request_id"]
    assert {span_id(s) for s in callers} == {format(l.context.span_id, "016x") for l in call.links}
    for s in callers:
        assert [format(l.context.span_id, "016x") for l in s.links] == [span_id(call)]
        assert s.attributes["gen_ai.usage.output_tokens"] == 2
        assert len(events(s, "queue.wait")) == 1
    # the call is a child of the first caller's span and it is the context on the wire
    assert call.parent.span_id == callers[0].context.span_id
    assert call.kind == SpanKind.CLIENT and call.name == "text_completion tiny-llama"
    assert wire_contexts(fake_server)[1] == (trace_id(call), span_id(call))
    assert fake_server.request_count[COMPLETIONS] == 2
    points = otel.metrics()["gen_ai.client.operation.duration"]
    assert sum(p.count for p in points) == 4  # one per caller, none for the shared call


def test_a_request_retried_twice_after_503s_has_two_retry_events(fake_server, make_client,
                                                                 otel):
    c = make_client(fake_server, max_retries=3)
    fake_server.add_fault(Fault("status", status=503, count=2))
    assert c.run_inference(None, "retry me", P).text
    [span] = otel.spans()
    retries = events(span, "retry")
    assert [e["retry.attempt"] for e in retries] == [1, 2]
    assert {e["error.type"] for e in retries} == {"ServiceUnavailableError"}
    assert all(e["retry.delay_s"] >= 0 for e in retries)
    assert span.attributes["http.request.resend_count"] == 2
    assert span.status.status_code == StatusCode.UNSET and "error.type" not in span.attributes
    # all three attempts carried this span's context
    assert wire_contexts(fake_server) == [(trace_id(span), span_id(span))] * 3


def test_a_request_held_by_an_open_circuit_records_the_wait_and_the_probe_is_traced(
        fake_server, make_client, otel):
    c = make_client(fake_server, max_retries=3, max_concurrent_requests=1)
    assert c.run_inference(None, "warm", P).text
    fake_server.down()
    with pytest.raises((errors.ConnectionError, errors.CircuitOpenError)):
        c.run_inference(None, "detects it", P, fail_fast=True)
    wait_until(lambda: c.circuit_state == "OPEN", what="the circuit to open")
    held = c.submit_inference(None, "held", P)
    wait_until(lambda: c.get_metrics()["probes"]["sent"] >= 1, what="a failed probe")
    fake_server.up()
    assert held.result(10).text
    [span] = [s for s in otel.named("text_completion")
              if s.attributes["ipfs_accelerate.request_id"] == request_ids(fake_server)[-1]]
    [wait] = events(span, "circuit.wait")
    [queued] = events(span, "queue.wait")
    assert 0 < wait["wait.duration_s"] <= queued["wait.duration_s"]
    assert wait["circuit.held_in_queue"] is True
    # the probe that closed the circuit went out in a span of its own, with its context
    probes = otel.named("health_check")
    assert any(s.attributes["ipfs_accelerate.healthy"] for s in probes)
    assert any(not s.attributes["ipfs_accelerate.healthy"] for s in probes)
    sent = wire_contexts(fake_server, "/health")
    assert sent and set(sent) <= {(trace_id(s), span_id(s)) for s in probes}


def test_a_stream_that_waited_for_the_circuit_records_the_wait_and_its_first_chunk(
        fake_server, make_client, otel):
    c = make_client(fake_server, max_retries=3)
    fake_server.down()
    with pytest.raises((errors.ConnectionError, errors.CircuitOpenError)):
        c.run_inference(None, "detects it", P, fail_fast=True)
    wait_until(lambda: c.circuit_state != "CLOSED", what="the circuit to open")
    out: List[str] = []
    t = threading.Thread(target=lambda: out.append("".join(c.stream_generation("s", **P))))
    t.start()
    wait_until(lambda: c._endpoints["default"].breaker.waiting == 1, what="the stream to wait")
    fake_server.up()
    t.join(10)
    assert out and out[0]
    [span] = [s for s in otel.named("text_completion") if "gen_ai.request.max_tokens" in s.attributes
              and s.attributes["ipfs_accelerate.request_id"] == request_ids(fake_server)[-1]]
    [wait] = events(span, "circuit.wait")
    assert wait["wait.duration_s"] > 0
    ttft = span.attributes["gen_ai.response.time_to_first_chunk"]
    [first] = events(span, "first_chunk")
    assert 0 < ttft == first["gen_ai.response.time_to_first_chunk"]
    assert span.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert wire_contexts(fake_server)[-1] == (trace_id(span), span_id(span))
    [point] = otel.metrics()["gen_ai.client.operation.time_to_first_chunk"]
    assert point.count == 1 and point.sum == pytest.approx(ttft)


def test_streams_that_share_one_call_each_get_their_own_span(fake_server, make_client, otel):
    """Three concurrent streams share one prompt-list call (_streaming/stream_batching.py): each caller
    still gets its own span, ended with its own usage and TTFT; the shared call carries the
    context of the caller that opened it."""
    c = make_client(fake_server, max_batch_size=3, batch_linger=1.0, batch_timeout=30.0)
    c.stream_generation("prime", **P).close()  # a lone stream goes at once and starts a burst
    with ThreadPoolExecutor(3) as pool:
        streams = list(pool.map(lambda i: c.stream(build_request(
            f"shared {i}", "tiny-llama", dict(P, stream=True))), range(3)))
        texts = list(pool.map(lambda st: "".join(ch.text for ch in st), streams))
    assert all(texts) and c.get_metrics()["batches"] == 1
    shared_call = [r for r in fake_server.requests if r.path == COMPLETIONS][-1]
    assert len(shared_call.json["prompt"]) == 3
    shared = [sp for sp in otel.named("text_completion")
              if sp.attributes.get("gen_ai.response.time_to_first_chunk")]
    assert len(shared) == 3  # one per caller; the primer was closed before its first chunk
    assert all(sp.attributes["gen_ai.response.finish_reasons"] == ("length",) for sp in shared)
    mine = shared
    assert len({span_id(sp) for sp in mine}) == len(mine)
    assert parse_traceparent(shared_call.headers["traceparent"]) in {
        (trace_id(sp), span_id(sp)) for sp in mine}


def test_a_stream_closed_early_ends_its_span_as_closed_early(fake_server, make_client, otel):
    c = make_client(fake_server)
    stream = c.stream_generation("long", max_tokens=50)
    assert next(stream)
    stream.close()
    [span] = otel.spans()
    assert span.attributes["error.type"] == "ClosedEarly"
    assert span.status.status_code == StatusCode.ERROR


def test_spans_follow_the_genai_conventions_under_the_callers_span(fake_server, make_client,
                                                                   otel):
    c = make_client(fake_server)
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("handle user request") as app:
        r = c.run_inference(None, "Hi", {"max_tokens": 3, "temperature": 0.5, "top_p": 0.9})
        chat = c.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=2)
        fake_server.add_fault(Fault("status", status=400, count=1))
        with pytest.raises(errors.ApiError) as bad:
            c.run_inference(None, "refused", P)
    spans = {s.attributes.get("ipfs_accelerate.request_id"): s for s in otel.named("text_")}
    done, refused = sorted(spans.values(), key=lambda s: s.start_time)
    port = int(fake_server.base_url.rsplit(":", 1)[1])
    assert done.name == "text_completion tiny-llama" and done.kind == SpanKind.CLIENT
    assert done.parent.span_id == app.get_span_context().span_id
    assert {k: v for k, v in done.attributes.items() if not k.startswith("ipfs_")} == {
        "gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "vllm",
        "gen_ai.request.model": "tiny-llama", "gen_ai.request.max_tokens": 3,
        "gen_ai.request.temperature": 0.5, "gen_ai.request.top_p": 0.9,
        "server.address": "127.0.0.1", "server.port": port,
        "gen_ai.usage.input_tokens": r.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": r.usage.completion_tokens,
        "gen_ai.response.finish_reasons": (r.finish_reason,),
        "gen_ai.response.model": r.model, "gen_ai.response.id": r.id}
    [chat_span] = otel.named("chat ")
    assert chat_span.name == "chat tiny-llama"
    assert chat_span.attributes["gen_ai.operation.name"] == "chat"
    assert chat_span.attributes["gen_ai.usage.output_tokens"] == chat.usage.completion_tokens
    assert refused.attributes["error.type"] == type(bad.value).__name__
    assert refused.status.status_code == StatusCode.ERROR
    m = otel.metrics()
    [meta] = m["gen_ai.client.operation.duration:meta"]
    assert meta.unit == "s"
    durations = {(p.attributes["gen_ai.operation.name"], p.attributes.get("error.type")): p
                 for p in m["gen_ai.client.operation.duration"]}
    assert {k: p.count for k, p in durations.items()} == dict([
        (("chat", None), 1), (("text_completion", None), 1),
        (("text_completion", type(bad.value).__name__), 1)])
    assert list(durations["chat", None].explicit_bounds) == list(_otel.DURATION_BUCKETS)
    tokens = {(p.attributes["gen_ai.operation.name"], p.attributes["gen_ai.token.type"]): p
              for p in m["gen_ai.client.token.usage"]}
    assert tokens["text_completion", "output"].sum == r.usage.completion_tokens
    assert tokens["chat", "input"].sum == chat.usage.prompt_tokens
    assert list(tokens["chat", "input"].explicit_bounds) == list(_otel.TOKEN_BUCKETS)
    assert m["gen_ai.client.token.usage:meta"][0].unit == "{token}"


def test_log_lines_of_a_request_carry_its_request_id_and_trace_id(fake_server, make_client,
                                                                  caplog):
    c = make_client(fake_server)
    with caplog.at_level(logging.DEBUG, logger="ipfs_accelerate_py.api_backends"):
        c.run_inference(None, "untraced", {**P, "extra_body": {"k": 1}})
        capture = OtelCapture()
        try:
            c.run_inference(None, "traced", {**P, "extra_body": {"k": 1}})
            [span] = capture.spans()
        finally:
            capture.close()
    lines = [r for r in caplog.records if "extra_body" in r.getMessage()]
    first, second = request_ids(fake_server)
    assert lines[0].getMessage().startswith(f"[request_id={first}] ")
    assert lines[1].getMessage().startswith(f"[request_id={second} trace_id={trace_id(span)}] ")
    assert lines[1].request_id == second and lines[1].trace_id == trace_id(span)


def test_the_api_key_appears_in_no_exported_span_or_metric(start_fake, otel):
    """The spans and metrics of every traced path go to ``collected_results/``, which CI
    searches for its canary key (``.ci/run``)."""
    key = os.environ.get("VLLM_API_KEY") or "sk-otel-canary-0f3b9a"
    server = start_fake(api_key=key)
    with VllmClient(base_url=server.base_url, api_key=key, model="tiny-llama",
                    retry_delay=0.002, max_retry_delay=0.01, max_concurrent_requests=1) as c:
        server.add_fault(Fault("status", status=503, count=1))
        assert c.run_inference(None, "a", P).text
        assert [f.result(5).text for f in [c.submit_inference(None, f"b{i}", P) for i in range(3)]]
        assert "".join(c.stream_generation("c", **P))
        assert c.list_models()
    assert all(r.headers["authorization"] == f"Bearer {key}" for r in server.requests
               if r.path.startswith("/v1"))  # the key was really in use
    dump = otel.dump()
    assert len(otel.spans()) >= 5 and "gen_ai.client.token.usage" in dump
    assert key not in dump
    out = ROOT / "collected_results" / "otel_spans_and_metrics.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(dump, encoding="utf-8")


def test_without_a_provider_nothing_is_traced_and_no_header_is_added(fake_server, make_client):
    c = make_client(fake_server)
    assert isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider)
    assert _otel.current() is None
    assert c.run_inference(None, "plain", P).text
    assert [r for r in fake_server.requests if "traceparent" in r.headers] == []


_BLOCKED = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError("opentelemetry is not installed here")
sys.meta_path.insert(0, _Block())
"""
_RUN = """
import json, sys
before = set(sys.modules)
from ipfs_accelerate_py.api_backends.vllm import VllmClient
imported = sorted(set(sys.modules) - before)
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer
server = FakeVllmServer().start()
try:
    with VllmClient(base_url=server.base_url, model="tiny-llama") as c:
        text = c.run_inference(None, "hi", {"max_tokens": 2}).text
        stream = "".join(c.stream_generation("s", max_tokens=2))
    sent = [r.headers for r in server.requests]
finally:
    server.stop()
print(json.dumps({"imported": imported, "text": text, "stream": stream,
                  "traceparent": any("traceparent" in h for h in sent),
                  "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}))
"""


def _run(prelude: str) -> dict:
    out = subprocess.run([sys.executable, "-c", prelude + _RUN], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_without_opentelemetry_the_client_works_and_imports_exactly_the_same_modules():
    """The package blocked (as in a venv without the extra) vs installed: the same modules
    are imported (so import time is unchanged), requests and streams work, and no
    OpenTelemetry module is ever loaded in either case."""
    blocked, installed = _run(_BLOCKED), _run("")
    assert blocked["text"] and blocked["stream"] and installed["text"]
    assert blocked["otel"] == [] == installed["otel"]
    assert blocked["imported"] == installed["imported"]
    assert not blocked["traceparent"] and not installed["traceparent"]


@pytest.mark.real_server
def test_the_traceparent_reaches_the_real_vllm_and_matches_the_client_span(real_base_url, otel):
    host, port = real_base_url.split("//", 1)[1].rsplit(":", 1)
    relay = RecordingRelay((host, int(port))).start()
    try:
        with VllmClient(base_url=relay.base_url, model="tiny-llama") as c:
            r = c.run_inference(None, "The sea is", {"max_tokens": 4})
            streamed = "".join(c.stream_generation("The sky is", max_tokens=4))
    finally:
        relay.stop()
    assert r.usage.completion_tokens == 4 and streamed
    spans = otel.named("text_completion tiny-llama")
    received = [parse_traceparent(v) for v in relay.traceparents()]
    assert len(spans) == 2 and len(received) == 2
    assert received == [(trace_id(s), span_id(s)) for s in sorted(spans, key=lambda s: s.start_time)]
