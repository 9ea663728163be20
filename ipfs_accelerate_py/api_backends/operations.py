"""Calls beyond text generation: embeddings, scores, reranking, pooling, tokens, adapters.

Why a module of their own: these calls take the path every completion takes (``submit`` /
``asubmit``: the queue, the breaker, retries, routing, metrics and spans), but their
requests and results have shapes of their own. What is generic lives here: the base request
and result types, the results every backend returns, and the faces (``embed``, ``score``,
``rerank``, ``pool``, ``tokenize``, ``detokenize``, ``load_lora_adapter``,
``unload_lora_adapter`` and their ``a``-prefixed twins) mixed into the client. A backend says
which operations it serves by naming one request class per operation on its adapter
(``BackendAdapter.operation_requests``, built from this module's ``OperationRequest``); its
adapter formats them and parses the replies. An operation the backend does not name raises
``ConfigurationError`` before anything is sent; a bad field raises ``ValidationError``
naming it, as for completions.

The twins differ only in waiting: the sync face waits on the job's future (``execute``),
the async face awaits it (``asubmit``); both build the request with the same function.
"""

from __future__ import annotations

from typing import (TYPE_CHECKING, Any, ClassVar, Dict, Hashable, List, Mapping, Optional,
                    Sequence, Type, TypeVar, cast)

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import Annotated

from .call_shapes import check_timeout
from .errors import ConfigurationError, ReplyMismatchError, ValidationError
from .models import Usage, _Strict, coerce_messages, validate_request
from .request_params import INT64_MAX, INT64_MIN
from .reply_checks import share_tokens

if TYPE_CHECKING:
    from .base import BaseApiBackend

__all__ = ["OperationRequest", "OperationResult", "EmbeddingResult", "ScoreResult", "RerankItem",
           "RerankResult", "PoolingResult", "TokenizeResult", "DetokenizeResult",
           "AdapterResult", "OperationsMixin", "OPERATIONS"]

#: The operations a backend may serve, by the name its adapter keys them with.
OPERATIONS = ("embed", "score", "rerank", "pool", "tokenize", "detokenize",
              "load_lora_adapter", "unload_lora_adapter")

_Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
R = TypeVar("R", bound="OperationResult")


class OperationRequest(_Strict):
    """A request for one operation beyond generation (a backend subclasses it per route).

    It carries what the pipeline reads of every request: the ``model`` (its metrics label
    and the routing key), the wire ``priority`` and ``extra_body``. It never streams and
    never shares a call with another (no batching key)."""

    #: the operation's name (``OPERATIONS``); also the span's ``gen_ai.operation.name``
    operation: ClassVar[str] = ""
    #: the pipeline asks every request whether it streams; these never do
    stream: ClassVar[bool] = False
    #: whether the server takes the request's scheduling ``priority`` in its body
    takes_priority: ClassVar[bool] = False

    model: Optional[str] = Field(default=None, min_length=1, max_length=512)
    priority: Optional[_Int64] = None
    extra_body: Optional[Dict[str, Any]] = None

    # -- the batching rule (mixins/batching.py): by default an operation goes alone
    def share_key(self) -> Optional[Hashable]:
        """The key under which concurrent requests of this kind may share one call (their
        inputs joined in a list on the wire), or None: it goes alone."""
        return None

    def input_count(self) -> int:
        """How many inputs this request carries (its slice of a shared call's reply)."""
        return 1

    @classmethod
    def merged(cls, requests: Sequence["OperationRequest"]) -> "OperationRequest":
        """One request carrying every request's inputs, in order (their keys are equal)."""
        raise NotImplementedError(f"{cls.__name__} does not share calls")


class OperationResult(BaseModel):
    """What every operation's result has: the reply's ``id``, ``model`` and ``usage``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    id: str = ""
    model: str = ""
    object: str = ""
    created: int = 0
    usage: Usage = Field(default_factory=Usage)

    @property
    def choices(self) -> List[Any]:
        """None: read by the spans and metrics every result passes (a completion's have them)."""
        return []


class EmbeddingResult(OperationResult):
    """One vector per input, in input order: ``vectors`` is a float32 array ``(inputs, dim)``.
    A slice of a shared call keeps the whole call's usage in ``batch_usage``."""

    vectors: Any = None  # numpy.ndarray: pydantic keeps it as it is
    batch_size: Optional[int] = None
    batch_usage: Optional[Usage] = None

    def __len__(self) -> int:
        return 0 if self.vectors is None else int(self.vectors.shape[0])

    def split(self, counts: Sequence[int]) -> List["EmbeddingResult"]:
        """Each caller's rows of a shared call's reply (``counts[i]`` inputs each), with an
        even share of the prompt tokens (the server reports only their sum). Refused
        (``ReplyMismatchError``) unless the reply has exactly one vector per input."""
        total = sum(counts)
        if len(self) != total:
            raise ReplyMismatchError("the shared embedding call's reply does not answer its "
                                     "inputs", expected=f"{total} vectors",
                                     received=f"{len(self)}")
        tokens = share_tokens(self.usage.prompt_tokens, total)
        parts, at = [], 0
        for count in counts:
            used = sum(tokens[at:at + count])
            parts.append(EmbeddingResult(
                vectors=self.vectors[at:at + count], id=self.id, model=self.model,
                object=self.object, created=self.created,
                usage=Usage(prompt_tokens=used, total_tokens=used), batch_size=len(counts),
                batch_usage=self.usage))
            at += count
        return parts


class ScoreResult(OperationResult):
    """``scores[i]``: the score of the i-th pair, in the order of the inputs."""

    scores: List[float] = Field(default_factory=list)


class RerankItem(BaseModel):
    """One document's place: its ``index`` in the documents given, its score, its text."""

    index: int
    relevance_score: float
    document: Optional[str] = None


class RerankResult(OperationResult):
    """The documents by ``relevance_score``, highest first (``top_n`` of them when asked)."""

    results: List[RerankItem] = Field(default_factory=list)


class PoolingResult(OperationResult):
    """The model's pooled output per input, in input order (``data[i]``: numbers, nested
    for per-token pooling), and the same as float32 arrays (``arrays``)."""

    data: List[Any] = Field(default_factory=list)

    @property
    def arrays(self) -> List[np.ndarray]:
        return [np.asarray(d, dtype=np.float32) for d in self.data]


class TokenizeResult(OperationResult):
    """The prompt's token ids (``tokens``), their ``count`` and the model's context length."""

    tokens: List[int] = Field(default_factory=list)
    count: int = 0
    max_model_len: Optional[int] = None
    token_strs: Optional[List[str]] = None


class DetokenizeResult(OperationResult):
    """The text of the token ids."""

    text: str = ""


class AdapterResult(OperationResult):
    """A LoRA adapter loaded or unloaded: its ``name`` and the server's ``message``."""

    name: str = ""
    message: str = ""


def build_operation(adapter: Any, operation: str, fields: Mapping[str, Any]) -> OperationRequest:
    """The adapter's typed request for ``operation`` from ``fields`` (unset ones dropped);
    ``ConfigurationError`` when the backend does not serve it, ``ValidationError`` naming a
    bad field."""
    cls = adapter.operation_requests.get(operation)
    if cls is None:
        raise ConfigurationError(f"backend {adapter.name!r} does not serve {operation}",
                                 field=operation)
    data = {k: v for k, v in fields.items() if v is not None or k == "input"}
    return cast(OperationRequest, validate_request(cls, data))


def _tokenize_fields(prompt_or_messages: Any) -> Dict[str, Any]:
    if isinstance(prompt_or_messages, str):
        return {"prompt": prompt_or_messages}
    if isinstance(prompt_or_messages, (list, tuple)) and prompt_or_messages and all(
            isinstance(m, (dict, BaseModel)) for m in prompt_or_messages):
        return {"messages": coerce_messages(prompt_or_messages)}
    raise ValidationError("must be a prompt (a string) or chat messages (dicts with 'role' "
                          "and 'content')", field="prompt")


def _lora_fields(name: Any, path: Any = None) -> Dict[str, Any]:
    fields = {"lora_name": name}
    if path is not None:
        fields["lora_path"] = path
    return fields


class OperationsMixin:
    """The faces of the operations (see the module docstring). Each builds its typed
    request, then ``execute`` (sync) or ``asubmit`` (async) sends it like any request."""

    def _op(self, operation: str, fields: Mapping[str, Any]) -> OperationRequest:
        return build_operation(cast("BaseApiBackend", self).adapter, operation, fields)

    def _run_op(self, request: OperationRequest, kind: Type[R], priority: int,
                endpoint_id: Optional[str], fail_fast: Optional[bool] = None,
                timeout: Optional[float] = None) -> R:
        client = cast("BaseApiBackend", self)
        result = client.execute(request, priority, endpoint_id,  # type: ignore[arg-type]
                                check_timeout(timeout), fail_fast)
        client._lora_after_op(request, endpoint_id)  # the adapter book (lora_routing.py)
        return cast(R, result)

    async def _arun_op(self, request: OperationRequest, kind: Type[R], priority: int,
                       endpoint_id: Optional[str], fail_fast: Optional[bool] = None,
                       timeout: Optional[float] = None) -> R:
        client = cast("BaseApiBackend", self)
        result = await client.asubmit(request, priority, endpoint_id,  # type: ignore[arg-type]
                                      check_timeout(timeout), fail_fast)
        client._lora_after_op(request, endpoint_id)
        return cast(R, result)

    # ------------------------------------------------------------------ embeddings
    def embed(self, inputs: Any, model: Optional[str] = None, priority: int = 1,
              endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> EmbeddingResult:
        """Text (or a list of texts, or token ids) -> ``.vectors``, one float32 row per
        input, in one call. Sent as base64 unless ``encoding_format="float"``."""
        return self._run_op(self._op("embed", {**params, "model": model, "input": inputs}),
                            EmbeddingResult, priority, endpoint_id, fail_fast, timeout)

    async def aembed(self, inputs: Any, model: Optional[str] = None, priority: int = 1,
                     endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> EmbeddingResult:
        """``embed`` for coroutines."""
        return await self._arun_op(self._op("embed", {**params, "model": model, "input": inputs}),
                                   EmbeddingResult, priority, endpoint_id, fail_fast, timeout)

    def pool(self, inputs: Any, model: Optional[str] = None, priority: int = 1,
             endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> PoolingResult:
        """The model's raw pooled output per input (``.data``, ``.arrays``)."""
        return self._run_op(self._op("pool", {**params, "model": model, "input": inputs}),
                            PoolingResult, priority, endpoint_id, fail_fast, timeout)

    async def apool(self, inputs: Any, model: Optional[str] = None, priority: int = 1,
                    endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> PoolingResult:
        """``pool`` for coroutines."""
        return await self._arun_op(self._op("pool", {**params, "model": model, "input": inputs}),
                                   PoolingResult, priority, endpoint_id, fail_fast, timeout)

    # ------------------------------------------------------------------ scoring
    def score(self, text_1: Any, text_2: Any, model: Optional[str] = None, priority: int = 1,
              endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> ScoreResult:
        """``text_1`` scored against each of ``text_2`` (a text or a list; or pairwise, two
        lists of one length) -> ``.scores`` in ``text_2``'s order."""
        fields = {**params, "model": model, "text_1": text_1, "text_2": text_2}
        return self._run_op(self._op("score", fields), ScoreResult, priority,
                endpoint_id, fail_fast, timeout)

    async def ascore(self, text_1: Any, text_2: Any, model: Optional[str] = None,
                     priority: int = 1, endpoint_id: Optional[str] = None,
                     fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> ScoreResult:
        """``score`` for coroutines."""
        fields = {**params, "model": model, "text_1": text_1, "text_2": text_2}
        return await self._arun_op(self._op("score", fields), ScoreResult, priority,
                endpoint_id, fail_fast, timeout)

    def rerank(self, query: str, documents: Sequence[str], top_n: Optional[int] = None,
               model: Optional[str] = None, priority: int = 1,
               endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> RerankResult:
        """``documents`` ordered by relevance to ``query`` -> ``.results`` (``index``,
        ``relevance_score``, ``document``), best first; the ``top_n`` best when given."""
        fields = {**params, "model": model, "query": query, "documents": documents,
                  "top_n": top_n}
        return self._run_op(self._op("rerank", fields), RerankResult, priority,
                endpoint_id, fail_fast, timeout)

    async def arerank(self, query: str, documents: Sequence[str], top_n: Optional[int] = None,
                      model: Optional[str] = None, priority: int = 1,
                      endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> RerankResult:
        """``rerank`` for coroutines."""
        fields = {**params, "model": model, "query": query, "documents": documents,
                  "top_n": top_n}
        return await self._arun_op(self._op("rerank", fields), RerankResult, priority,
                                   endpoint_id, fail_fast, timeout)

    # ------------------------------------------------------------------ tokens
    def tokenize(self, prompt_or_messages: Any, model: Optional[str] = None, priority: int = 1,
                 endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> TokenizeResult:
        """A prompt, or chat messages (rendered by the model's chat template) -> ``.tokens``."""
        fields = {**params, "model": model, **_tokenize_fields(prompt_or_messages)}
        return self._run_op(self._op("tokenize", fields), TokenizeResult, priority,
                endpoint_id, fail_fast, timeout)

    async def atokenize(self, prompt_or_messages: Any, model: Optional[str] = None,
                        priority: int = 1, endpoint_id: Optional[str] = None,
                        fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> TokenizeResult:
        """``tokenize`` for coroutines."""
        fields = {**params, "model": model, **_tokenize_fields(prompt_or_messages)}
        return await self._arun_op(self._op("tokenize", fields), TokenizeResult, priority,
                                   endpoint_id, fail_fast, timeout)

    def detokenize(self, tokens: Sequence[int], model: Optional[str] = None, priority: int = 1,
                   endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> str:
        """Token ids -> their text."""
        fields = {**params, "model": model, "tokens": tokens}
        return self._run_op(self._op("detokenize", fields), DetokenizeResult, priority,
                            endpoint_id, fail_fast, timeout).text

    async def adetokenize(self, tokens: Sequence[int], model: Optional[str] = None,
                          priority: int = 1, endpoint_id: Optional[str] = None,
                          fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> str:
        """``detokenize`` for coroutines."""
        fields = {**params, "model": model, "tokens": tokens}
        return (await self._arun_op(self._op("detokenize", fields), DetokenizeResult, priority,
                                    endpoint_id, fail_fast, timeout)).text

    # ------------------------------------------------------------------ LoRA adapters
    def load_lora_adapter(self, name: str, path: str, endpoint_id: Optional[str] = None,
                          priority: int = 1, fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> AdapterResult:
        """Load the LoRA adapter at ``path`` (a folder on the server's machine) as model
        ``name`` on one endpoint (the default one, or ``endpoint_id``)."""
        request = self._op("load_lora_adapter", {**params, **_lora_fields(name, path)})
        return self._run_op(request, AdapterResult, priority, endpoint_id, fail_fast, timeout)

    async def aload_lora_adapter(self, name: str, path: str, endpoint_id: Optional[str] = None,
                                 priority: int = 1, fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> AdapterResult:
        """``load_lora_adapter`` for coroutines."""
        request = self._op("load_lora_adapter", {**params, **_lora_fields(name, path)})
        return await self._arun_op(request, AdapterResult, priority,
                endpoint_id, fail_fast, timeout)

    def unload_lora_adapter(self, name: str, endpoint_id: Optional[str] = None,
                            priority: int = 1, fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> AdapterResult:
        """Unload the LoRA adapter ``name`` from one endpoint."""
        request = self._op("unload_lora_adapter", {**params, **_lora_fields(name)})
        return self._run_op(request, AdapterResult, priority, endpoint_id, fail_fast, timeout)

    async def aunload_lora_adapter(self, name: str, endpoint_id: Optional[str] = None,
                                   priority: int = 1, fail_fast: Optional[bool] = None,
            timeout: Optional[float] = None, **params: Any) -> AdapterResult:
        """``unload_lora_adapter`` for coroutines."""
        request = self._op("unload_lora_adapter", {**params, **_lora_fields(name)})
        return await self._arun_op(request, AdapterResult, priority,
                endpoint_id, fail_fast, timeout)
