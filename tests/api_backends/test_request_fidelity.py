"""Protocol fidelity: the client validates requests exactly as the real vLLM server does.

The corpus (``data/vllm_request_corpus.json``, built by ``data/make_request_corpus.py``)
holds boundary requests for ``/v1/completions`` and ``/v1/chat/completions``: every numeric
field at, just inside and just outside each bound, every cross-field rule, wrong types,
with the real server's recorded verdict. The differential test sends each one raw to the
real server and through the client's validation; the verdicts must agree, except the
deliberate differences listed below with their reasons. The same recorded verdicts check
the test double without a real server.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import pytest

from ipfs_accelerate_py.api_backends import VllmClient, vllm
from ipfs_accelerate_py.api_backends.context import check_fits_context
from ipfs_accelerate_py.api_backends.default_plugins.vllm_plugin import VllmAdapter
from ipfs_accelerate_py.api_backends.errors import BadRequestError
from ipfs_accelerate_py.api_backends.errors import TimeoutError as ClientTimeout
from ipfs_accelerate_py.api_backends.errors import ValidationError
from ipfs_accelerate_py.api_backends.models import ChatRequest, CompletionRequest, validate_request
from ipfs_accelerate_py.api_backends.vllm import VllmChatRequest, VllmCompletionRequest
from ipfs_accelerate_py.servers.fake_vllm import Fault

DATA = Path(__file__).with_name("data")
sys.path.insert(0, str(DATA))
from make_request_corpus import send  # noqa: E402

CORPUS = json.loads((DATA / "vllm_request_corpus.json").read_text())
CASES = CORPUS["cases"]

#: Cases where the client's verdict differs from the server's on purpose, and why.
_FLAGS = "depends on the server's launch flags, which the client cannot see"
_VOCAB = "token ids in the vocabulary: the client has no tokenizer (non-negative is checked)"
DIFFERENCES: Dict[str, str] = {
    "completions.typo=max_token": "the server ignores unknown fields; the client refuses a "
                                  "misspelt one (did you mean `max_tokens`?): extra_body forwards",
    "chat.typo=max_token": "same as completions.typo=max_token",
    "completions.model=unknown": "which models exist is the server's to say (404)",
    "chat.model=unknown": "which models exist is the server's to say (404)",
    "chat.tools,tool_choice=named": "named tool_choice needs --tool-call-parser: " + _FLAGS,
    "chat.tools,tool_choice=required": "tool_choice=required needs --tool-call-parser: " + _FLAGS,
    "chat.tools,tool_choice=auto": "auto tool choice needs --enable-auto-tool-choice: " + _FLAGS,
    "chat.chat_template": "a request chat template needs --trust-request-chat-template: " + _FLAGS,
    "chat.mm_processor_kwargs": "needs --trust-request-mm-kwargs: " + _FLAGS,
    "completions.thinking_token_budget=5": "needs --reasoning-parser: " + _FLAGS,
    "chat.thinking_token_budget=5": "needs --reasoning-parser: " + _FLAGS,
    "completions.stop_token_ids=out-of-vocab": _VOCAB,
    "chat.stop_token_ids=out-of-vocab": _VOCAB,
    "completions.logit_bias=out-of-vocab": _VOCAB,
    "chat.logit_bias=out-of-vocab": _VOCAB,
    "completions.structured_outputs.regex-invalid": "grammar content is compiled by the "
                                                    "server's guided-decoding backend",
    "chat.structured_outputs.regex-invalid": "grammar content is compiled by the server",
    "chat.role=wizard": "the server takes any role into its template; the client refuses "
                        "roles outside system/user/assistant/tool/developer (a typo would "
                        "silently change the prompt)",
}


def _route_cls(route: str) -> type:
    return VllmCompletionRequest if route == "completions" else VllmChatRequest


def verdict_of(build: Callable[[], Any]) -> Tuple[bool, Optional[str]]:
    """(accepted, refused field): the request ``build`` makes through the client's
    validation, knowing the model's length (as a client does once ``list_models`` told it)."""
    try:
        check_fits_context(build(), CORPUS["max_model_len"])
    except ValidationError as exc:
        return False, exc.field
    return True, None


def client_verdict(case: Dict[str, Any]) -> Tuple[bool, Optional[str]]:
    """A generation case's verdict through the client's validation."""
    return verdict_of(lambda: validate_request(_route_cls(case["route"]), case["body"]))


def test_corpus_is_large_and_covers_both_routes_and_verdicts():
    routes = {c["route"] for c in CASES}
    assert len(CASES) >= 100 and routes == {"completions", "chat"}
    assert sum(c["status"] == 200 for c in CASES) >= 50 and sum(c["status"] != 200 for c in CASES) >= 50
    assert set(DIFFERENCES) <= {c["name"] for c in CASES}, "a listed difference has no case"


def test_client_agrees_with_the_recorded_verdicts_except_the_listed_differences():
    disagree = []
    for case in CASES:
        accepted, field = client_verdict(case)
        server_ok = case["status"] == 200
        if (accepted == server_ok) == (case["name"] in DIFFERENCES):
            disagree.append((case["name"], case["status"], field))
    assert disagree == []


@pytest.mark.real_server
def test_differential_against_the_real_server(real_vllm_server):
    """Every case raw to the server: its verdict must still be the recorded one and agree
    with the client's (listed differences aside); every request the client accepts is
    also sent as the client formats it, and the server must accept that body too."""
    adapter = VllmAdapter()
    base = real_vllm_server.base_url
    agree, formatted, mismatches = 0, 0, []
    for case in CASES:
        status, _ = send(base, case["route"], case["body"])
        accepted, _ = client_verdict(case)
        if status != case["status"]:
            mismatches.append((case["name"], "server moved", case["status"], status))
        if (accepted == (status == 200)) == (case["name"] in DIFFERENCES):
            mismatches.append((case["name"], "client", accepted, status))
        else:
            agree += 1
        if accepted and status == 200:
            request = validate_request(_route_cls(case["route"]), case["body"])
            wire = adapter.format_request(request).json
            wire_status, _ = send(base, case["route"], wire)
            formatted += 1
            if wire_status != 200:
                mismatches.append((case["name"], "formatted body refused", wire, wire_status))
    assert mismatches == []
    assert agree == len(CASES) and formatted >= 100


#: Where the test double does not (yet) model the server's rule, and why that is tolerable.
DOUBLE_GAPS: Dict[str, str] = {
    "completions.echo,max_tokens=0": "the double always generates at least one token; vLLM's "
                                     "echo-only completion (max_tokens 0) is not modelled",
}


def test_the_double_gives_the_recorded_verdicts(fake_server):
    wrong = []
    for case in CASES:
        if case["name"] in DOUBLE_GAPS:
            continue
        status, _ = send(fake_server.base_url, case["route"], case["body"])
        if (status == 200) != (case["status"] == 200):
            wrong.append((case["name"], case["status"], status))
    assert wrong == []


# ----------------------------------------------------------------------------- the client
def _chat_body(**extra: Any) -> Dict[str, Any]:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], **extra}


def test_a_misspelt_field_suggests_the_right_name():
    with pytest.raises(ValidationError) as exc:
        validate_request(CompletionRequest, {"prompt": "Hi", "max_token": 4})
    assert exc.value.field == "max_token" and "did you mean `max_tokens`?" in str(exc.value)
    with pytest.raises(ValidationError) as exc:
        validate_request(ChatRequest, _chat_body(temprature=0.5))
    assert "did you mean `temperature`?" in str(exc.value)


def test_extra_body_is_forwarded_as_is_and_its_keys_logged(fake_server, caplog):
    with VllmClient(base_url=fake_server.base_url, model="tiny-llama") as client:
        with caplog.at_level(logging.DEBUG, logger="ipfs_accelerate_py.api_backends"):
            client.run_inference("tiny-llama", "Hi", {"max_tokens": 2, "extra_body": {
                "brand_new_field": {"x": 1}, "another": "secret-value"}})
            client.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=2,
                                   extra_body={"chat_only_thing": True})
    bodies = [json.loads(r.body) for r in fake_server.requests if r.path.startswith("/v1/")]
    assert bodies[0]["brand_new_field"] == {"x": 1} and bodies[0]["another"] == "secret-value"
    assert "extra_body" not in bodies[0] and bodies[1]["chat_only_thing"] is True
    lines = [r.getMessage() for r in caplog.records if "extra_body" in r.getMessage()]
    assert any("another" in m and "brand_new_field" in m for m in lines)
    assert not any("secret-value" in m for m in lines)  # keys only, never values


def test_extra_body_on_the_stream_handler_and_framework_paths(fake_server):
    url = fake_server.base_url
    with VllmClient(base_url=url, model="tiny-llama") as client:
        assert "".join(client.stream_generation("Hi", max_tokens=2, extra_body={"on_stream": 1}))
        handler = client.create_endpoint_handler("tiny-llama", {"max_tokens": 2})
        assert "error" not in handler({"prompt": "Hi", "parameters": {"extra_body": {"on_handler": 2}}})
    backend = vllm(metadata={"vllm_api_url": url, "vllm_model": "tiny-llama"})
    assert isinstance(backend.generate_text("Hi", max_tokens=2, extra_body={"on_framework": 3}), str)
    bodies = [json.loads(r.body) for r in fake_server.requests if r.path == "/v1/completions"]
    assert [b.get(k) for b, k in zip(bodies, ("on_stream", "on_handler", "on_framework"))] == [1, 2, 3]


def test_extra_body_comes_after_validation_of_the_known_fields(fake_server):
    with VllmClient(base_url=fake_server.base_url) as client:
        with pytest.raises(ValidationError) as exc:
            client.run_inference("tiny-llama", "Hi", {"temperature": 3, "extra_body": {"a": 1}})
        assert exc.value.field == "temperature"
        with pytest.raises(ValidationError) as exc:
            client.run_inference("tiny-llama", "Hi", {"extra_body": ["not", "a", "dict"]})
        assert exc.value.field.startswith("extra_body")
    assert not [r for r in fake_server.requests if r.path.startswith("/v1/completions")]


def test_max_tokens_beyond_the_known_context_is_refused_before_sending(start_fake):
    srv = start_fake(max_model_len=300)
    with VllmClient(base_url=srv.base_url, model="tiny-llama") as client:
        with pytest.raises(BadRequestError):  # length not known yet: the server says it
            client.run_inference("tiny-llama", "Hi", {"max_tokens": 301})
        sent = len([r for r in srv.requests if r.path == "/v1/completions"])
        assert client.list_models()[0]["max_model_len"] == 300
        for call in (lambda: client.run_inference("tiny-llama", "Hi", {"max_tokens": 301}),
                     lambda: client.chat_completion([{"role": "user", "content": "Hi"}],
                                                    max_completion_tokens=301),
                     lambda: list(client.stream_generation("Hi", max_tokens=301))):
            with pytest.raises(ValidationError) as exc:
                call()
            assert "301" in str(exc.value) and "max_model_len=300" in str(exc.value)
        assert client.run_inference("tiny-llama", "Hi", {"max_tokens": 300}).text is not None
    assert len([r for r in srv.requests if r.path == "/v1/completions"]) == sent + 1
    assert not [r for r in srv.requests if r.path == "/v1/chat/completions"]


def test_results_expose_token_ids_and_prompt_logprobs(fake_server):
    with VllmClient(base_url=fake_server.base_url, model="tiny-llama") as client:
        result = client.run_inference("tiny-llama", "Hello world", {
            "max_tokens": 3, "return_token_ids": True, "prompt_logprobs": 1})
    assert len(result.token_ids) == 3 == result.usage.completion_tokens
    assert len(result.prompt_token_ids) == result.usage.prompt_tokens
    assert len(result.prompt_logprobs) == result.usage.prompt_tokens
    assert result.prompt_logprobs[0] is None  # the first token has no context


# ----------------------------------------------------------------------------- framework face
def test_framework_generate_text_returns_the_text(fake_server):
    backend = vllm(metadata={"vllm_api_url": fake_server.base_url, "vllm_model": "tiny-llama"})
    text = backend.generate_text("Hi", max_tokens=4, temperature=0)
    assert isinstance(text, str) and text
    assert text == backend.run_inference(inputs="Hi", max_tokens=4, temperature=0)["text"]


@pytest.mark.parametrize("face", ["client", "framework"])
def test_stream_generation_takes_every_run_inference_call_shape(fake_server, face):
    url = fake_server.base_url
    with VllmClient(base_url=url) as client:
        target = client if face == "client" else vllm(metadata={"vllm_api_url": url})
        expected = client.run_inference("tiny-llama", "Hi", {"max_tokens": 5, "temperature": 0}).text
        shapes = [
            lambda: target.stream_generation(model_id="tiny-llama", inputs="Hi",
                                             parameters={"max_tokens": 5, "temperature": 0}),
            lambda: target.stream_generation("tiny-llama", "Hi",
                                             parameters={"max_tokens": 5, "temperature": 0}),
            lambda: target.stream_generation("Hi", model="tiny-llama", max_tokens=5, temperature=0),
            lambda: target.stream_generation(model="tiny-llama", prompt="Hi", max_tokens=5,
                                             temperature=0),
        ]
        for shape in shapes:
            assert "".join(shape()) == expected
        streamed = [r for r in fake_server.requests if r.path == "/v1/completions"
                    and json.loads(r.body).get("stream")]
        assert len(streamed) == len(shapes)
        assert all("parameters" not in json.loads(r.body) for r in streamed)


def test_handler_timeout_is_the_call_deadline(fake_server):
    fake_server.add_fault(Fault("gate", count=10))  # never answered
    with VllmClient(base_url=fake_server.base_url, timeout=30, max_retries=0) as client:
        handler = client.create_endpoint_handler("tiny-llama", {"timeout": 0.5, "max_tokens": 2})
        start = time.monotonic()
        out = handler("Hi")
        elapsed = time.monotonic() - start
    assert out["error_type"] in (ClientTimeout.__name__, "TimeoutError") and elapsed < 4.0
    with pytest.raises(ValidationError) as exc:
        VllmClient(base_url=fake_server.base_url).create_endpoint_handler(
            "tiny-llama", {"timeout": -1})
    assert exc.value.field == "parameters.timeout"


# ----------------------------------------------------------------------------- on the real server
_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                            "ok": {"type": "boolean"}},
           "required": ["name", "ok"], "additionalProperties": False}


@pytest.mark.real_server
def test_vllm_features_through_the_client_on_the_real_server(real_vllm_server, caplog):
    with VllmClient(base_url=real_vllm_server.base_url, model="tiny-llama") as client:
        choice = client.run_inference("tiny-llama", "Pick one:", {
            "max_tokens": 8, "structured_outputs": {"choice": ["red", "green", "blue"]}})
        assert choice.text in ("red", "green", "blue")

        reply = client.chat_completion([{"role": "user", "content": "A person as JSON"}],
                                       max_tokens=400, temperature=0, response_format={
                                           "type": "json_schema",
                                           "json_schema": {"name": "person", "schema": _SCHEMA}})
        data = json.loads(reply.text)
        assert reply.finish_reason == "stop" and set(data) == {"name", "ok"}
        assert isinstance(data["name"], str) and len(data["name"]) <= 8 and isinstance(data["ok"], bool)

        ids = client.run_inference("tiny-llama", "Hello there", {
            "max_tokens": 4, "return_token_ids": True, "prompt_logprobs": 2})
        assert len(ids.token_ids) == ids.usage.completion_tokens == 4
        assert len(ids.prompt_token_ids) == ids.usage.prompt_tokens
        assert ids.prompt_logprobs[0] is None and len(ids.prompt_logprobs) == ids.usage.prompt_tokens
        chat_ids = client.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=3,
                                          return_token_ids=True, prompt_logprobs=1)
        assert len(chat_ids.token_ids) == 3 and len(chat_ids.prompt_token_ids) == chat_ids.usage.prompt_tokens
        assert len(chat_ids.prompt_logprobs) == chat_ids.usage.prompt_tokens

        # a field the models do not know, carried by extra_body: vLLM's echo-only
        # completion, which extra_body turns on without the client knowing the rule
        with caplog.at_level(logging.DEBUG, logger="ipfs_accelerate_py.api_backends"):
            echoed = client.run_inference("tiny-llama", "Echo me", {
                "max_tokens": 2, "extra_body": {"echo": True, "future_flag": 1}})
        assert echoed.text.startswith("Echo me")
        assert any("future_flag" in r.getMessage() for r in caplog.records)

        model = vllm(metadata={"vllm_api_url": real_vllm_server.base_url})
        assert isinstance(model.generate_text("Hi", model="tiny-llama", max_tokens=3), str)
        pieces = list(model.stream_generation(model_id="tiny-llama", inputs="Once upon",
                                              parameters={"max_tokens": 6, "temperature": 0}))
        assert len(pieces) >= 1 and "".join(pieces) == client.run_inference(
            "tiny-llama", "Once upon", {"max_tokens": 6, "temperature": 0}).text


def test_vllm_only_fields_belong_to_the_vllm_requests_and_a_chat_batch_keeps_them():
    from ipfs_accelerate_py.api_backends.base import build_request
    from ipfs_accelerate_py.api_backends._core.batcher import merge_requests
    from ipfs_accelerate_py.api_backends.vllm import VllmChatBatchRequest

    with pytest.raises(ValidationError) as exc:  # the generic requests are the OpenAI surface
        build_request("Hi", "tiny-llama", {"top_k": 5})
    assert exc.value.field == "top_k" and "extra_body" in str(exc.value)
    adapter = VllmAdapter()
    one = build_request("Hi", "tiny-llama", {"top_k": 5}, adapter=adapter)
    assert isinstance(one, VllmCompletionRequest) and one.top_k == 5
    chats = [build_request([{"role": "user", "content": t}], "tiny-llama",
                           {"top_k": 5, "max_tokens": 2}, adapter=adapter) for t in ("a", "b")]
    merged = merge_requests(chats)
    assert isinstance(merged, VllmChatBatchRequest) and merged.top_k == 5
    body = adapter.format_request(merged).json
    assert body["top_k"] == 5 and [m[0]["content"] for m in body["messages"]] == ["a", "b"]


# ----------------------------------------------------------------------------- an embedding server's routes
from ipfs_accelerate_py.api_backends.operations import build_operation  # noqa: E402
from make_request_corpus import OPERATION_PATHS, send_path  # noqa: E402

OPERATIONS = CORPUS["operations"]["cases"]
#: where the client refuses what the server takes (or the other way round) on purpose, and why
OPERATION_DIFFERENCES: Dict[str, str] = {
    'embed.input="a",normalize=true': "vLLM 0.32 renamed `normalize` to `use_activation` and "
                                      "refuses the old name; the client takes it as an alias and "
                                      "sends `use_activation`",
    'pool.input="a",task="classify"': "which pooling tasks a model serves is the server's to say "
                                      "(an embedding model: embed only)",
    'tokenize.prompt="a",messages=[{"role":"user","cont...': "the server tokenizes the prompt and "
                                                            "silently drops the messages; the client "
                                                            "refuses the ambiguity",
}


def operation_verdict(case: Dict[str, Any]) -> Tuple[bool, Optional[str]]:
    """An operation case's verdict through the client's validation of the raw body."""
    return verdict_of(lambda: build_operation(VllmAdapter(), case["operation"], case["body"]))


def test_the_operations_corpus_covers_every_route_on_both_sides():
    ops = {c["operation"] for c in OPERATIONS}
    assert ops == set(OPERATION_PATHS) and len(OPERATIONS) >= 40
    for op in ops:
        verdicts = {c["status"] == 200 for c in OPERATIONS if c["operation"] == op}
        assert verdicts == {True, False}, op
    assert set(OPERATION_DIFFERENCES) <= {c["name"] for c in OPERATIONS}


def test_client_agrees_with_the_recorded_operation_verdicts():
    disagree = []
    for case in OPERATIONS:
        accepted, field = operation_verdict(case)
        if (accepted == (case["status"] == 200)) == (case["name"] in OPERATION_DIFFERENCES):
            disagree.append((case["name"], case["status"], field))
    assert disagree == []


def test_the_pooling_double_gives_the_recorded_operation_verdicts(start_fake):
    fake = start_fake(runner="pooling", models=("tiny-embed",))
    wrong = []
    for case in OPERATIONS:
        status, _ = send_path(fake.base_url, OPERATION_PATHS[case["operation"]], case["body"])
        if (status == 200) != (case["status"] == 200):
            wrong.append((case["name"], case["status"], status))
    assert wrong == []


@pytest.mark.real_server
def test_operations_differential_against_the_real_embedding_server(real_embed_server):
    """Every operation case raw to the embedding server: the recorded verdict still holds
    and agrees with the client's; a body the client accepts, as the client formats it, is
    accepted too."""
    adapter = VllmAdapter()
    base = real_embed_server.base_url
    mismatches, formatted = [], 0
    for case in OPERATIONS:
        path = OPERATION_PATHS[case["operation"]]
        status, _ = send_path(base, path, case["body"])
        accepted, _ = operation_verdict(case)
        if status != case["status"]:
            mismatches.append((case["name"], "server moved", case["status"], status))
        if (accepted == (status == 200)) == (case["name"] in OPERATION_DIFFERENCES):
            mismatches.append((case["name"], "client", accepted, status))
        if accepted and status == 200:
            wire = adapter.format_request(build_operation(adapter, case["operation"], case["body"])).json
            wire_status, _ = send_path(base, path, wire)
            formatted += 1
            if wire_status != 200:
                mismatches.append((case["name"], "formatted body refused", wire, wire_status))
    assert mismatches == [] and formatted >= 30
