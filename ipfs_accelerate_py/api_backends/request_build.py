"""Caller input -> a typed request, for every face (sync, async, the framework's, handlers).

Why one module: each face accepts the same inputs (a prompt, a list of prompts, chat
messages) and must refuse bad ones with the same ``ValidationError`` before anything is
sent; written once here, no face can drift from the others.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from .adapter import BackendAdapter
from .errors import ValidationError
from .models import ChatRequest, CompletionRequest, Request, coerce_messages, validate_request

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
    return validate_request(adapter.completion_request if adapter else CompletionRequest,
                            {**params, "model": model, "prompt": inputs})
