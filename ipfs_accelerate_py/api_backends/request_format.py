"""Run a request through a handler with per-call parameters, plain or structured.

Behind the README's ``format_request_with_params(handler, input, params)`` and
``format_structured_request(handler, {"prompt", "context", "options"})``: both *run* the
request on the handler's client ("control inference parameters for each request"), the
handler's defaults overridden by the call's parameters, and raise typed errors.

A structured request maps onto OpenAI-compatible fields the server really has:

* ``context`` goes in front of the prompt, separated by a blank line
  (``"{context}\\n\\n{prompt}"``); for chat messages it becomes (or joins) the system message.
* ``options.return_logprobs: True`` asks for log-probabilities: completions take
  ``logprobs`` as the number of alternatives per token (``options.top_logprobs``, default 1);
  chat takes ``logprobs: true`` plus ``top_logprobs``. The result dict then has ``logprobs``.
* ``options.echo`` (completions only) returns the prompt with the text; ``max_new_tokens`` and
  ``stop_sequences`` are spelled ``max_tokens`` and ``stop``; any sampling parameter name
  (``temperature``, ``seed``, ...) may also be given in ``options`` or ``parameters``.
* Anything else is refused with a ``ValidationError`` naming the field, before sending.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .errors import ValidationError
from .models import ChatRequest, CompletionRequest

__all__ = ["run_with_params", "run_structured", "structured_to_call"]

_REQUEST_KEYS = ("prompt", "messages", "context", "options", "parameters")
_ALIASES = {"max_new_tokens": "max_tokens", "stop_sequences": "stop"}
_OWN_OPTIONS = ("return_logprobs", "top_logprobs", "echo")
#: The most alternatives per token an OpenAI-style server returns (vLLM's ``--max-logprobs``
#: default, OpenAI's limit).
MAX_TOP_LOGPROBS = 20


def _handler_run(handler: Any) -> Callable[..., Any]:
    run = getattr(handler, "run", None)
    if not callable(run):
        raise ValidationError("must be an endpoint handler made by this package (a backend's "
                              "create_endpoint_handler)", field="handler")
    return run


def run_with_params(handler: Any, inputs: Any, params: Optional[Dict[str, Any]] = None) -> Any:
    """Run ``inputs`` through ``handler`` with ``params`` over its defaults; raise on error."""
    run = _handler_run(handler)
    if not isinstance(params, (dict, type(None))):
        raise ValidationError(f"must be a dict, not {type(params).__name__}", field="params")
    return run(inputs, params)


def _text(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise ValidationError(f"must be a string (or a list of strings), not {type(value).__name__}",
                          field=field)


def _with_context(inputs: Any, context: str, chat: bool) -> Any:
    if not context:
        return inputs
    if not chat:
        if isinstance(inputs, str):
            return f"{context}\n\n{inputs}"
        return [f"{context}\n\n{p}" for p in inputs]
    messages = [dict(m) for m in inputs]
    first = messages[0]
    if first.get("role") == "system" and isinstance(first.get("content"), str):
        first["content"] = f"{first['content']}\n\n{context}"
    else:
        messages.insert(0, {"role": "system", "content": context})
    return messages


def _map_options(options: Mapping[str, Any], chat: bool, adapter: Any = None) -> Dict[str, Any]:
    sampling_names = _known_sampling(adapter)
    out: Dict[str, Any] = {}
    for name, value in options.items():
        if name in _OWN_OPTIONS:
            continue
        key = _ALIASES.get(name, name)
        if key == "stream":
            raise ValidationError("streaming is not a per-request option here; use "
                                  "stream_generation()", field="options.stream")
        if key in ("logprobs", "prompt", "messages") or key not in sampling_names:
            raise ValidationError(
                f"unknown option {name!r}; options are {sorted(_OWN_OPTIONS + tuple(_ALIASES))} "
                f"or a sampling parameter such as temperature, top_p, max_tokens, stop, seed",
                field=f"options.{name}")
        out[key] = value
    want = options.get("return_logprobs", False)
    if not isinstance(want, bool):
        raise ValidationError("must be true or false", field="options.return_logprobs")
    top = options.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValidationError(f"must be an integer from 0 to {MAX_TOP_LOGPROBS}",
                                  field="options.top_logprobs")
        if not want:
            raise ValidationError("needs return_logprobs: true", field="options.top_logprobs")
    if want:
        if chat:
            out["logprobs"] = True
            if top is not None:
                out["top_logprobs"] = top
        else:
            out["logprobs"] = 1 if top is None else top
    echo = options.get("echo")
    if echo is not None:
        if not isinstance(echo, bool):
            raise ValidationError("must be true or false", field="options.echo")
        if chat:
            raise ValidationError("chat requests cannot echo the prompt", field="options.echo")
        out["echo"] = echo
    return out


def _known_sampling(adapter: Any = None) -> "set[str]":
    """The sampling names ``adapter``'s requests take (the OpenAI surface without one)."""
    if adapter is not None:
        fields = set(adapter.request_fields())
    else:
        fields = set(CompletionRequest.model_fields) | set(ChatRequest.model_fields)
    return fields - {"model", "prompt", "messages", "stream", "stream_options"}


def structured_to_call(request: Any, adapter: Any = None) -> Tuple[Any, Dict[str, Any]]:
    """A structured request -> (inputs for the handler, per-call parameters); ``options``
    may name any sampling field of ``adapter``'s requests."""
    if not isinstance(request, Mapping):
        raise ValidationError(f"must be a dict with 'prompt' (or 'messages'), 'context' and "
                              f"'options', not {type(request).__name__}", field="request")
    unknown = [k for k in request if k not in _REQUEST_KEYS]
    if unknown:
        raise ValidationError(f"unknown key {unknown[0]!r}; a structured request has "
                              f"{list(_REQUEST_KEYS)}", field=f"request.{unknown[0]}")
    has_prompt, has_messages = request.get("prompt") is not None, request.get("messages") is not None
    if has_prompt == has_messages:
        raise ValidationError("give exactly one of 'prompt' and 'messages'", field="request.prompt")
    if has_prompt:
        inputs = request["prompt"]
        if not isinstance(inputs, str) and not (
                isinstance(inputs, (list, tuple)) and inputs and all(isinstance(p, str) for p in inputs)):
            raise ValidationError("must be a string or a list of strings", field="request.prompt")
        chat = False
    else:
        inputs = request["messages"]
        if not isinstance(inputs, (list, tuple)) or not inputs or not all(
                isinstance(m, Mapping) and "role" in m for m in inputs):
            raise ValidationError("must be a list of chat messages (dicts with 'role')",
                                  field="request.messages")
        inputs = [dict(m) for m in inputs]
        chat = True
    context = request.get("context")
    context_text = "" if context is None else _text(context, "request.context")
    options = request.get("options") or {}
    if not isinstance(options, Mapping):
        raise ValidationError("must be a dict", field="request.options")
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise ValidationError("must be a dict", field="request.parameters")
    params = {**parameters, **_map_options(options, chat, adapter)}
    return _with_context(inputs, context_text, chat), params


def run_structured(handler: Any, request: Any) -> Any:
    """Run a structured request through ``handler``; the result carries ``logprobs`` if asked."""
    run = _handler_run(handler)
    inputs, params = structured_to_call(request, handler.client.adapter)
    return run(inputs, params)
