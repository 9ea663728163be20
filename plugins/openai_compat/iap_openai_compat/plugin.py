"""The OpenAI chat wire format, as an ``ipfs_accelerate_py`` backend adapter.

Everything else (the priority queue, the circuit breaker, retries with backoff, metrics,
endpoints) is ``BaseApiBackend``'s. Batching is declared unsupported
(``supports_prompt_list = False``), so the client never merges requests.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from ipfs_accelerate_py.api_backends import (BackendAdapter, ChatRequest, Choice, CompletionResult,
                                             HttpRequest, HttpResponse, Request, ResponseError,
                                             StreamChunk, Usage, ValidationError,
                                             decode_stream_event, hookimpl, load_json,
                                             make_endpoint_handler, parse_model_list,
                                             validate_request, wire_body)

__all__ = ["OpenAICompatAdapter", "CHAT_PATH", "iap_register_backends"]

CHAT_PATH = "/v1/chat/completions"
#: completion-only fields: chat cannot express them, so a request that sets one is refused
_COMPLETION_ONLY = ("echo", "suffix", "logprobs")


def as_chat(request: Request) -> ChatRequest:
    """A chat request as is; a one-prompt completion request as one user message."""
    if isinstance(request, ChatRequest):
        return request
    prompt = request.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the endpoint handler sends lists one prompt at a time
    if not isinstance(prompt, str):
        raise ValidationError("the openai_compat backend is chat-only and takes one prompt "
                              "string per request; send prompts one by one (the endpoint "
                              "handler does this for a list)", field="prompt")
    for name in _COMPLETION_ONLY:
        if getattr(request, name) is not None:
            raise ValidationError("is a completions-only field; the openai_compat backend "
                                  "sends chat requests", field=name)
    fields = request.model_dump(exclude_none=True, by_alias=True,
                                exclude={"prompt", *_COMPLETION_ONLY})
    fields["messages"] = [{"role": "user", "content": prompt}]
    return validate_request(ChatRequest, fields)  # type: ignore[return-value]


class OpenAICompatAdapter(BackendAdapter):
    """Any OpenAI-compatible chat server: ``/v1/chat/completions`` and ``/v1/models``."""

    name = "openai_compat"
    description = ("generic OpenAI-compatible chat server (/v1/chat/completions only, "
                   "no prompt-list batching)")
    env_prefix = "OPENAI_COMPAT_"
    default_base_url = "http://localhost:8000"
    supports_prompt_list = False
    supports_streaming = True

    def format_request(self, request: Request, *, priority: Optional[int] = None,
                       request_id: Optional[str] = None) -> HttpRequest:
        chat = as_chat(request)
        # the OpenAI API has no priority field: queue priority stays on the client side
        body = wire_body(chat, exclude={"priority"})
        if body.get("n") == 1:
            del body["n"]
        if body.get("stream") is False:
            del body["stream"]
        headers = {"X-Request-Id": request_id} if request_id else {}
        return HttpRequest("POST", CHAT_PATH, json=body, headers=headers, stream=chat.stream)

    def parse_response(self, request: Request, response: HttpResponse) -> CompletionResult:
        data = load_json(response)
        raw = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(raw, list):
            raise ResponseError("reply has no 'choices' list", status_code=response.status,
                                body=response.text())
        choices = []
        for position, item in enumerate(raw):
            message = item.get("message") if isinstance(item, dict) else None
            if not isinstance(message, dict):
                raise ResponseError("a choice has no 'message' object",
                                    status_code=response.status)
            choices.append(Choice(index=item.get("index", position),
                                  text=message.get("content") or "",
                                  finish_reason=item.get("finish_reason"),
                                  logprobs=item.get("logprobs")))
        choices.sort(key=lambda c: c.index)
        return CompletionResult(id=data.get("id") or "", model=data.get("model") or "",
                                created=data.get("created") or 0,
                                object=data.get("object") or "chat.completion",
                                choices=choices, usage=Usage.from_wire(data.get("usage")))

    def parse_stream_event(self, request: Request, data: str) -> Optional[List[StreamChunk]]:
        event = decode_stream_event(data)
        if event is None:
            return None
        ident, model = event.get("id") or "", event.get("model") or ""
        chunks = [StreamChunk(index=c.get("index", 0),
                              text=(c.get("delta") or {}).get("content") or "",
                              finish_reason=c.get("finish_reason"), id=ident, model=model)
                  for c in event.get("choices") or () if isinstance(c, dict)]
        if event.get("usage"):
            chunks.append(StreamChunk(usage=Usage.from_wire(event["usage"]), id=ident, model=model))
        return chunks

    def models_request(self) -> HttpRequest:
        return HttpRequest("GET", "/v1/models")

    def parse_models(self, response: HttpResponse) -> List[Dict[str, Any]]:
        return parse_model_list(response)

    def create_endpoint_handler(self, client: Any, model: Optional[str] = None,
                                parameters: Optional[Dict[str, Any]] = None
                                ) -> Callable[[Any], Any]:
        """The framework's handler; a list of prompts goes out one request per prompt."""
        return make_endpoint_handler(client, model, {**(parameters or {}), "batch_size": 1})


@hookimpl
def iap_register_backends(register: Callable[[BackendAdapter], None]) -> None:
    register(OpenAICompatAdapter())
