"""Bad input gets a typed error naming the field, and nothing goes on the wire.

Each case is called against a listener that counts TCP connections: after the corpus has
run, the count must still be zero.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import pytest

from ipfs_accelerate_py.api_backends import VllmClient, errors, vllm
from ipfs_accelerate_py.api_backends.settings import ClientSettings

TEN_MB = "x" * (10 * 1024 * 1024)

# (id, call(client) -> Any, field the error must name)
Case = Tuple[str, Callable[[VllmClient], Any], str]


def _ri(inputs: Any, **params: Any) -> Callable[[VllmClient], Any]:
    return lambda c: c.run_inference("tiny-llama", inputs, params)


CASES: List[Case] = [
    # inputs: types and shapes
    ("inputs-none", _ri(None), "inputs"),
    ("inputs-int", _ri(42), "inputs"),
    ("inputs-float", _ri(1.5), "inputs"),
    ("inputs-dict", _ri({"prompt": "hi"}), "inputs"),
    ("inputs-bytes", _ri(b"hello"), "inputs"),
    ("inputs-empty-list", _ri([]), "prompt"),
    ("inputs-mixed-list", _ri(["a", 1]), "prompt"),
    ("inputs-nested-dict-in-list", _ri(["a", {"x": 1}]), "inputs"),
    ("inputs-list-of-none", _ri([None]), "prompt"),
    ("inputs-negative-token-ids", _ri([1, -2, 3]), "prompt"),
    ("inputs-bool-token-ids", _ri([True, False]), "prompt"),
    ("inputs-10MB", _ri(TEN_MB), "prompt"),
    ("inputs-lone-surrogate", _ri("bad \ud800 text"), "prompt"),
    ("inputs-list-lone-surrogate", _ri(["ok", "\udfff"]), "prompt"),
    ("inputs-too-many-prompts", _ri(["p"] * 5000), "prompt"),
    # sampling ranges
    ("max_tokens-negative", _ri("hi", max_tokens=-3), "max_tokens"),
    ("max_tokens-zero", _ri("hi", max_tokens=0), "max_tokens"),
    ("max_tokens-huge", _ri("hi", max_tokens=10 ** 12), "max_tokens"),
    ("max_tokens-string", _ri("hi", max_tokens="many"), "max_tokens"),
    ("max_tokens-float-fraction", _ri("hi", max_tokens=3.5), "max_tokens"),
    ("max_tokens-dict", _ri("hi", max_tokens={"n": 1}), "max_tokens"),
    ("temperature-negative", _ri("hi", temperature=-1), "temperature"),
    ("temperature-nan", _ri("hi", temperature=math.nan), "temperature"),
    ("temperature-inf", _ri("hi", temperature=math.inf), "temperature"),
    ("temperature-string", _ri("hi", temperature="hot"), "temperature"),
    ("temperature-huge", _ri("hi", temperature=1e9), "temperature"),
    ("top_p-zero", _ri("hi", top_p=0), "top_p"),
    ("top_p-above-one", _ri("hi", top_p=1.5), "top_p"),
    ("top_p-neg-inf", _ri("hi", top_p=-math.inf), "top_p"),
    ("top_k-below-minus-one", _ri("hi", top_k=-5), "top_k"),
    ("n-zero", _ri("hi", n=0), "n"),
    ("n-greedy-two", _ri("hi", n=2, temperature=0), "n"),
    ("n-huge", _ri("hi", n=16_385), "n"),  # VLLM_MAX_N_SEQUENCES is 16384
    ("logprobs-too-many", _ri("hi", logprobs=100), "logprobs"),
    ("presence_penalty-range", _ri("hi", presence_penalty=5), "presence_penalty"),
    ("frequency_penalty-nan", _ri("hi", frequency_penalty=math.nan), "frequency_penalty"),
    ("repetition_penalty-zero", _ri("hi", repetition_penalty=0), "repetition_penalty"),
    ("seed-too-big", _ri("hi", seed=2 ** 70), "seed"),
    ("stop-empty-string", _ri("hi", stop=""), "stop"),
    ("stop-nested-dict", _ri("hi", stop={"a": 1}), "stop"),
    ("min_tokens-over-max", _ri("hi", max_tokens=2, min_tokens=5), "min_tokens"),
    ("stream_options-without-stream", _ri("hi", stream_options={"include_usage": True}), "stream_options"),
    ("unknown-parameter", _ri("hi", temprature=0.5), "temprature"),
    ("model-dict", lambda c: c.run_inference({"id": "x"}, "hi"), "model"),
    ("model-empty", lambda c: c.run_inference("", "hi"), "model"),
    ("parameters-list", lambda c: c.run_inference("tiny-llama", "hi", ["max_tokens"]), "parameters"),
    ("priority-out-of-range", lambda c: c.run_inference("tiny-llama", "hi", None, priority=7), "priority"),
    ("priority-string", lambda c: c.run_inference("tiny-llama", "hi", None, priority="HIGH"), "priority"),
    # chat messages
    ("chat-role-unknown", _ri([{"role": "wizard", "content": "hi"}]), "role"),
    ("chat-content-dict", _ri([{"role": "user", "content": {"text": "hi"}}]), "content"),
    ("chat-extra-key", _ri([{"role": "user", "content": "hi", "mood": "x"}]), "mood"),
    ("chat-content-surrogate", _ri([{"role": "user", "content": "\ud834"}]), "content"),
    ("chat-messages-not-list", lambda c: c.chat_completion("hello"), "messages"),
    ("chat-empty", lambda c: c.chat_completion([]), "messages"),
    ("chat-top-logprobs-without-logprobs", _ri([{"role": "user", "content": "x"}], top_logprobs=2), "top_logprobs"),
    ("generate_text-not-string", lambda c: c.generate_text(["a"]), "prompt"),
]

# Settings that must be refused when a client is built (nothing can be sent without one).
SETTINGS_CASES: List[Tuple[str, Dict[str, Any], str]] = [
    ("url-no-scheme", {"base_url": "localhost:8000"}, "base_url"),
    ("url-ftp", {"base_url": "ftp://127.0.0.1:8000"}, "base_url"),
    ("url-bad-port", {"base_url": "http://127.0.0.1:99999"}, "base_url"),
    ("url-port-text", {"base_url": "http://127.0.0.1:abc"}, "base_url"),
    ("url-newline", {"base_url": "http://127.0.0.1:8000/\r\nX-Evil: 1"}, "base_url"),
    ("url-space", {"base_url": "http://exa mple.com"}, "base_url"),
    ("url-empty", {"base_url": ""}, "base_url"),
    ("url-credentials", {"base_url": "http://user:pw@127.0.0.1:8000"}, "base_url"),
    ("header-newline", {"extra_headers": {"X-A": "v\r\nInjected: 1"}}, "extra_headers"),
    ("header-name-colon", {"extra_headers": {"X:B": "v"}}, "extra_headers"),
    ("key-newline", {"api_key": "sk-abc\nX-Injected: 1"}, "api_key"),
    ("timeout-negative", {"timeout": -1}, "timeout"),
    ("timeout-nan", {"timeout": math.nan}, "timeout"),
    ("max_retries-negative", {"max_retries": -1}, "max_retries"),
    ("max_concurrent-zero", {"max_concurrent_requests": 0}, "max_concurrent_requests"),
    ("unknown-setting", {"max_retires": 3}, "max_retires"),
]


@pytest.mark.parametrize("case_id,call,field", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_sending(case_id, call, field, listener_client, counting_listener):
    with pytest.raises(errors.ValidationError) as info:
        call(listener_client)
    err = info.value
    assert err.field is not None and field in err.field, (case_id, err.field, str(err))
    assert field in str(err)
    assert counting_listener.connections == 0


@pytest.mark.parametrize("case_id,settings,field", SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES])
def test_bad_settings_are_refused(case_id, settings, field, counting_listener):
    with pytest.raises(errors.ConfigurationError) as info:
        VllmClient(**settings)
    assert field in (info.value.field or ""), (case_id, info.value.field, str(info.value))
    assert "sk-abc" not in str(info.value)
    assert counting_listener.connections == 0


def test_environment_values_are_validated_and_named():
    with pytest.raises(errors.ConfigurationError) as info:
        ClientSettings.from_env("VLLM_", environ={"VLLM_MAX_RETRIES": "lots"})
    assert info.value.field == "VLLM_MAX_RETRIES"


def test_framework_backend_rejects_bad_metadata():
    with pytest.raises(errors.ValidationError):
        vllm(metadata="http://127.0.0.1:8000")
    with pytest.raises(errors.ConfigurationError):
        vllm(metadata={"vllm_api_url": "not a url"})


def test_corpus_is_large_enough():
    assert len(CASES) + len(SETTINGS_CASES) >= 50
