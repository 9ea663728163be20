"""Embeddings, scores, reranking, pooling, tokens and LoRA adapters on both faces, against the
test double (``runner="pooling"`` / ``enable_lora``): typed results equal to the raw replies,
the same pipeline as completions (retries, metrics, routing), bad input refused before
anything is sent. The real servers' side is ``test_operations_real.py``."""

from __future__ import annotations

import asyncio
import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import requests

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.operations import EmbeddingResult
from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer, Fault
from ipfs_accelerate_py.servers.vllm_cpu import EMBED_MODEL, make_tiny_lora
from support import wait_until

TEXTS = ["hello world", "the quick brown fox", "hello"]


@pytest.fixture
def embed_fake(start_fake: Callable[..., FakeVllmServer]) -> FakeVllmServer:
    return start_fake(models=(EMBED_MODEL,), runner="pooling")


@pytest.fixture
def embed_client(embed_fake: FakeVllmServer, make_client: Callable[..., VllmClient]) -> VllmClient:
    return make_client(embed_fake, model=EMBED_MODEL)


def _raw(server: FakeVllmServer, path: str, body: Dict[str, Any]) -> Any:
    r = requests.post(server.base_url + path, json=body, timeout=5)
    r.raise_for_status()
    return r.json()


def _sent(server: FakeVllmServer, path: str) -> Dict[str, Any]:
    return [r for r in server.requests if r.path == path][-1].json


# ------------------------------------------------------------------ embeddings
def test_embed_vectors_equal_the_raw_float_reply_and_go_as_base64(
        embed_fake: FakeVllmServer, embed_client: VllmClient) -> None:
    result = embed_client.embed(TEXTS)
    sent = _sent(embed_fake, "/v1/embeddings")
    raw = _raw(embed_fake, "/v1/embeddings", {"input": TEXTS})
    expected = np.array([d["embedding"] for d in raw["data"]], dtype=np.float32)
    assert isinstance(result, EmbeddingResult)
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (3, 64)
    np.testing.assert_allclose(result.vectors, expected, atol=1e-6)
    assert sent["encoding_format"] == "base64"
    assert result.usage.prompt_tokens == raw["usage"]["prompt_tokens"] > 0
    assert result.model == EMBED_MODEL and len(result) == 3


def test_embed_float_and_float16_and_big_endian_decode_alike(embed_client: VllmClient) -> None:
    as_b64 = embed_client.embed(TEXTS).vectors
    np.testing.assert_array_equal(embed_client.embed(TEXTS, encoding_format="float").vectors, as_b64)
    np.testing.assert_array_equal(embed_client.embed(TEXTS, endianness="big").vectors, as_b64)
    half = embed_client.embed(TEXTS, embed_dtype="float16").vectors
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, as_b64, atol=2e-3)


def test_embed_keeps_input_order_when_the_reply_is_shuffled(
        embed_fake: FakeVllmServer, embed_client: VllmClient) -> None:
    raw = _raw(embed_fake, "/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"})
    shuffled = dict(raw, data=list(reversed(raw["data"])))
    embed_fake.add_fault(Fault("bad_body", body=json.dumps(shuffled).encode(), count=1))
    vectors = embed_client.embed(TEXTS).vectors
    for i, item in enumerate(raw["data"]):
        np.testing.assert_array_equal(vectors[i], np.frombuffer(base64.b64decode(item["embedding"]), "<f4"))


def test_normalize_goes_as_use_activation(embed_fake: FakeVllmServer, embed_client: VllmClient) -> None:
    raw = embed_client.embed("hello", normalize=False).vectors[0]
    assert _sent(embed_fake, "/v1/embeddings")["use_activation"] is False
    assert "normalize" not in _sent(embed_fake, "/v1/embeddings")
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 1e-3  # not normalised
    assert abs(float(np.linalg.norm(embed_client.embed("hello").vectors[0])) - 1.0) < 1e-5


def test_embed_is_retried_and_counted_like_any_request(
        embed_fake: FakeVllmServer, embed_client: VllmClient) -> None:
    embed_fake.add_fault(Fault("status", status=503, count=1))
    assert embed_client.embed("hello").vectors.shape == (1, 64)
    assert embed_fake.request_count["/v1/embeddings"] == 2
    assert embed_fake.retries_seen == 1
    metrics = embed_client.get_metrics()
    assert metrics["requests"] == 1 and metrics["retries"] == 1 and metrics["successes"] == 1


def test_embed_routes_over_endpoints(start_fake: Callable[..., FakeVllmServer],
                                     make_client: Callable[..., VllmClient]) -> None:
    a, b = start_fake(models=(EMBED_MODEL,), runner="pooling"), start_fake(models=(EMBED_MODEL,), runner="pooling")
    client = make_client(a, model=EMBED_MODEL, routing="round-robin")
    client.add_endpoint("b", base_url=b.base_url)
    for _ in range(4):
        client.embed("hello")
    assert a.request_count["/v1/embeddings"] == 2 and b.request_count["/v1/embeddings"] == 2


def test_server_errors_are_typed(embed_client: VllmClient) -> None:
    with pytest.raises(errors.BadRequestError, match="Matryoshka"):
        embed_client.embed("hello", dimensions=8)
    with pytest.raises(errors.NotFoundError):
        embed_client.embed("hello", model="no-such-model")


# ------------------------------------------------------------------ score, rerank, pool
def test_score_and_rerank_equal_the_raw_replies(embed_fake: FakeVllmServer, embed_client: VllmClient) -> None:
    scores = embed_client.score("hello", TEXTS).scores
    raw = _raw(embed_fake, "/score", {"text_1": "hello", "text_2": TEXTS})
    assert scores == [d["score"] for d in raw["data"]]
    assert scores[2] == pytest.approx(1.0)  # "hello" against itself
    ranked = embed_client.rerank("hello", TEXTS, top_n=2).results
    raw = _raw(embed_fake, "/rerank", {"query": "hello", "documents": TEXTS, "top_n": 2})
    assert [(r.index, r.relevance_score, r.document) for r in ranked] == [
        (r["index"], r["relevance_score"], r["document"]["text"]) for r in raw["results"]]
    assert ranked[0].index == 2 and len(ranked) == 2


def test_pool_returns_the_pooled_vectors(embed_fake: FakeVllmServer, embed_client: VllmClient) -> None:
    pooled = embed_client.pool(TEXTS[:2])
    raw = _raw(embed_fake, "/pooling", {"input": TEXTS[:2]})
    assert [a.tolist() for a in pooled.arrays] == [
        np.asarray(d["data"], np.float32).tolist() for d in raw["data"]]


# ------------------------------------------------------------------ tokens
def test_tokenize_detokenize_round_trip(fake_server: FakeVllmServer, make_client: Callable[..., VllmClient]) -> None:
    client = make_client(fake_server)
    tokens = client.tokenize("hello world").tokens
    assert tokens == _raw(fake_server, "/tokenize", {"prompt": "hello world", "model": "tiny-llama"})["tokens"]
    text = client.detokenize(tokens[1:])  # without BOS: the text tokenizes back to the ids
    assert client.tokenize(text).tokens == tokens
    assert client.detokenize(tokens).startswith("<s>")
    chat = client.tokenize([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert chat.count == len(chat.tokens) > len(client.tokenize("hi").tokens)


# ------------------------------------------------------------------ LoRA adapters
def test_lora_load_use_unload(start_fake: Callable[..., FakeVllmServer], make_client: Callable[..., VllmClient],
                              tmp_path: Path) -> None:
    server = start_fake(enable_lora=True)
    client = make_client(server)
    path = str(make_tiny_lora(tmp_path / "ad1"))
    loaded = client.load_lora_adapter("ad1", path)
    assert loaded.name == "ad1" and "added successfully" in loaded.message
    assert "model" not in _sent(server, "/v1/load_lora_adapter")
    assert {"id": "ad1", "parent": "tiny-llama"}.items() <= {
        k: v for m in client.list_models() if m["id"] == "ad1" for k, v in m.items()}.items()
    through = client.run_inference("ad1", "Hello", {"max_tokens": 6, "temperature": 0})
    base = client.run_inference("tiny-llama", "Hello", {"max_tokens": 6, "temperature": 0})
    assert through.model == "ad1" and through.text != base.text
    with pytest.raises(errors.BadRequestError, match="already been loaded"):
        client.load_lora_adapter("ad1", path)
    client.unload_lora_adapter("ad1")
    with pytest.raises(errors.NotFoundError):
        client.run_inference("ad1", "Hello", {"max_tokens": 2})


# ------------------------------------------------------------------ the async face
def test_async_twins_give_what_the_sync_calls_give(embed_client: VllmClient) -> None:
    async def main() -> Any:
        return await asyncio.gather(embed_client.aembed(TEXTS), embed_client.ascore("hello", TEXTS),
                                    embed_client.arerank("hello", TEXTS), embed_client.apool("hello"),
                                    embed_client.atokenize("hello"), embed_client.adetokenize([1, 2]))

    emb, score, rerank, pool, tok, text = asyncio.run(main())
    np.testing.assert_array_equal(emb.vectors, embed_client.embed(TEXTS).vectors)
    assert score.scores == embed_client.score("hello", TEXTS).scores
    assert rerank.results == embed_client.rerank("hello", TEXTS).results
    assert pool.data == embed_client.pool("hello").data
    assert tok.tokens == embed_client.tokenize("hello").tokens
    assert text == embed_client.detokenize([1, 2])


def test_async_lora_twins(start_fake: Callable[..., FakeVllmServer], make_client: Callable[..., VllmClient],
                          tmp_path: Path) -> None:
    server = start_fake(enable_lora=True)
    client = make_client(server)
    path = str(make_tiny_lora(tmp_path / "ad2"))

    async def main() -> None:
        await client.aload_lora_adapter("ad2", path)
        assert "ad2" in server.adapters
        await client.aunload_lora_adapter("ad2")

    asyncio.run(main())
    assert server.adapters == {}


# ------------------------------------------------------------------ refused before sending
@pytest.mark.parametrize("call, field", [
    (lambda c: c.embed([]), "input"),
    (lambda c: c.embed([[1], []]), "input"),
    (lambda c: c.embed(None), "input"),
    (lambda c: c.embed("a", dimensions=0), "dimensions"),
    (lambda c: c.embed("a", truncate_prompt_tokens=-2), "truncate_prompt_tokens"),
    (lambda c: c.embed("a", truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (lambda c: c.embed("a", encoding_format="bytes"), "encoding_format"),
    (lambda c: c.embed("a", cache_salt=""), "cache_salt"),
    (lambda c: c.embed("a", cache_salt="x" * 129), "cache_salt"),
    (lambda c: c.embed("a", nromalize=True), "nromalize"),
    (lambda c: c.embed("a", normalize=True, use_activation=False), "normalize"),
    (lambda c: c.embed([-1]), "input"),
    (lambda c: c.score("a", []), "text_2"),
    (lambda c: c.score([], "a"), "text_1"),
    (lambda c: c.score(["a", "b"], ["a", "b", "c"]), "text_2"),
    (lambda c: c.rerank("q", []), "documents"),
    (lambda c: c.rerank("q", ["a"], top_n=-1), "top_n"),
    (lambda c: c.rerank(None, ["a"]), "query"),
    (lambda c: c.tokenize(42), "prompt"),
    (lambda c: c.tokenize("hi", add_generation_prompt=True), "prompt"),
    (lambda c: c.detokenize([-1]), "tokens"),
    (lambda c: c.detokenize("12"), "tokens"),
    (lambda c: c.load_lora_adapter("", "/x"), "lora_name"),
    (lambda c: c.load_lora_adapter("a", ""), "lora_path"),
    (lambda c: c.unload_lora_adapter(""), "lora_name"),
])
def test_bad_input_is_refused_before_sending(listener_client: VllmClient, counting_listener: Any,
                                             call: Callable[[VllmClient], Any], field: str) -> None:
    with pytest.raises(errors.ValidationError) as info:
        call(listener_client)
    assert info.value.field.split(".")[0] == field
    assert counting_listener.connections == 0


def test_truncation_beyond_a_known_context_is_refused(embed_fake: FakeVllmServer, embed_client: VllmClient) -> None:
    embed_client.list_models()  # learns max_model_len 512
    with pytest.raises(errors.ValidationError) as info:
        embed_client.embed("hello", truncate_prompt_tokens=513)
    assert info.value.field == "truncate_prompt_tokens" and "512" in str(info.value)
    assert embed_fake.request_count["/v1/embeddings"] == 0


def test_a_backend_without_the_route_says_so(counting_listener: Any) -> None:
    with VllmClient(base_url=counting_listener.base_url, api_flavor="legacy") as client:
        with pytest.raises(errors.ConfigurationError, match="does not serve embed"):
            client.embed("hello")
    assert counting_listener.connections == 0


# ------------------------------------------------------------------ the framework face
def test_framework_face_and_module_level_calls_return_plain_values(embed_fake: FakeVllmServer,
                                                                   embed_client: VllmClient) -> None:
    import importlib

    module = importlib.import_module("ipfs_accelerate_py.api_backends.vllm")
    backend = module.vllm(metadata={"vllm_api_url": embed_fake.base_url, "vllm_model": EMBED_MODEL})
    out = backend.embed(TEXTS)
    assert out["embeddings"] == embed_client.embed(TEXTS).vectors.tolist() and out["model"] == EMBED_MODEL
    url = embed_fake.base_url
    assert module.embed(TEXTS, model=EMBED_MODEL, endpoint_url=url)["embeddings"] == out["embeddings"]
    assert module.score("hello", TEXTS, model=EMBED_MODEL, endpoint_url=url)["scores"] == \
        embed_client.score("hello", TEXTS).scores
    ranked = module.rerank("hello", TEXTS, top_n=1, model=EMBED_MODEL, endpoint_url=url)["results"]
    assert ranked == [r.model_dump() for r in embed_client.rerank("hello", TEXTS, top_n=1).results]
    tokens = module.tokenize("hello", model=EMBED_MODEL, endpoint_url=url)
    assert tokens["tokens"] == embed_client.tokenize("hello").tokens and tokens["count"] == len(tokens["tokens"])
    assert module.detokenize(tokens["tokens"], model=EMBED_MODEL, endpoint_url=url) == \
        embed_client.detokenize(tokens["tokens"])


def test_an_operation_gets_its_own_span(embed_client: VllmClient, embed_fake: FakeVllmServer, request: Any) -> None:
    pytest.importorskip("opentelemetry.sdk")
    otel = request.getfixturevalue("otel")
    result = embed_client.embed(TEXTS)
    spans = otel.named(f"embed {EMBED_MODEL}")
    assert len(spans) == 1
    attrs = spans[0].attributes
    assert attrs["gen_ai.operation.name"] == "embed"
    assert attrs["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens > 0
    assert "traceparent" in _sent_headers(embed_fake, "/v1/embeddings")


def _sent_headers(server: FakeVllmServer, path: str) -> Dict[str, str]:
    return [r for r in server.requests if r.path == path][-1].headers


# ------------------------------------------------------------------ shared embedding calls
def _alone(server: FakeVllmServer, text: Any) -> np.ndarray:
    raw = _raw(server, "/v1/embeddings", {"input": text})
    return np.array([d["embedding"] for d in raw["data"]], dtype=np.float32)


@pytest.mark.parametrize("face", ["sync", "async"])
def test_concurrent_embed_callers_share_calls_and_each_gets_its_own_vectors(
        embed_fake: FakeVllmServer, make_client: Callable[..., VllmClient], face: str) -> None:
    """64 callers (texts and lists of texts) with equal options share a few calls; every
    caller's rows equal what its input gets alone, and the calls' usage adds up."""
    inputs: List[Any] = [f"caller {i} text" if i % 3 else [f"caller {i} a", f"caller {i} b"]
                         for i in range(64)]
    client = make_client(embed_fake, model=EMBED_MODEL, max_batch_size=16, batch_linger=0.5,
                         batch_timeout=5.0, max_concurrent_requests=2)
    if face == "sync":
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(client.embed, inputs))
    else:
        async def all_of_them() -> List[Any]:
            return list(await asyncio.gather(*(client.aembed(x) for x in inputs)))
        results = asyncio.run(all_of_them())
    for x, r in zip(inputs, results):
        np.testing.assert_allclose(r.vectors, _alone(embed_fake, x), atol=1e-6)
    calls = [q.json for q in embed_fake.requests if q.path == "/v1/embeddings"]
    shared = [c for c in calls if isinstance(c["input"], list) and len(c["input"]) > 2]
    metrics = client.get_metrics()
    assert shared and metrics["batches"] >= 1 and metrics["batch_mismatches"] == 0
    assert sum(r.usage.prompt_tokens for r in results) == sum(
        _raw(embed_fake, "/v1/embeddings", {"input": x})["usage"]["prompt_tokens"] for x in inputs)


def test_a_shared_embedding_reply_missing_a_vector_is_never_split(
        embed_fake: FakeVllmServer, make_client: Callable[..., VllmClient]) -> None:
    """A reply with fewer vectors than inputs is a ReplyMismatchError: its callers are sent
    alone and each still gets its own vector; the endpoint stops sharing."""
    client = make_client(embed_fake, model=EMBED_MODEL, max_batch_size=8, batch_linger=0.5,
                         batch_timeout=5.0, max_concurrent_requests=1)
    embed_fake.add_fault(Fault("gate", count=1, path="/v1/embeddings"))  # hold the first call
    texts = [f"text {i}" for i in range(8)]
    with ThreadPoolExecutor(len(texts) + 1) as pool:
        first = pool.submit(client.embed, "held")
        embed_fake.wait_held(1)
        futures = [pool.submit(client.embed, t) for t in texts]
        wait_until(lambda: len(client.request_queue) == len(texts), what="the callers queued")
        embed_fake.add_fault(Fault("bad_body", count=1, path="/v1/embeddings",
                                   body=json.dumps({"object": "list", "data": [
                                       {"object": "embedding", "index": 0, "embedding": [0.0] * 64}],
                                       "model": EMBED_MODEL, "usage": {"prompt_tokens": 1,
                                                                       "total_tokens": 1}}).encode()))
        embed_fake.release_stalls()
        assert first.result(10).vectors.shape == (1, 64)
        results = [f.result(10) for f in futures]
    for t, r in zip(texts, results):
        np.testing.assert_allclose(r.vectors, _alone(embed_fake, t), atol=1e-6)
    assert client.get_metrics()["batch_mismatches"] == 1


# ------------------------------------------------------------------ the framework's handler
def test_the_framework_handler_of_an_embedding_model_returns_vectors(
        embed_fake: FakeVllmServer) -> None:
    """create_vllm_endpoint_handler for an embedding model: the first call learns that the
    server has no generation route (its 404) and embeds from then on; a list gives a list."""
    from ipfs_accelerate_py.api_backends import vllm as framework

    backend = framework(metadata={"vllm_api_url": embed_fake.base_url})
    handler = backend.create_vllm_endpoint_handler(embed_fake.base_url, EMBED_MODEL)
    one = handler("hello world")
    np.testing.assert_allclose(one["embedding"], _alone(embed_fake, "hello world")[0], atol=1e-6)
    assert one["model"] == EMBED_MODEL and one["usage"]["prompt_tokens"] > 0
    many = handler({"inputs": TEXTS, "parameters": {"max_tokens": 8}})  # generation params stay behind
    assert [len(r["embedding"]) for r in many] == [64] * len(TEXTS)
    for text, row in zip(TEXTS, many):
        np.testing.assert_allclose(row["embedding"], _alone(embed_fake, text)[0], atol=1e-6)
    completions = embed_fake.request_count["/v1/completions"]
    assert completions == 1  # asked once; embeddings since
    handler("again")
    assert embed_fake.request_count["/v1/completions"] == completions


def test_a_handler_told_to_generate_reports_the_missing_route(embed_fake: FakeVllmServer) -> None:
    from ipfs_accelerate_py.api_backends import vllm as framework

    backend = framework(metadata={"vllm_api_url": embed_fake.base_url})
    handler = backend.create_vllm_endpoint_handler_with_params(
        embed_fake.base_url, EMBED_MODEL, {"task": "generate"})
    out = handler("hello")
    assert out["error_type"] == "NotFoundError" and embed_fake.request_count["/v1/embeddings"] == 0
    bad = backend.create_vllm_endpoint_handler_with_params
    with pytest.raises(errors.ValidationError) as info:
        bad(embed_fake.base_url, EMBED_MODEL, {"task": "classify"})
    assert info.value.field == "parameters.task"
