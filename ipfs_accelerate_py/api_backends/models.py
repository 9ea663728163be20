"""Typed requests and results shared by every OpenAI-compatible backend.

Requests are pydantic models so bad input fails *before* anything goes on the wire, with
an error that names the field (``errors.ValidationError.field``). These are the OpenAI
surface; a backend whose server takes more fields subclasses them and names its classes on
its adapter (``BackendAdapter.completion_request`` / ``chat_request``). Results are plain
typed objects the caller can rely on (``.text``, ``.texts``, ``.usage``) whatever the
server's JSON looked like.
"""

from __future__ import annotations

import difflib
from typing import (Any, ClassVar, Dict, FrozenSet, List, Literal, Mapping, Optional, Sequence, Type,
                    TypeVar, Union, cast)

import pydantic
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from typing_extensions import Annotated

from .errors import ValidationError
from .media import check_content_parts
from .wire_fields import checked_model, count
from .request_params import (INT64_MAX, INT64_MIN, MAX_LOGPROBS, MAX_N, MAX_PROMPTS_PER_REQUEST,
                             MAX_STOP_STRINGS, NamedToolChoice, ResponseFormat, StreamOptions,
                             Tool, ToolChoice, check_logit_bias)

__all__ = [
    "ChatMessage", "CompletionRequest", "ChatRequest", "ChatBatchRequest", "Request", "Usage",
    "Choice", "CompletionResult", "StreamChunk", "validate_request", "MAX_PROMPT_CHARS",
    "MAX_TOKENS_LIMIT", "did_you_mean", "unknown_field_message", "check_text", "check_texts",
    "numeric_count", "updated",
]


#: Request priorities: 0 HIGH, 1 NORMAL, 2 LOW (the queue serves them in that order, with aging).
PRIORITIES = (0, 1, 2)


def check_priority(priority: Any) -> int:
    """``priority`` if it is one of ``PRIORITIES``; else ``ValidationError`` naming it."""
    if isinstance(priority, bool) or not isinstance(priority, int) or priority not in PRIORITIES:
        raise ValidationError(f"must be 0 (HIGH), 1 (NORMAL) or 2 (LOW), got {priority!r}",
                              field="priority")
    return priority

#: Longest prompt (characters) accepted client-side. Real models' contexts end far below
#: this (128k tokens ~ 500k characters); anything larger is a mistake to stop before sending.
MAX_PROMPT_CHARS = 2_000_000
#: Largest ``max_tokens`` accepted client-side; the model's own length is checked once the
#: client knows it (``context.py``), and the server checks it again.
MAX_TOKENS_LIMIT = 1_048_576
#: what OpenAI-style servers generate for a completion that names no ``max_tokens``
COMPLETION_DEFAULT_MAX_TOKENS = 16

Prompt = Union[str, List[str], List[int], List[List[int]]]
M = TypeVar("M", bound=BaseModel)
_Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


def check_text(value: str, what: str) -> str:
    """``value`` if it fits ``MAX_PROMPT_CHARS`` and is valid Unicode; ValueError naming ``what``."""
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"{what} is {len(value)} characters; the limit is {MAX_PROMPT_CHARS}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates cannot be sent as JSON/UTF-8
        raise ValueError(f"{what} is not valid Unicode ({exc.reason} at {exc.start})") from None
    return value


def check_texts(values: Sequence[str], what: str) -> List[str]:
    """Each text of a list within ``check_text``'s rules (named ``what[i]``), and the list
    within ``4 * MAX_PROMPT_CHARS`` in all: a prompt list, or a pooling route's inputs."""
    total = 0
    for i, text in enumerate(values):
        check_text(text, f"{what}[{i}]")
        total += len(text)
    if total > MAX_PROMPT_CHARS * 4:
        raise ValueError(f"{what} list is too large in total")
    return list(values)


def numeric_count(v: Any) -> Any:
    """The server checks logprob counts before its lax coercion: ``"2"`` is refused."""
    if v is not None and not isinstance(v, (int, float)):
        raise ValueError("must be an integer")
    return v


class _Strict(BaseModel):
    """Unknown fields are errors (a typo must not be silently dropped or forwarded);
    ``extra_body`` is the way to send a field the client does not know."""

    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False,
                              validate_assignment=False, frozen=False)


class _Sampling(_Strict):
    """Fields common to completions and chat: the OpenAI API's names and bounds.

    Types are checked in pydantic's lax mode, as OpenAI-compatible servers' own pydantic
    models do (``"4"`` is an int, ``1.5`` is not).
    """

    model: Optional[str] = Field(default=None, min_length=1, max_length=512)
    max_tokens: Optional[int] = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[_Int64] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    #: the scheduling priority, for servers that schedule by it (lower runs earlier)
    priority: Optional[_Int64] = None
    user: Optional[str] = None
    logit_bias: Optional[Dict[str, float]] = None
    response_format: Optional[ResponseFormat] = None
    #: fields the client does not know yet, forwarded as-is after the known ones validate
    extra_body: Optional[Dict[str, Any]] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) else (v or [])
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(v)}")
        for s in items:
            if not s:
                raise ValueError("stop strings must be non-empty")
            check_text(s, "stop")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: Any) -> Any:
        return check_logit_bias(v)

    @model_validator(mode="after")
    def _cross(self) -> "_Sampling":
        so = self.stream_options
        if so is not None and (so.model_fields_set or so.model_extra) and not self.stream:
            # the server refuses a non-empty stream_options without stream (an empty one passes)
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def output_limit(self) -> Optional[int]:
        """The output-token limit this request asks for (None: up to the context)."""
        return self.max_tokens

    def sampling_key(self) -> tuple:
        """Everything but the prompt: requests with equal keys may share one HTTP call."""
        data = self.model_dump(exclude=set(self.PROMPT_FIELDS), exclude_none=True)
        return tuple(sorted((k, repr(v)) for k, v in data.items()))

    PROMPT_FIELDS: ClassVar[FrozenSet[str]] = frozenset()


class CompletionRequest(_Sampling):
    """A ``/v1/completions`` request: one prompt or a list of prompts (one HTTP call)."""

    prompt: Prompt
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[bool] = None
    suffix: Optional[str] = None

    PROMPT_FIELDS: ClassVar[FrozenSet[str]] = frozenset({"prompt", "priority", "stream"})

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs_count(cls, v: Any) -> Any:
        return numeric_count(v)

    @model_validator(mode="after")
    def _completion(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: must be at least 1 (0 only with echo)")
        return self

    def output_limit(self) -> Optional[int]:
        return COMPLETION_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("prompt is required (a string, a list of strings or token ids)")
        if isinstance(v, str):
            if not v:
                raise ValueError("prompt must not be empty")
            return check_text(v, "prompt")
        if isinstance(v, (list, tuple)):
            if not v:
                raise ValueError("prompt list must not be empty")
            if len(v) > MAX_PROMPTS_PER_REQUEST and not all(isinstance(p, int) for p in v):
                raise ValueError(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request")
            if all(isinstance(p, str) for p in v):
                return check_texts(v, "prompt")
            if all(isinstance(p, int) and not isinstance(p, bool) for p in v):
                if any(p < 0 for p in v):
                    raise ValueError("token ids must be non-negative")
                return list(v)
            if all(isinstance(p, (list, tuple)) and p and all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p) for p in v):
                return [list(p) for p in v]
            raise ValueError("prompt list must hold only strings, or only token ids")
        raise ValueError(f"prompt must be a string or a list, not {type(v).__name__}")


class ChatMessage(_Strict):
    """One chat turn. ``content`` is text or a list of content parts."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, List[Dict[str, Any]]]] = None
    name: Optional[str] = Field(default=None, max_length=256)
    tool_call_id: Optional[str] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None
    reasoning: Optional[str] = None
    #: (where, decoded bytes) of each inline media item (media.py; the size cap reads it)
    _media: List[Any] = PrivateAttr(default_factory=list)

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, str):
            return check_text(v, "content")
        return v

    @model_validator(mode="after")
    def _parts(self) -> "ChatMessage":
        if isinstance(self.content, list):  # typed parts: checked before sending (media.py)
            try:
                self.content, self._media = check_content_parts(self.content)
            except ValueError as exc:
                raise ValueError(f"content: {exc}") from None
        return self


class ChatRequest(_Sampling):
    """A ``/v1/chat/completions`` request."""

    messages: List[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[List[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = None
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh",
                                       "max"]] = None

    PROMPT_FIELDS: ClassVar[FrozenSet[str]] = frozenset({"messages", "priority", "stream"})

    @field_validator("top_logprobs", mode="before")
    @classmethod
    def _top_count(cls, v: Any) -> Any:
        return numeric_count(v)

    def output_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @classmethod
    def _batch_model(cls) -> "type[ChatBatchRequest]":
        """The class of several of these sent as one call (a subclass names its own)."""
        return ChatBatchRequest

    def batch_of(self, conversations: List[List["ChatMessage"]]) -> "ChatBatchRequest":
        """ONE request for ``conversations`` with this request's sampling fields: what the
        batching mixin sends when the adapter has a chat batch route (requests whose
        ``sampling_key()`` is equal; built without validating again: each was validated)."""
        fields = dict(self)
        fields["conversations"] = conversations
        return self._batch_model().model_construct(self.model_fields_set | {"conversations"},
                                                   **fields)

    @model_validator(mode="after")
    def _chat(self) -> "ChatRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        if self.tools is not None and not self.tools:
            raise ValueError("tools: must not be an empty list (omit it instead)")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("tool_choice: needs tools")
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or ()]
            if choice.function.name not in names:
                raise ValueError(f"tool_choice: names {choice.function.name!r}, which is not "
                                 f"one of the tools {names}")
        return self


class ChatBatchRequest(ChatRequest):
    """Several conversations with equal sampling fields sent as ONE call (on the adapter's
    chat batch route, ``supports_chat_batch``). Built by ``ChatRequest.batch_of`` from
    validated requests; ``messages`` is the first conversation, so every ``ChatRequest``
    field keeps its meaning, and ``conversations`` holds all of them in order."""

    conversations: List[List[ChatMessage]] = Field(min_length=1)

    PROMPT_FIELDS: ClassVar[FrozenSet[str]] = ChatRequest.PROMPT_FIELDS | {"conversations"}


Request = Union[CompletionRequest, ChatRequest]


def _field_of(err: Mapping[str, Any]) -> str:
    loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith(("function-", "list[", "union["))]
    return ".".join(loc) or "request"


def did_you_mean(name: str, known: Any) -> str:
    """`` did you mean `max_tokens`?`` for a near-miss of a known name, else ``""``."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return f"; did you mean `{close[0]}`?" if close else ""


def unknown_field_message(name: str, known: Any) -> str:
    """Why an unknown field is refused, and the two ways forward."""
    return (f"unknown field `{name}`{did_you_mean(name, known)} (a field this client does "
            f"not know yet goes in extra_body={{...}}, which is forwarded as-is)")


def validate_request(cls: Type[BaseModel], data: Dict[str, Any]) -> Request:
    """Build ``cls`` from ``data`` or raise ``ValidationError`` naming the first bad field."""
    try:
        return cast(Request, cls.model_validate(data))
    except pydantic.ValidationError as exc:
        errs = exc.errors(include_url=False)
        first = errs[0]
        field = _field_of(first)
        msg = first.get("msg", "invalid")
        if first.get("type") == "extra_forbidden" and len(first.get("loc", ())) == 1:
            msg = unknown_field_message(field, cls.model_fields)
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if ": " in msg and msg.split(": ", 1)[0].isidentifier() and field in ("request", ""):
            field = msg.split(": ", 1)[0]
        extra = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
        raise ValidationError(f"{msg}{extra}", field=field) from None


_set = object.__setattr__


def updated(model: M, changes: Dict[str, Any]) -> M:
    """``model.model_copy(update=changes)`` for values already valid for their fields (a
    model name from the settings, a prompt its check passed): as shallow as ``model_copy``,
    the changed fields count as set, and nothing is validated; at a third of its cost (a
    copy on every request that names no model, or that reuses a validated template)."""
    copy = model.__class__.__new__(model.__class__)
    _set(copy, "__dict__", {**model.__dict__, **changes})
    _set(copy, "__pydantic_fields_set__", model.__pydantic_fields_set__ | changes.keys())
    extra = model.__pydantic_extra__
    _set(copy, "__pydantic_extra__", None if extra is None else dict(extra))
    private = model.__pydantic_private__
    _set(copy, "__pydantic_private__", None if private is None else dict(private))
    return copy


class Usage(BaseModel):
    """Token counts the server reported (summed over a prompt list)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_wire(cls, data: Any, status: Optional[int] = None) -> "Usage":
        """An OpenAI-style ``usage`` object (absent or not an object: zeros); a count that
        is not an integer is a ``ResponseError`` naming it (``status``: the reply's)."""
        if type(data) is not dict:
            return checked_model(cls, {})
        # (its own validator, given three checked integers, is cheaper than ``checked_model``
        # for a model this small: a shared stream builds one per event)
        return cls(
            prompt_tokens=count(data, "prompt_tokens", "usage", status),
            completion_tokens=count(data, "completion_tokens", "usage", status),
            total_tokens=count(data, "total_tokens", "usage", status))


class Choice(BaseModel):
    """One generated sequence. ``prompt_index`` maps it back to its prompt in a list."""

    index: int
    text: str
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[str, int]] = None
    logprobs: Optional[Dict[str, Any]] = None
    prompt_index: int = 0
    #: per-choice token counts, when the server reported them (per prompt of a prompt list)
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    #: what the server returns when asked (``return_token_ids``, ``prompt_logprobs``, tools,
    #: a reasoning parser); None when it sent nothing
    token_ids: Optional[List[int]] = None
    prompt_token_ids: Optional[List[int]] = None
    prompt_logprobs: Optional[List[Any]] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None
    reasoning: Optional[str] = None


class CompletionResult(BaseModel):
    """What a completion or chat call returns."""

    id: str = ""
    model: str = ""
    created: int = 0
    object: str = "text_completion"
    choices: List[Choice] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    #: set when this result came back as one slice of a shared (batched) call
    batch_size: int = 1
    batch_usage: Optional[Usage] = None

    @property
    def text(self) -> str:
        """The first choice's text (the common single-prompt case)."""
        return self.choices[0].text if self.choices else ""

    @property
    def texts(self) -> List[str]:
        """Every choice's text, in choice-index order."""
        return [c.text for c in self.choices]

    @property
    def finish_reason(self) -> Optional[str]:
        return self.choices[0].finish_reason if self.choices else None

    def _first(self, name: str) -> Any:
        return getattr(self.choices[0], name) if self.choices else None

    @property
    def token_ids(self) -> Optional[List[int]]:
        """The first choice's generated token ids (with ``return_token_ids``)."""
        return self._first("token_ids")

    @property
    def prompt_token_ids(self) -> Optional[List[int]]:
        """The first choice's prompt token ids (with ``return_token_ids``)."""
        return self._first("prompt_token_ids")

    @property
    def prompt_logprobs(self) -> Optional[List[Any]]:
        """Per prompt token, ``{token_id: {"logprob", "rank", "decoded_token"}}`` (the first
        entry is None: the first token has no context); with ``prompt_logprobs``."""
        return self._first("prompt_logprobs")

    @property
    def tool_calls(self) -> Optional[List[Dict[str, Any]]]:
        """The first choice's tool calls (chat with ``tools``)."""
        return self._first("tool_calls")

    @property
    def reasoning(self) -> Optional[str]:
        """The first choice's reasoning text (a server with a reasoning parser)."""
        return self._first("reasoning")

    def texts_by_prompt(self) -> List[List[str]]:
        """For a prompt list: ``[[texts of prompt 0], [texts of prompt 1], ...]``."""
        out: Dict[int, List[str]] = {}
        for c in sorted(self.choices, key=lambda c: c.index):
            out.setdefault(c.prompt_index, []).append(c.text)
        return [out[k] for k in sorted(out)]

    def for_prompt(self, prompt_index: int, n: int = 1) -> "CompletionResult":
        """The slice of a batched result that belongs to one prompt (re-indexed from 0)."""
        return self._slice(prompt_index, [c for c in self.choices if c.prompt_index == prompt_index], n)

    def split_by_prompt(self, count: int, n: int = 1) -> List["CompletionResult"]:
        """Every prompt's slice, ``for_prompt(i, n)`` for ``i < count``, in one pass."""
        groups: List[List[Choice]] = [[] for _ in range(count)]
        for c in self.choices:
            if 0 <= c.prompt_index < count:
                groups[c.prompt_index].append(c)
        return [self._slice(i, group, n) for i, group in enumerate(groups)]

    def _slice(self, prompt_index: int, choices: List[Choice], n: int) -> "CompletionResult":
        picked = [c.model_copy(update={"index": c.index - prompt_index * n, "prompt_index": 0})
                  for c in choices]
        usage = Usage()
        if picked and all(c.completion_tokens is not None for c in picked):
            p = picked[0].prompt_tokens or 0
            out = sum(c.completion_tokens or 0 for c in picked)
            usage = Usage(prompt_tokens=p, completion_tokens=out, total_tokens=p + out)
        return CompletionResult(id=self.id, model=self.model, created=self.created,
                                object=self.object, choices=picked, usage=usage)


class StreamChunk(BaseModel):
    """One parsed SSE event: text for a choice, a finish reason, and/or usage."""

    index: int = 0
    text: str = ""
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None
    id: str = ""
    model: str = ""


def coerce_messages(value: Sequence[Any]) -> List[Dict[str, Any]]:
    """Accept dicts or ChatMessage objects; return plain dicts for the request model."""
    out = []
    for m in value:
        out.append(m.model_dump(exclude_none=True) if isinstance(m, ChatMessage) else m)
    return out
