"""Per-model output caps on a client: ``max_tokens`` never above what a profile allows.

A profile (``profiles.py``) may cap how many tokens one request for a model may ask for,
on one client. The cap lives beside the client (a weak map, so a closed and dropped client
takes its caps with it) and ``BaseApiBackend`` applies it to every request it sends
(``cap_request``), whatever path built it. It knows no server: a cap is a number per
(client, model name).

Rule: an explicit ``max_tokens`` (or chat's ``max_completion_tokens``) above the cap is
lowered to the cap. A chat request without one gets the cap, because the server would
otherwise let it run to the end of the context. A completion request without one is left
alone unless the cap is below 16: OpenAI-style servers default completions to 16 tokens.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, Optional

from .context import check_fits_context, model_length
from .errors import ValidationError
from .models import ChatRequest

__all__ = ["set_max_tokens_cap", "max_tokens_cap", "apply_max_tokens_cap",
           "cap_request", "COMPLETION_DEFAULT_MAX_TOKENS"]

#: What OpenAI-compatible servers generate for a completion that names no ``max_tokens``.
COMPLETION_DEFAULT_MAX_TOKENS = 16

_caps: "weakref.WeakKeyDictionary[Any, Dict[Optional[str], int]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def set_max_tokens_cap(client: Any, model: Optional[str], cap: Optional[int]) -> None:
    """Cap ``max_tokens`` for ``model`` on ``client`` (None removes the cap)."""
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValidationError(f"must be a positive integer or None, got {cap!r}",
                              field="max_tokens_cap")
    with _lock:
        caps = _caps.setdefault(client, {})
        if cap is None:
            caps.pop(model, None)
        else:
            caps[model] = cap


def max_tokens_cap(client: Any, model: Optional[str]) -> Optional[int]:
    """The cap for ``model`` on ``client``, or None."""
    with _lock:
        caps = _caps.get(client)
        return caps.get(model) if caps else None


def apply_max_tokens_cap(client: Any, model: Optional[str], params: Optional[Dict[str, Any]],
                         chat: bool = False) -> Dict[str, Any]:
    """``params`` with ``max_tokens`` clamped to the model's cap (a new dict; input untouched)."""
    out = dict(params or {})
    cap = max_tokens_cap(client, model)
    if cap is None:
        return out
    asked = [k for k in ("max_tokens", "max_completion_tokens") if out.get(k) is not None]
    for key in asked:
        if isinstance(out[key], int) and not isinstance(out[key], bool) and out[key] > cap:
            out[key] = cap
    if not asked and (chat or cap < COMPLETION_DEFAULT_MAX_TOKENS):
        out["max_tokens"] = cap
    return out


def cap_request(client: Any, request: Any) -> Any:
    """A typed request within its model's cap on ``client`` (the same object when no cap
    applies). ``BaseApiBackend`` calls this for every request it sends, whatever the path;
    a ``max_tokens`` beyond the model's known context (after the cap) raises
    ``ValidationError`` here."""
    request = _capped(client, request)
    check_fits_context(request, model_length(client, request.model))
    return request


def _capped(client: Any, request: Any) -> Any:
    cap = max_tokens_cap(client, request.model)
    if cap is None:
        return request
    chat = isinstance(request, ChatRequest)
    fields = {"max_tokens": request.max_tokens}
    if chat:
        fields["max_completion_tokens"] = request.max_completion_tokens
    params = apply_max_tokens_cap(client, request.model, fields, chat=chat)
    changes = {k: v for k, v in params.items() if v != fields.get(k)}
    return request.model_copy(update=changes) if changes else request
