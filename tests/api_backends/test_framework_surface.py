"""The framework surface of the README, against a REAL vLLM server.

The README's snippets for "Parameterized Endpoint Handlers", "Request Formatting with
Parameters", "Batch Processing", "Model Information and Statistics", "Model Optimization"
and "Endpoint Multiplexing" are read from ``docs/VLLM_TESTING_README.md`` and executed
verbatim; the only change is ``http://localhost:8000`` -> the test server's URL. Each runs
with ``vllm`` bound to the module, to the ``vllm`` class and to a ``vllm`` instance.
"""

from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

from api_support import DATA, README_MODEL, README_URL, readme_snippet
from ipfs_accelerate_py.api_backends import VllmClient, errors
from ipfs_accelerate_py.api_backends.base import _live_clients, default_transport
from ipfs_accelerate_py.api_backends.transport import HttpRequest, HttpResponse, Transport
from ipfs_accelerate_py.api_backends.vllm._info import NO_STATS_MESSAGE, model_info, model_statistics

# ``import ...api_backends.vllm as m`` would give the CLASS: the package re-exports the class
# under the submodule's name. The module itself comes from importlib.
vllm_module = importlib.import_module("ipfs_accelerate_py.api_backends.vllm")

SECTIONS = ["Parameterized Endpoint Handlers", "Request Formatting with Parameters",
            "Batch Processing", "Model Information and Statistics", "Model Optimization"]
FUNCTIONS = ["create_vllm_endpoint_handler", "create_vllm_endpoint_handler_with_params",
             "format_request_with_params", "format_structured_request", "process_batch",
             "process_batch_with_params", "process_batch_with_metrics", "get_model_info",
             "get_model_statistics", "optimize_model"]





def bound_vllm(kind: str, base_url: str) -> Any:
    if kind == "module":
        return vllm_module
    if kind == "class":
        return vllm_module.vllm
    return vllm_module.vllm(resources=None, metadata={"vllm_api_url": base_url})


# ---------------------------------------------------------------------------- README verbatim
@pytest.mark.real_server
@pytest.mark.parametrize("kind", ["module", "class", "instance"])
def test_readme_snippets_run_verbatim(url, kind):
    ns: Dict[str, Any] = {"vllm": bound_vllm(kind, url)}
    seen: Dict[str, Dict[str, Any]] = {}
    for section in SECTIONS:
        code = readme_snippet(section)
        assert README_URL in code or section == "Request Formatting with Parameters"
        exec(compile(code.replace(README_URL, url), f"README:{section}", "exec"), ns)  # noqa: S102
        seen[section] = dict(ns)

    handler = ns["handler"]  # the last one: parameters={"batch_size": 8}
    assert handler.model == README_MODEL and handler.options == {"batch_size": 8}
    # "Request Formatting with Parameters": `result` is the structured request's result
    structured = seen["Request Formatting with Parameters"]["result"]
    lp = structured["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == structured["usage"]["completion_tokens"]
    assert all(len(top) >= 1 for top in lp["top_logprobs"])
    # "Batch Processing"
    assert len(ns["results"]) == 3
    assert all(r["text"] and r["usage"]["completion_tokens"] == 16 for r in ns["results"])
    assert ns["metrics"]["batch_size"] == 3 and ns["metrics"]["completion_tokens"] == 48
    # "Model Information and Statistics"
    info, stats = ns["info"], ns["stats"]
    assert info["id"] == README_MODEL and info["max_model_len"] == 512
    assert info["owned_by"] == "vllm" and info["server_version"] and info["root"]
    assert stats["available"] is True and stats["generation_tokens_total"] > 0
    assert stats["metrics_model_name"] == "tiny-llama"
    # "Model Optimization": the last call wins
    assert ns["result"]["profile"] == "balanced" and ns["result"]["requires_server_restart"]


@pytest.mark.real_server
def test_readme_multiplexing_snippet_runs_verbatim(url):
    ns: Dict[str, Any] = {"input_prompt": "What is machine learning?"}
    setup = readme_snippet("VllmClient Class")  # defines `client` the way the README does
    exec(compile(setup.replace(README_URL, url), "README:VllmClient", "exec"), ns)  # noqa: S102
    try:
        exec(compile(readme_snippet("Endpoint Multiplexing").replace(README_URL, url),  # noqa: S102
                     "README:Endpoint Multiplexing", "exec"), ns)
        client = ns["client"]
        assert ns["result"].text and ns["result"].usage.completion_tokens == 16
        stats, all_stats = ns["stats"], ns["all_stats"]
        assert stats["endpoint_id"] == ns["endpoint1"] and stats["successes"] == 1
        assert stats["max_concurrent_requests"] == 5
        assert client.get_stats(ns["endpoint2"])["max_concurrent_requests"] == 10
        per = all_stats["endpoints"]
        assert set(per) == {"default", ns["endpoint1"], ns["endpoint2"]}
        assert all_stats["total"]["requests"] == sum(s["requests"] for s in per.values()) == 2
        # a request body dict works too
        r = client.make_request_with_endpoint(ns["endpoint2"], {"prompt": "hi", "max_tokens": 3},
                                              model="tiny-llama")
        assert r.usage.completion_tokens == 3
    finally:
        ns["client"].close()


def test_every_readme_call_exists_three_ways():
    instance = vllm_module.vllm(metadata={"vllm_api_url": "http://127.0.0.1:9"})
    for name in FUNCTIONS:
        assert callable(getattr(vllm_module, name)), name
        assert callable(getattr(vllm_module.vllm, name)), name
        assert callable(getattr(instance, name)), name


# ---------------------------------------------------------------------------- per-request parameters
@pytest.mark.real_server
def test_params_override_handler_defaults(url):
    handler = vllm_module.create_vllm_endpoint_handler_with_params(
        url, model="tiny-llama", parameters={"max_tokens": 7, "temperature": 0})
    assert vllm_module.format_request_with_params(handler, "hi", None)["usage"]["completion_tokens"] == 7
    assert vllm_module.format_request_with_params(handler, "hi", {"max_tokens": 3})[
        "usage"]["completion_tokens"] == 3
    assert handler.parameters == {"max_tokens": 7, "temperature": 0}  # defaults untouched
    out = vllm_module.format_request_with_params(handler, ["a", "b"], {"max_tokens": 2})
    assert [r["usage"]["completion_tokens"] for r in out] == [2, 2]
    # chat messages go to /v1/chat/completions
    chat = vllm_module.format_request_with_params(
        handler, [{"role": "user", "content": "hi"}], {"max_tokens": 4})
    assert chat["usage"]["completion_tokens"] == 4


@pytest.mark.real_server
def test_structured_request_maps_onto_real_fields(url):
    handler = vllm_module.create_vllm_endpoint_handler_with_params(
        url, model="tiny-llama", parameters={"temperature": 0, "max_tokens": 6})
    prompt, context = "Tell me about machine learning", "I'm a beginner in AI"
    joined = vllm_module.format_request_with_params(handler, f"{context}\n\n{prompt}")
    structured = vllm_module.format_structured_request(
        handler, {"prompt": prompt, "context": context, "options": {"return_logprobs": True}})
    assert structured["text"] == joined["text"]  # the context went in front, blank line between
    assert structured["usage"] == joined["usage"] and "logprobs" not in joined
    top3 = vllm_module.format_structured_request(handler, {
        "prompt": prompt, "options": {"return_logprobs": True, "top_logprobs": 3, "max_new_tokens": 4}})
    assert top3["usage"]["completion_tokens"] == 4
    assert all(3 <= len(alts) <= 4 for alts in top3["logprobs"]["top_logprobs"])
    chat = vllm_module.format_structured_request(handler, {
        "messages": [{"role": "user", "content": prompt}], "context": context,
        "options": {"return_logprobs": True, "top_logprobs": 2}})
    entries = chat["logprobs"]["content"]
    assert len(entries) == chat["usage"]["completion_tokens"] == 6
    assert all(len(e["top_logprobs"]) == 2 for e in entries)
    echoed = vllm_module.format_structured_request(handler, {"prompt": prompt, "options": {"echo": True}})
    assert echoed["text"].startswith(prompt)


@pytest.mark.parametrize("request_, field", [
    ({"prompt": "x", "options": {"beam_width": 4}}, "options.beam_width"),
    ({"prompt": "x", "options": {"return_logprobs": "yes"}}, "options.return_logprobs"),
    ({"prompt": "x", "options": {"top_logprobs": 2}}, "options.top_logprobs"),
    ({"prompt": "x", "options": {"return_logprobs": True, "top_logprobs": 99}}, "options.top_logprobs"),
    ({"prompt": "x", "options": {"stream": True}}, "options.stream"),
    ({"messages": [{"role": "user", "content": "x"}], "options": {"echo": True}}, "options.echo"),
    ({"prompt": "x", "contxt": "typo"}, "request.contxt"),
    ({"context": "only"}, "request.prompt"),
    ({"prompt": 5}, "request.prompt"),
    ({"prompt": "x", "context": 5}, "request.context"),
    ({"prompt": "x", "parameters": {"temprature": 1}}, "parameters.temprature"),
    ("just a string", "request"),
])
def test_bad_structured_requests_name_the_field_and_send_nothing(counting_listener, request_, field):
    handler = vllm_module.create_vllm_endpoint_handler(counting_listener.base_url, "tiny-llama")
    with pytest.raises(errors.ValidationError) as info:
        vllm_module.format_structured_request(handler, request_)
    assert info.value.field == field
    assert counting_listener.connections == 0


def test_bad_plain_requests_name_the_field_and_send_nothing(counting_listener):
    handler = vllm_module.create_vllm_endpoint_handler(counting_listener.base_url, "tiny-llama")
    with pytest.raises(errors.ValidationError) as info:
        vllm_module.format_request_with_params(handler, "x", {"max_tokenz": 5})
    assert info.value.field == "parameters.max_tokenz"
    with pytest.raises(errors.ValidationError) as info:
        vllm_module.format_request_with_params(lambda x: x, "x", {})
    assert info.value.field == "handler"
    with pytest.raises(errors.ValidationError) as info:
        vllm_module.format_request_with_params(handler, "x", [("max_tokens", 5)])
    assert info.value.field == "params"
    assert counting_listener.connections == 0


# ---------------------------------------------------------------------------- model info
class RewritingTransport(Transport):
    """The real transport, with one route's reply rewritten: plays an older or differently
    started server in front of the real one (the code under test sees real HTTP otherwise)."""

    def __init__(self, inner: Transport, path: str, rewrite: Callable[[HttpResponse], HttpResponse]):
        self.inner, self.path, self.rewrite = inner, path, rewrite
        self.paths: List[str] = []

    def send(self, request: HttpRequest, timeout: Any) -> HttpResponse:
        self.paths.append(request.path)
        resp = self.inner.send(request, timeout)
        return self.rewrite(resp) if request.path == self.path else resp

    def open_stream(self, request: HttpRequest, timeout: Any) -> Any:
        return self.inner.open_stream(request, timeout)

    def close(self) -> None:
        self.inner.close()


def _first_model_only(resp: HttpResponse) -> HttpResponse:
    data = json.loads(resp.body)
    data["data"] = data["data"][:1]
    return HttpResponse(resp.status, resp.headers, json.dumps(data).encode())


@pytest.mark.real_server
def test_model_info_listed_alias_and_unknown(url):
    info = vllm_module.get_model_info(url, "tiny-llama")
    assert info["listed"] and info["alias_of"] is None and info["server_version"] == "0.32.0"
    assert {"id", "root", "max_model_len", "owned_by", "created"} <= set(info)
    assert vllm_module.get_model_info(url)["id"] == info["listed_models"][0]  # default: first listed
    with pytest.raises(errors.NotFoundError) as err:
        vllm_module.get_model_info(url, "no-such-model")
    assert "no-such-model" in str(err.value) and "tiny-llama" in str(err.value)
    assert err.value.param == "model"


@pytest.mark.real_server
def test_alias_missing_from_the_list_is_confirmed_by_tokenize(url):
    transports: List[RewritingTransport] = []

    def factory(settings: Any) -> Transport:
        transports.append(RewritingTransport(default_transport(settings), "/v1/models", _first_model_only))
        return transports[-1]

    with VllmClient(base_url=url, transport_factory=factory) as client:
        info = model_info(client, README_MODEL)
        assert info["listed"] is False and info["alias_of"] == "tiny-llama"
        assert info["served_check"] == "answered by /tokenize" and info["max_model_len"] == 512
        assert info["listed_models"] == ["tiny-llama"]
        assert "/tokenize" in transports[0].paths and "/v1/completions" not in transports[0].paths
        with pytest.raises(errors.NotFoundError, match="not served"):
            model_info(client, "meta-llama/Llama-2-13b-chat-hf")
        stats = model_statistics(client, README_MODEL)
        assert stats["available"] and stats["metrics_model_name"] == "tiny-llama"
        assert "first served name" in stats["message"]


# ---------------------------------------------------------------------------- statistics
@pytest.mark.real_server
def test_statistics_move_by_exactly_what_was_served(url):
    before = vllm_module.get_model_statistics(url, "tiny-llama")
    handler = vllm_module.create_vllm_endpoint_handler(url, "tiny-llama")
    usages = [vllm_module.format_request_with_params(
        handler, f"statistics probe {i}", {"max_tokens": 5 + i, "temperature": 0})["usage"]
        for i in range(5)]
    after = vllm_module.get_model_statistics(url, "tiny-llama")
    gen = sum(u["completion_tokens"] for u in usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    print(f"\ngeneration_tokens_total {before['generation_tokens_total']} -> "
          f"{after['generation_tokens_total']} (+{gen}); prompt_tokens_total "
          f"{before['prompt_tokens_total']} -> {after['prompt_tokens_total']} (+{prompt})")
    assert gen == 5 + 6 + 7 + 8 + 9
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == gen
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == prompt
    assert after["requests_finished_total"] - before["requests_finished_total"] == 5
    assert (after["request_success_by_reason"]["length"]
            - before["request_success_by_reason"]["length"]) == 5
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        a, b = after[hist], before[hist]
        assert a["count"] - b["count"] == 5 and a["sum"] > b["sum"]
        assert 0 < a["p50"] <= a["p90"] <= a["p99"] and a["mean"] > 0
    assert after["requests_running"] == after["requests_waiting"] == 0
    assert 0.0 <= after["kv_cache_usage"] <= 1.0
    assert after["available"] and after["message"] is None


@pytest.mark.real_server
def test_statistics_say_when_the_server_publishes_none(url):
    recorded = (DATA / "vllm_metrics_disable_log_stats.txt").read_bytes()

    def factory(settings: Any) -> Transport:
        return RewritingTransport(default_transport(settings), "/metrics",
                                  lambda r: HttpResponse(r.status, r.headers, recorded))

    with VllmClient(base_url=url, transport_factory=factory) as client:
        stats = model_statistics(client, "tiny-llama")
        assert stats["available"] is False and stats["message"] == NO_STATS_MESSAGE
        assert "--disable-log-stats" in stats["message"]
        assert "generation_tokens_total" not in stats
        with pytest.raises(errors.NotFoundError):  # an unknown model is still an error
            model_statistics(client, "no-such-model")


# ---------------------------------------------------------------------------- no leaks
@pytest.mark.real_server
def test_module_level_calls_share_clients_and_threads(url):
    handler = vllm_module.create_vllm_endpoint_handler(url, README_MODEL)
    calls: List[Callable[[], Any]] = [
        lambda: vllm_module.process_batch(url, ["a", "b"], README_MODEL),
        lambda: vllm_module.format_request_with_params(handler, "x", {"max_tokens": 2}),
        lambda: vllm_module.format_structured_request(
            handler, {"prompt": "x", "context": "c", "options": {"return_logprobs": True}}),
        lambda: vllm_module.get_model_info(url, README_MODEL),
        lambda: vllm_module.optimize_model(url, README_MODEL, optimization_type="speed"),
        lambda: vllm_module.get_model_statistics(url, README_MODEL),
        lambda: vllm_module.process_batch_with_params(url, ["a"], README_MODEL, {"max_tokens": 2}),
        lambda: vllm_module.optimize_model(url, README_MODEL, optimization_type="memory"),
        lambda: vllm_module.process_batch_with_metrics(url, ["a", "b", "c"], README_MODEL),
        lambda: vllm_module.optimize_model(url, README_MODEL, optimization_type="balanced"),
    ]
    for call in calls * 2:  # warm-up: worker pools reach their size once
        call()
    threads, clients = threading.active_count(), len(_live_clients)
    for i in range(100):
        calls[i % len(calls)]()
    print(f"\nthreads {threads} -> {threading.active_count()}, clients {clients} -> {len(_live_clients)}")
    assert threading.active_count() == threads
    assert len(_live_clients) == clients
    assert vllm_module.vllm._default_instance()._client_for(url) is handler.client


def test_the_vllm_client_and_the_runner_use_the_adapters_the_plugin_registered():
    """The plugin is on the data path: no client builds an adapter of its own."""
    from ipfs_accelerate_py.api_backends.plugins import get_backend
    from ipfs_accelerate_py.unified_runner.clients import make_client

    url = "http://127.0.0.1:9"  # nothing is sent
    with VllmClient(base_url=url) as c, VllmClient(base_url=url, api_flavor="legacy") as legacy:
        assert c.adapter is get_backend("vllm")
        assert legacy.adapter is get_backend("vllm-legacy")
    runner_client = make_client("vllm", url, timeout=1.0)
    try:
        assert isinstance(runner_client, VllmClient)
        assert runner_client.adapter is get_backend("vllm")
    finally:
        runner_client.close()


def test_a_third_party_plugin_needs_only_the_public_surface():
    """plugins/openai_compat imports nothing of ours but ``ipfs_accelerate_py.api_backends``,
    and every name it takes from there is in its ``__all__``."""
    import ast

    import ipfs_accelerate_py.api_backends as surface

    root = Path(__file__).resolve().parents[2] / "plugins" / "openai_compat" / "iap_openai_compat"
    taken = set()
    for source in root.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ipfs_accelerate_py"):
                assert node.module == "ipfs_accelerate_py.api_backends", (source.name, node.module)
                taken |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("ipfs_accelerate_py") for a in node.names), source.name
    assert taken and taken <= set(surface.__all__), taken - set(surface.__all__)
