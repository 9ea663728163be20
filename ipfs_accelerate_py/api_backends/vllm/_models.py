"""vLLM's requests: the OpenAI surface (``models.py``) plus the fields only vLLM takes.

Every field of vLLM 0.32/0.33's ``/v1/completions`` and ``/v1/chat/completions`` is typed
here or in the generic models, with the server's own bounds and cross-field rules (read from
vLLM's protocol classes and ``SamplingParams`` checks, confirmed against the real server:
``tests/api_backends/data/vllm_request_corpus.json``), so a request the server would refuse
fails before it is sent, naming the field. ``VllmAdapter`` names these classes as its
``completion_request`` / ``chat_request``, so every path of ``VllmClient`` builds them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

from pydantic import Field, field_validator, model_validator

from ..models import (MAX_TOKENS_LIMIT, ChatBatchRequest, ChatRequest, CompletionRequest,
                      _Sampling, numeric_count)
from ..request_params import (INT64_MAX, MAX_LOGPROB_TOKEN_IDS, MAX_LOGPROBS, NamedToolChoice,
                              StructuredOutputs, TokenId, check_cache_salt,
                              check_truncate_prompt_tokens)

__all__ = ["VllmCompletionRequest", "VllmChatRequest", "VllmChatBatchRequest"]


class _VllmSampling(_Sampling):
    """vLLM's sampling and engine fields beyond the OpenAI API, on completions and chat."""

    top_k: Optional[int] = Field(default=None, ge=-1)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    stop_token_ids: Optional[List[TokenId]] = None
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)
    ignore_eos: Optional[bool] = None
    min_tokens: Optional[int] = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    structured_outputs: Optional[StructuredOutputs] = None
    prompt_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    logprob_token_ids: Optional[List[TokenId]] = Field(default=None, max_length=MAX_LOGPROB_TOKEN_IDS)
    return_token_ids: Optional[bool] = None
    return_tokens_as_token_ids: Optional[bool] = None
    allowed_token_ids: Optional[List[TokenId]] = Field(default=None, min_length=1)
    bad_words: Optional[List[str]] = None
    include_stop_str_in_output: Optional[bool] = None
    skip_special_tokens: Optional[bool] = None
    spaces_between_special_tokens: Optional[bool] = None
    add_special_tokens: Optional[bool] = None
    # -1: the model's context; 0 truncates the prompt to nothing, which vLLM refuses (400 "The
    # decoder prompt cannot be empty"); the upper bound (max_model_len) is check_fits_context's.
    truncate_prompt_tokens: Optional[int] = Field(default=None, ge=-1, le=INT64_MAX)
    # vLLM 0.32 has no best_of (it went with the V0 engine): the server ignores the field,
    # whatever its value, and answers as without it. So the client takes it too, unchecked,
    # and forwards it (a server that knows it again judges it); it samples nothing by itself.
    best_of: Any = None
    truncation_side: Optional[Literal["left", "right"]] = None
    cache_salt: Optional[str] = None
    kv_transfer_params: Optional[Dict[str, Any]] = None
    vllm_xargs: Optional[Dict[str, Any]] = None
    use_beam_search: Optional[bool] = None
    length_penalty: Optional[float] = None
    stream_interval: Optional[int] = Field(default=None, ge=1)
    repetition_detection: Optional[Dict[str, Any]] = None
    thinking_token_budget: Optional[int] = Field(default=None, ge=-1)
    session_id: Optional[str] = None

    @field_validator("prompt_logprobs", mode="before")
    @classmethod
    def _count(cls, v: Any) -> Any:
        return numeric_count(v)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_prompt_tokens(cls, v: Any) -> Any:
        return check_truncate_prompt_tokens(v)

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, v: Any) -> Any:
        if v and any(not w for w in v):
            raise ValueError("bad_words must not contain an empty string")
        return v

    @field_validator("cache_salt")
    @classmethod
    def _cache_salt(cls, v: Any) -> Any:
        return check_cache_salt(v)

    @model_validator(mode="after")
    def _vllm_cross(self) -> "_VllmSampling":
        if self.n > 1 and self.temperature == 0:
            # vLLM answers 400 "n must be 1 when using greedy sampling": say it before sending.
            raise ValueError("n: n must be 1 when temperature is 0 (greedy sampling)")
        limit = self.output_limit()
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            raise ValueError(f"min_tokens: must not exceed max_tokens ({limit})")
        if self.prompt_logprobs and self.stream:
            raise ValueError("prompt_logprobs: not available when stream is true")
        return self


class VllmCompletionRequest(CompletionRequest, _VllmSampling):
    """A vLLM ``/v1/completions`` request."""

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: Any) -> Any:
        if v is not None:  # vLLM answers "suffix is not currently supported"
            raise ValueError("vLLM does not support suffix")
        return v

    @model_validator(mode="after")
    def _vllm_completion(self) -> "VllmCompletionRequest":
        if self.logprob_token_ids and self.logprobs is None:
            raise ValueError("logprob_token_ids: needs logprobs")
        return self


class VllmChatRequest(ChatRequest, _VllmSampling):
    """A vLLM ``/v1/chat/completions`` request."""

    include_reasoning: Optional[bool] = None
    echo: Optional[bool] = None
    add_generation_prompt: Optional[bool] = None
    continue_final_message: Optional[bool] = None
    documents: Optional[List[Dict[str, str]]] = None
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    mm_processor_kwargs: Optional[Dict[str, Any]] = None
    media_io_kwargs: Optional[Dict[str, Dict[str, Any]]] = None
    return_prompt_text: Optional[bool] = None

    @classmethod
    def _batch_model(cls) -> "type[ChatBatchRequest]":
        return VllmChatBatchRequest

    @model_validator(mode="after")
    def _vllm_chat(self) -> "VllmChatRequest":
        if self.logprob_token_ids and not self.logprobs:
            raise ValueError("logprob_token_ids: needs logprobs=true")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message: cannot be true with add_generation_prompt")
        so = self.structured_outputs
        if isinstance(self.tool_choice, NamedToolChoice) and so is not None and (
                so.json_ is not None or so.regex is not None or so.choice is not None):
            raise ValueError("structured_outputs: cannot be used with a named tool_choice")
        return self


class VllmChatBatchRequest(VllmChatRequest, ChatBatchRequest):
    """Several vLLM chats sent as one ``/v1/chat/completions/batch`` call."""
