"""``--embeddings``: the operations of a pooling (embedding) model, checked against a server.

Which model is a pooling model is asked of the server, never guessed from its name
(``detect_pooling``): the backend must declare ``embed`` (``adapter.operation_requests``),
the server must answer one ``embed`` of the model with 200, and a one-token completion of
the same model must be 404 (vLLM started with ``--runner pooling`` registers no generation
routes). The completion probe is sent only when the embed probe answered, so a generative
server sees one extra request (a 404 on ``/v1/embeddings``) and nothing else. A model that
answers both is generative: the generation suites run, and the embeddings suite too when
``--embeddings`` asks for it.

The checks: ``embed`` (shape, float32, base64 equal to float and to the raw reply within
1e-5, usage), ``score`` (one finite score per pair, the cosine of the ``embed`` vectors),
``rerank`` (ordered by score, a permutation of the documents, ``top_n`` a prefix, equal to
``score``), ``pool``, ``tokenize``/``detokenize`` round trip (ids -> text -> ids),
concurrent ``embed`` callers sharing calls (client metrics ``batches`` >= 1, every vector equal to one call's), generation
refused by a pooling model with a typed error, and bad input refused before sending.
"""

from __future__ import annotations

import asyncio
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from ..api_backends.adapter import BackendAdapter
from ..api_backends.base import BaseApiBackend, build_request, default_transport
from ..api_backends.errors import NotFoundError, ValidationError
from ..api_backends.operations import build_operation
from .checks import CheckFn, CheckRecorder, SkipCheck
from .clients import SendCounter
from .context import SuiteContext

__all__ = ["PoolingProbe", "detect_pooling", "EmbeddingsChecks", "run_embeddings", "TOLERANCE"]

#: float vs base64 vs the raw reply: the same float32 numbers, so well within this
TOLERANCE = 1e-5
TEXTS = ("The sea is calm tonight.", "A cat sleeps in the sun.",
         "Hash tables map keys to values.")
QUERY = "Where does the cat sleep?"
ROUND_TRIP = "Hello world, this is a test."
SHARED_CALLERS = 16


@dataclass
class PoolingProbe:
    """What the server said: ``pooling`` (generation routes absent), ``embeds`` (the embed
    probe answered 200), the statuses seen and a one-line ``reason``."""

    pooling: bool
    embeds: bool
    reason: str
    statuses: Dict[str, int] = field(default_factory=dict)


def _send(client: BaseApiBackend, http: Any, timeout: float) -> Tuple[int, bytes]:
    transport = default_transport(client.settings)
    try:
        reply = transport.send(http, (min(timeout, 5.0), timeout))
    finally:
        transport.close()
    return reply.status, reply.body


def detect_pooling(adapter: BackendAdapter, client: BaseApiBackend, model: str,
                   timeout: float) -> PoolingProbe:
    """Ask the server whether ``model`` is a pooling model (see the module docstring)."""
    if "embed" not in adapter.operation_requests:
        return PoolingProbe(False, False, f"backend {adapter.name!r} declares no embed operation")
    embed = adapter.format_request(build_operation(  # type: ignore[arg-type]
        adapter, "embed", {"model": model, "input": "ping", "encoding_format": "float"}))
    statuses: Dict[str, int] = {}
    try:
        statuses[embed.path], _ = _send(client, embed, timeout)
        if statuses[embed.path] != 200:
            return PoolingProbe(False, False, f"{embed.path} answered "
                                f"{statuses[embed.path]}", statuses)
        completion = adapter.format_request(build_request("ping", model, {"max_tokens": 1}))
        statuses[completion.path], _ = _send(client, completion, timeout)
    except Exception as exc:  # noqa: BLE001 - a probe that cannot finish decides nothing
        return PoolingProbe(False, False, f"probe failed: {type(exc).__name__}: {exc}", statuses)
    if statuses[completion.path] == 404:
        return PoolingProbe(True, True, f"{embed.path} answers, {completion.path} is 404",
                            statuses)
    return PoolingProbe(False, True, f"{embed.path} answers and {completion.path} answered "
                        f"{statuses[completion.path]} (a generative model)", statuses)


def _expect(exc_type: type, fn: Callable[[], Any], what: str) -> Any:
    try:
        value = fn()
    except exc_type as exc:
        return exc
    raise AssertionError(f"{what}: expected {exc_type.__name__}, got {type(value).__name__}")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


class EmbeddingsChecks:
    """The checks, bound to one client, the counter of what it sent and the probe."""

    def __init__(self, ctx: SuiteContext, client: BaseApiBackend, counter: SendCounter,
                 probe: PoolingProbe) -> None:
        self.ctx = ctx
        self.client = client
        self.counter = counter
        self.adapter = ctx.adapter
        self.model = ctx.model
        self.probe = probe
        self.vectors: Any = None  # the float embed of TEXTS, for score's cross-check

    def all(self) -> List[Tuple[str, CheckFn]]:
        return [("embed", self.embed), ("score", self.score), ("rerank", self.rerank),
                ("pool", self.pool), ("tokenize_round_trip", self.tokenize_round_trip),
                ("shared_embed_calls", self.shared_embed_calls),
                ("generation_refused", self.generation_refused),
                ("invalid_input_refused", self.invalid_input_refused)]

    def _needs(self, *operations: str) -> None:
        missing = [o for o in operations if o not in self.adapter.operation_requests]
        if missing:
            raise SkipCheck(f"backend {self.adapter.name!r} does not declare {missing}")

    def _raw_embed(self, texts: List[str]) -> np.ndarray:
        """The server's own float reply, read without the client's parsing."""
        http = self.adapter.format_request(build_operation(  # type: ignore[arg-type]
            self.adapter, "embed", {"model": self.model, "input": texts,
                                    "encoding_format": "float"}))
        status, body = _send(self.client, http, self.ctx.timeout)
        assert status == 200, f"the raw {http.path} answered {status}: {body[:200]!r}"
        data = sorted(json.loads(body)["data"], key=lambda d: d["index"])
        return np.array([d["embedding"] for d in data], dtype=np.float32)

    # ------------------------------------------------------------------ checks
    def embed(self, d: Dict[str, Any]) -> None:
        self._needs("embed")
        texts = list(TEXTS)
        floats = self.client.embed(texts, self.model, encoding_format="float")
        encoded = self.client.embed(texts, self.model)  # base64 on the wire by default
        for name, r in (("float", floats), ("base64", encoded)):
            v = r.vectors
            assert isinstance(v, np.ndarray), f"{name}: vectors is {type(v).__name__}"
            assert v.dtype == np.float32, f"{name}: dtype {v.dtype}, expected float32"
            assert v.ndim == 2 and v.shape[0] == len(texts) and v.shape[1] > 0, (
                f"{name}: shape {v.shape} for {len(texts)} inputs")
            assert np.isfinite(v).all(), f"{name}: a vector has a non-finite number"
            assert r.usage.prompt_tokens > 0, f"{name}: usage.prompt_tokens {r.usage.prompt_tokens}"
        assert floats.vectors.shape == encoded.vectors.shape, "base64 and float shapes differ"
        diff = float(np.abs(floats.vectors - encoded.vectors).max())
        assert diff <= TOLERANCE, f"base64 and float differ by {diff:g} (> {TOLERANCE:g})"
        assert encoded.usage.prompt_tokens == floats.usage.prompt_tokens, "usage differs"
        raw = self._raw_embed(texts)
        raw_diff = float(np.abs(raw - floats.vectors).max())
        assert raw_diff <= TOLERANCE, f"embed differs from the raw reply by {raw_diff:g}"
        again = asyncio.run(self.client.aembed(texts, self.model))
        async_diff = float(np.abs(again.vectors - encoded.vectors).max())
        assert async_diff <= TOLERANCE, f"aembed differs from embed by {async_diff:g}"
        self.vectors = floats.vectors
        d.update(inputs=len(texts), dimensions=int(floats.vectors.shape[1]),
                 prompt_tokens=floats.usage.prompt_tokens, max_abs_diff_base64_float=diff,
                 max_abs_diff_raw=raw_diff, max_abs_diff_async=async_diff)

    def score(self, d: Dict[str, Any]) -> None:
        self._needs("score")
        result = self.client.score(TEXTS[1], list(TEXTS), self.model)
        scores = result.scores
        assert len(scores) == len(TEXTS), f"{len(scores)} scores for {len(TEXTS)} pairs"
        assert all(isinstance(s, float) and math.isfinite(s) for s in scores), scores
        d["scores"] = scores
        if self.probe.pooling and self.vectors is not None:
            # an embedding model scores by the cosine of its embeddings
            cos = [_cosine(self.vectors[1], v) for v in self.vectors]
            gap = max(abs(a - b) for a, b in zip(scores, cos))
            assert gap <= 1e-3, f"scores {scores} are not the embeddings' cosines {cos}"
            d["max_abs_diff_cosine"] = gap

    def rerank(self, d: Dict[str, Any]) -> None:
        self._needs("rerank")
        docs = list(TEXTS)
        full = self.client.rerank(QUERY, docs, model=self.model).results
        got = [r.relevance_score for r in full]
        assert got == sorted(got, reverse=True), f"results not ordered by score: {got}"
        assert sorted(r.index for r in full) == list(range(len(docs))), (
            f"indexes {[r.index for r in full]} are not the documents")
        wrong = [r.index for r in full if r.document is not None and r.document != docs[r.index]]
        assert not wrong, f"documents at {wrong} are not the ones given"
        top = self.client.rerank(QUERY, docs, top_n=2, model=self.model).results
        assert [r.index for r in top] == [r.index for r in full[:2]], "top_n=2 is not a prefix"
        d["order"] = [r.index for r in full]
        if "score" in self.adapter.operation_requests:
            scores = self.client.score(QUERY, docs, self.model).scores
            gap = max(abs(scores[r.index] - r.relevance_score) for r in full)
            assert gap <= 1e-4, f"rerank's scores differ from score's by {gap:g}"
            d["max_abs_diff_score"] = gap

    def pool(self, d: Dict[str, Any]) -> None:
        self._needs("pool")
        result = self.client.pool(list(TEXTS[:2]), self.model)
        assert len(result.data) == 2, f"{len(result.data)} pooled outputs for 2 inputs"
        arrays = result.arrays
        assert all(a.size > 0 and np.isfinite(a).all() for a in arrays), "an empty pooled output"
        d["shapes"] = [list(a.shape) for a in arrays]

    def tokenize_round_trip(self, d: Dict[str, Any]) -> None:
        self._needs("tokenize", "detokenize")
        tokens = self.client.tokenize(ROUND_TRIP, self.model, add_special_tokens=False)
        assert tokens.tokens and all(isinstance(t, int) for t in tokens.tokens), tokens.tokens
        assert tokens.count == len(tokens.tokens), f"count {tokens.count} != {len(tokens.tokens)}"
        text = self.client.detokenize(tokens.tokens, self.model)
        assert isinstance(text, str) and text, f"detokenize gave {text!r}"
        # ids -> text -> ids is exact for any tokenizer (the test double's pieces included);
        # text -> ids -> text is recorded (a real tokenizer gives the text back)
        again = asyncio.run(self.client.atokenize(text, self.model, add_special_tokens=False))
        assert again.tokens == tokens.tokens, (
            f"tokenize(detokenize(ids)) gave {again.tokens[:8]}..., not {tokens.tokens[:8]}...")
        d.update(tokens=tokens.count, max_model_len=tokens.max_model_len,
                 text_round_trip=text.strip() == ROUND_TRIP)

    def shared_embed_calls(self, d: Dict[str, Any]) -> None:
        self._needs("embed")
        texts = [f"caller {i} says {'word ' * (i % 5)}".strip() for i in range(SHARED_CALLERS)]
        with self.ctx.client(max_batch_size=32, batch_linger=0.05) as client:
            with ThreadPoolExecutor(SHARED_CALLERS) as workers:
                results = list(workers.map(lambda t: client.embed(t, self.model), texts))
            metrics = client.get_metrics()
        got = np.concatenate([r.vectors for r in results])
        expected = self._raw_embed(texts)
        assert got.shape == expected.shape, f"shape {got.shape}, expected {expected.shape}"
        diff = float(np.abs(got - expected).max())
        assert diff <= TOLERANCE, f"a shared caller's vector differs by {diff:g}"
        assert metrics["batches"] >= 1, f"{SHARED_CALLERS} concurrent callers shared no call"
        assert metrics["batch_mismatches"] == 0, "a shared call's reply did not match it"
        assert metrics["failures"] == 0, f"{metrics['failures']} failures"
        d.update(callers=SHARED_CALLERS, requests=metrics["requests"], batches=metrics["batches"],
                 batched_requests=metrics["batched_requests"],
                 mean_batch_size=metrics["mean_batch_size"], max_abs_diff=diff)

    def generation_refused(self, d: Dict[str, Any]) -> None:
        if not self.probe.pooling:
            raise SkipCheck("the model also generates")
        before = self.counter.total
        exc = _expect(NotFoundError, lambda: self.client.run_inference(
            self.model, "Hi", {"max_tokens": 2}), "a completion of a pooling model")
        assert self.counter.total - before == 1, "a 404 was retried"
        d.update(error=type(exc).__name__, status_code=exc.status_code)

    def invalid_input_refused(self, d: Dict[str, Any]) -> None:
        cases: List[Tuple[str, str, Callable[[], Any]]] = [
            ("embed", "a number as input", lambda: self.client.embed(12345, self.model)),
            ("embed", "dimensions 0", lambda: self.client.embed("x", self.model, dimensions=0)),
            ("embed", "an unknown encoding", lambda: self.client.embed(
                "x", self.model, encoding_format="binary")),
            ("rerank", "top_n -1", lambda: self.client.rerank("q", ["a"], top_n=-1,
                                                              model=self.model)),
            ("tokenize", "a number as prompt", lambda: self.client.tokenize(42, self.model)),
            ("detokenize", "text as token ids", lambda: self.client.detokenize(["a"], self.model)),
        ]
        refused = []
        for operation, what, fn in cases:
            if operation not in self.adapter.operation_requests:
                continue
            before = self.counter.total
            _expect(ValidationError, fn, what)
            assert self.counter.total == before, f"{what} reached the server before failing"
            refused.append(what)
        if not refused:
            raise SkipCheck("the backend declares none of these operations")
        d["refused_before_sending"] = refused


def run_embeddings(ctx: SuiteContext, probe: PoolingProbe) -> CheckRecorder:
    """Run every embeddings check against ``ctx.base_url``; the recorder holds the verdicts."""
    recorder = CheckRecorder(ctx.out)
    counter = SendCounter()
    with ctx.client(counter=counter) as client:
        for name, fn in EmbeddingsChecks(ctx, client, counter, probe).all():
            recorder.run(name, fn)
    return recorder

