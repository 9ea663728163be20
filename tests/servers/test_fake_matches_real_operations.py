"""Contract test for the double's pooling and LoRA routes: the same requests go to the real
embedding server (``real_embed_server``) or LoRA server (``real_lora_server``) and to a double
set up like it, and the replies must match as in ``test_fake_matches_real.py``: status,
headers, JSON keys in order and types, error messages word for word.

Vectors and scores are model output: only their shapes and types must match (the double's are
hash-seeded unit vectors). ``usage.prompt_tokens`` depends on the tokenizer: each server's must
equal the sum of what its own ``/tokenize`` says for the inputs (with BOS, as vLLM counts).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Iterator, List

import pytest
import requests

from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer
from ipfs_accelerate_py.servers.vllm_cpu import EMBED_MODEL
from test_fake_matches_real import Case, Reply, assert_same_reply, exchange

pytestmark = pytest.mark.real_server

#: keys whose values are model output: shape and type are compared, not the numbers
_MODEL_OUTPUT = frozenset({"embedding", "score", "relevance_score", "data"})
_USAGE = ("prompt_tokens", "total_tokens")
_POOLING = ("/v1/embeddings", "/pooling", "/score", "/rerank")


def _e(name: str, body: Any, path: str = "/v1/embeddings", **kw: Any) -> Case:
    return Case(name, "POST", path, body, **kw)


EMBED_CASES = [
    _e("embed_float", {"input": ["hello world", "fox"], "encoding_format": "float"}),
    _e("embed_base64", {"input": ["hello world", "fox"], "encoding_format": "base64"}),
    _e("embed_single", {"input": "hello", "model": EMBED_MODEL}),
    _e("embed_empty_text", {"input": ""}),
    _e("embed_token_ids", {"input": [1, 20, 30]}),
    _e("embed_request_id", {"input": "hello"}, headers={"X-Request-Id": "rid-42"}),
    _e("embed_float16", {"input": "hello", "encoding_format": "base64", "embed_dtype": "float16"}),
    _e("embed_truncate", {"input": "the quick brown fox", "truncate_prompt_tokens": 2}),
    _e("embed_no_activation", {"input": "hello", "use_activation": False}),
    _e("embed_empty_list", {"input": []}),
    _e("embed_empty_ids", {"input": [[]]}),
    _e("embed_bad_token", {"input": [-1]}),
    _e("embed_dimensions", {"input": "a", "dimensions": 8}),
    _e("embed_normalize", {"input": "a", "normalize": True}),
    _e("embed_truncate_zero", {"input": "a", "truncate_prompt_tokens": 0}),
    _e("embed_truncate_left", {"input": "the quick brown fox", "truncate_prompt_tokens": 3, "truncation_side": "left"}),
    _e("embed_truncate_too_long", {"input": "a", "truncate_prompt_tokens": 513}),
    _e("embed_salt_empty", {"input": "a", "cache_salt": ""}),
    _e("embed_salt_long", {"input": "a", "cache_salt": "x" * 129}),
    _e("embed_unknown_model", {"input": "a", "model": "no-such-model"}),
    _e("pooling", {"input": ["hello", "fox"]}, "/pooling"),
    _e("pooling_request_id", {"input": "hello"}, "/pooling", headers={"X-Request-Id": "rid-43"}),
    _e("score_1_n", {"text_1": "hello", "text_2": ["hello", "world", "fox"]}, "/score"),
    _e("score_n_n", {"text_1": ["a", "b"], "text_2": ["a", "c"]}, "/score"),
    _e("score_lengths", {"text_1": ["a", "b"], "text_2": ["a", "c", "d"]}, "/score"),
    _e("score_no_text_1", {"text_1": [], "text_2": ["a"]}, "/score"),
    _e("score_no_text_2", {"text_1": "a", "text_2": []}, "/score"),
    _e("rerank", {"query": "hello", "documents": ["world", "hello there", "fox"]}, "/rerank"),
    _e("rerank_top_n", {"query": "hello", "documents": ["world", "hello there", "fox"], "top_n": 2}, "/rerank",
       headers={"X-Request-Id": "rid-44"}),
    _e("rerank_one_document", {"query": "hello", "documents": "single"}, "/rerank"),
    _e("rerank_no_documents", {"query": "hello", "documents": []}, "/rerank"),
    _e("rerank_top_n_negative", {"query": "hello", "documents": ["a"], "top_n": -1}, "/rerank"),
    _e("classify_missing", {"input": "a"}, "/classify"),
    _e("completions_missing", {"prompt": "a"}, "/v1/completions"),
    _e("chat_missing", {"messages": [{"role": "user", "content": "a"}]}, "/v1/chat/completions"),
    Case("embed_models", "GET", "/v1/models"),
]


def _blank(value: Any, free: bool = False) -> Any:
    """``value`` with model output replaced by placeholders of the same kind and shape."""
    if isinstance(value, dict):
        return {k: _blank(v, free or k in _MODEL_OUTPUT) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank(v, free) for v in value]
    if free and isinstance(value, float):
        return 0.0
    if free and isinstance(value, str):
        return ""
    return value


def _tokens(url: str, text: Any) -> int:
    if not isinstance(text, str):
        return len(text)  # token ids
    return int(requests.post(url + "/tokenize", json={"prompt": text}, timeout=60).json()["count"])


def _expected_prompt_tokens(url: str, case: Case) -> int:
    body = case.body
    if "input" in body:
        items = body["input"] if isinstance(body["input"], list) and not all(
            isinstance(i, int) for i in body["input"]) else [body["input"]]
        if body.get("truncate_prompt_tokens"):
            return sum(min(_tokens(url, i), body["truncate_prompt_tokens"]) for i in items)
        return sum(_tokens(url, i) for i in items)
    # an embedding model embeds each text once (a lone text_1 or query is counted once)
    left, right = (body["text_1"], body["text_2"]) if "text_1" in body else (body["query"], body["documents"])
    texts = [*([left] if isinstance(left, str) else left), *([right] if isinstance(right, str) else right)]
    return sum(_tokens(url, t) for t in texts)


def _comparable(reply: Reply, url: str, case: Case) -> Reply:
    """The reply with its model output blanked, after its usage was checked against its own
    tokenizer."""
    if reply.status != 200 or reply.headers.get("content-type") != "application/json" or case.path not in _POOLING:
        return reply
    body = json.loads(reply.body)
    usage = body.get("usage")
    if isinstance(usage, dict):
        assert usage["prompt_tokens"] == usage["total_tokens"] == _expected_prompt_tokens(url, case), (case.name, usage)
        body["usage"] = {k: (0 if k in _USAGE else v) for k, v in usage.items()}
    results = body.get("results")
    if isinstance(results, list):  # which documents come first is model output: check the order's rules
        scores = [r["relevance_score"] for r in results]
        assert scores == sorted(scores, reverse=True), (case.name, scores)
        assert len({r["index"] for r in results}) == len(results), case.name
        body["results"] = [dict(r, index=0) for r in results]
    blanked = json.dumps(_blank(body), separators=(",", ":")).encode()
    return dataclasses.replace(reply, body=blanked)


def _compare(real_url: str, fake_url: str, case: Case) -> None:
    real = _comparable(exchange(real_url, case), real_url, case)
    fake = _comparable(exchange(fake_url, case), fake_url, case)
    assert_same_reply(real, fake, case)


@pytest.fixture(scope="module")
def embed_fake(real_embed_server: Any) -> Iterator[FakeVllmServer]:
    root = requests.get(real_embed_server.base_url + "/v1/models", timeout=60).json()["data"][0]["root"]
    with FakeVllmServer(models=(EMBED_MODEL,), runner="pooling", root=root) as fake:
        yield fake


@pytest.mark.parametrize("case", EMBED_CASES, ids=[c.name for c in EMBED_CASES])
def test_pooling_routes_match_real(case: Case, real_embed_server: Any, embed_fake: FakeVllmServer) -> None:
    _compare(real_embed_server.base_url, embed_fake.base_url, case)


def test_lora_routes_match_real(real_lora_server: Any, tiny_lora_path: str) -> None:
    """One sequence, in order (the routes change the server's state): load, list, use,
    the refusals, unload."""
    load = {"lora_name": "contract-lora", "lora_path": tiny_lora_path}
    steps: List[Case] = [
        _e("lora_load", load, "/v1/load_lora_adapter"),
        _e("lora_load_again", load, "/v1/load_lora_adapter"),
        _e("lora_load_missing_path", {"lora_name": "x", "lora_path": "/nonexistent"}, "/v1/load_lora_adapter"),
        _e("lora_load_empty_name", {"lora_name": "", "lora_path": tiny_lora_path}, "/v1/load_lora_adapter"),
        _e("lora_load_no_path", {"lora_name": "x"}, "/v1/load_lora_adapter"),
        Case("lora_models", "GET", "/v1/models"),
        _e("lora_completion", {"model": "contract-lora", "prompt": [1, 20, 30], "max_tokens": 4, "temperature": 0},
           "/v1/completions", loose=frozenset({"choices.0.text"})),
        _e("lora_unload", {"lora_name": "contract-lora"}, "/v1/unload_lora_adapter"),
        _e("lora_unload_again", {"lora_name": "contract-lora"}, "/v1/unload_lora_adapter"),
        _e("lora_completion_after", {"model": "contract-lora", "prompt": [1, 20], "max_tokens": 2},
           "/v1/completions"),
    ]
    root = requests.get(real_lora_server.base_url + "/v1/models", timeout=60).json()["data"]
    with FakeVllmServer(models=[m["id"] for m in root], enable_lora=True, root=root[0]["root"]) as fake:
        for case in steps:
            _compare(real_lora_server.base_url, fake.base_url, case)
