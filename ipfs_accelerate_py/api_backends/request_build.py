"""Caller input -> a typed request, for every face (sync, async, the framework's, handlers).

Why one module: each face accepts the same inputs (a prompt, a list of prompts, chat
messages) and must refuse bad ones with the same ``ValidationError`` before anything is
sent; written once here, no face can drift from the others.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from .adapter import BackendAdapter
from .errors import ValidationError
from .models import (ChatRequest, CompletionRequest, Request, check_text, coerce_messages,
                     updated, validate_request)

__all__ = ["build_request", "chat_request", "stream_request"]


def chat_request(adapter: Any, messages: Any, model: Optional[str],
                 parameters: Dict[str, Any]) -> Request:
    """The validated chat request of ``chat_completion`` and ``achat_completion``."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValidationError("must be a non-empty list of chat messages", field="messages")
    return validate_request(adapter.chat_request, {**parameters, "model": model,
                                                   "messages": coerce_messages(messages)})


def stream_request(adapter: Any, prompt: Any, model: Optional[str],
                   parameters: Dict[str, Any]) -> Request:
    """The validated request of ``stream_generation`` and ``astream_generation``."""
    if isinstance(prompt, list) and not all(isinstance(m, dict) for m in prompt):
        raise ValidationError("stream one prompt (a string) or chat messages", field="prompt")
    return build_request(prompt, model, parameters, stream=True, adapter=adapter)


def build_request(inputs: Any, model: Optional[str], parameters: Optional[Dict[str, Any]] = None,
                  stream: bool = False, adapter: Optional[BackendAdapter] = None) -> Request:
    """Caller input -> typed request: text or a list of texts -> completion, messages -> chat,
    as ``adapter``'s request classes (the OpenAI surface without one)."""
    if not isinstance(parameters, (dict, type(None))):
        raise ValidationError(f"must be a dict, got {type(parameters).__name__}", field="parameters")
    params = dict(parameters or {})
    if model is not None and not isinstance(model, str):
        raise ValidationError(f"must be a string, got {type(model).__name__}", field="model")
    if stream:
        params["stream"] = True
    if isinstance(inputs, (list, tuple)) and inputs and all(
            isinstance(m, dict) and "role" in m for m in inputs):
        return validate_request(adapter.chat_request if adapter else ChatRequest,
                                {**params, "model": model, "messages": coerce_messages(inputs)})
    if isinstance(inputs, (list, tuple)) and inputs and not all(isinstance(p, str) for p in inputs) \
            and any(isinstance(m, dict) for m in inputs):
        raise ValidationError("a list must hold only prompts (strings) or only chat messages "
                              "(dicts with 'role' and 'content')", field="inputs")
    if inputs is None:
        raise ValidationError("is required (a prompt, a list of prompts, or chat messages)",
                              field="inputs")
    if not isinstance(inputs, (str, list, tuple)):
        raise ValidationError(f"must be a string, a list of strings or chat messages, "
                              f"not {type(inputs).__name__}", field="inputs")
    cls = adapter.completion_request if adapter else CompletionRequest
    if type(inputs) is str and inputs:
        return _completion(cls, model, params, inputs)
    return validate_request(cls, {**params, "model": model, "prompt": inputs})


#: validated completion requests by (class, model, parameters), each with the prompt it was
#: first validated with: parameters that are all scalars validate the same whatever the
#: prompt, so a request with a new prompt is a copy with only that field changed
_TEMPLATES: Dict[Tuple[Any, ...], Request] = {}
_TEMPLATE_LIMIT = 512
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _completion(cls: Any, model: Optional[str], params: Dict[str, Any], prompt: str) -> Request:
    """``validate_request(cls, {**params, "model": model, "prompt": prompt})`` for one prompt
    string. Its validation is most of a request's cost on the client, and a caller sends the
    same parameters again and again: parameters that are all scalars (``max_tokens``,
    ``temperature``, ...) are validated once per class, model and values, and each request
    after is a copy with its own prompt, checked as the prompt field's validator checks it
    (no model-level rule of a completion reads a one-string prompt). Anything else, and any
    prompt the check refuses, takes the whole validation (so its error is the same)."""
    items = []
    for name, value in params.items():
        kind = type(value)
        if kind not in _SCALARS:
            return validate_request(cls, {**params, "model": model, "prompt": prompt})
        items.append((name, kind, value))  # the type too: True == 1 == 1.0
    key = (cls, model, tuple(items))
    template = _TEMPLATES.get(key)
    if template is None:
        template = validate_request(cls, {**params, "model": model, "prompt": prompt})
        if len(_TEMPLATES) >= _TEMPLATE_LIMIT:
            _TEMPLATES.clear()  # many distinct parameter sets: start over, bounded
        _TEMPLATES[key] = template
    else:
        try:
            check_text(prompt, "prompt")
        except ValueError:
            return validate_request(cls, {**params, "model": model, "prompt": prompt})
    return _with_prompt(template, prompt)


def _with_prompt(template: Request, prompt: str) -> Request:
    """A copy of ``template`` (whose other fields hold only scalars: nothing shared can be
    changed through the copy) with ``prompt``; the same fields count as set."""
    return updated(template, {"prompt": prompt})
