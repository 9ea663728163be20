"""What one client knows about its models' limits, held by the client itself.

Two facts per model, both per client: a profile's output cap (``vllm/_profiles.py`` may cap
how many tokens one request for a model may ask for) and the context length the server
reported (``list_models`` records ``max_model_len``). ``RequestLimits`` keeps both; every
``BaseApiBackend`` holds one as ``request_limits``, so the state lives and dies with its
client and nothing is kept at module level. ``BaseApiBackend`` applies it to every request
it sends (``cap_request``), whatever path built it. It knows no server: a cap is a number
per model name.

Rule: an explicit ``max_tokens`` (or chat's ``max_completion_tokens``) above the cap is
lowered to the cap. A chat request without one gets the cap, because the server would
otherwise let it run to the end of the context. A completion request without one is left
alone unless the cap is below 16: OpenAI-style servers default completions to 16 tokens.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterable, Optional

from .context import check_fits_context
from .errors import MediaTooLargeError, ValidationError
from .media import media_sizes
from .models import ChatRequest

__all__ = ["RequestLimits", "set_max_tokens_cap", "max_tokens_cap", "apply_max_tokens_cap",
           "cap_request", "COMPLETION_DEFAULT_MAX_TOKENS"]

#: What OpenAI-compatible servers generate for a completion that names no ``max_tokens``.
COMPLETION_DEFAULT_MAX_TOKENS = 16


class RequestLimits:
    """One client's output caps and known context lengths, by model name (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._caps: Dict[Optional[str], int] = {}
        self._lengths: Dict[str, int] = {}

    # -- caps ---------------------------------------------------------------------------
    def set_cap(self, model: Optional[str], cap: Optional[int]) -> None:
        """Cap ``max_tokens`` for ``model`` (None removes the cap)."""
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValidationError(f"must be a positive integer or None, got {cap!r}",
                                  field="max_tokens_cap")
        with self._lock:
            if cap is None:
                self._caps.pop(model, None)
            else:
                self._caps[model] = cap

    def cap(self, model: Optional[str]) -> Optional[int]:
        """The cap for ``model``, or None."""
        with self._lock:
            return self._caps.get(model)

    def capped_params(self, model: Optional[str], params: Optional[Dict[str, Any]],
                      chat: bool = False) -> Dict[str, Any]:
        """``params`` with ``max_tokens`` clamped to the model's cap (a new dict)."""
        out = dict(params or {})
        cap = self.cap(model)
        if cap is None:
            return out
        asked = [k for k in ("max_tokens", "max_completion_tokens") if out.get(k) is not None]
        for key in asked:
            if isinstance(out[key], int) and not isinstance(out[key], bool) and out[key] > cap:
                out[key] = cap
        if not asked and (chat or cap < COMPLETION_DEFAULT_MAX_TOKENS):
            out["max_tokens"] = cap
        return out

    # -- context lengths ----------------------------------------------------------------
    def learn_lengths(self, models: Iterable[Dict[str, Any]]) -> None:
        """Record ``max_model_len`` of every listed model (entries without one are skipped).
        With several endpoints the largest length seen is kept, so the client refuses only
        what no endpoint could take."""
        with self._lock:
            for m in models:
                name, length = m.get("id"), m.get("max_model_len")
                if isinstance(name, str) and isinstance(length, int) \
                        and not isinstance(length, bool) and length > 0:
                    self._lengths[name] = max(length, self._lengths.get(name, 0))

    def length(self, model: Optional[str]) -> Optional[int]:
        """The context length seen for ``model``, or None."""
        if model is None:
            return None
        with self._lock:
            return self._lengths.get(model)

    # -- per request --------------------------------------------------------------------
    def apply(self, request: Any) -> Any:
        """``request`` within its model's cap (the same object when no cap applies); a
        ``max_tokens`` beyond the model's known context (after the cap) raises
        ``ValidationError``."""
        request = self._capped(request)
        check_fits_context(request, self.length(request.model))
        return request

    def _capped(self, request: Any) -> Any:
        if self.cap(request.model) is None or not hasattr(request, "max_tokens"):
            return request
        chat = isinstance(request, ChatRequest)
        fields = {"max_tokens": request.max_tokens}
        if chat:
            fields["max_completion_tokens"] = request.max_completion_tokens
        params = self.capped_params(request.model, fields, chat=chat)
        changes = {k: v for k, v in params.items() if v != fields.get(k)}
        return request.model_copy(update=changes) if changes else request


# The functions below are the module's older surface, kept for callers (profiles, tests):
# each reads the client's own ``request_limits``.
def set_max_tokens_cap(client: Any, model: Optional[str], cap: Optional[int]) -> None:
    """Cap ``max_tokens`` for ``model`` on ``client`` (None removes the cap)."""
    client.request_limits.set_cap(model, cap)


def max_tokens_cap(client: Any, model: Optional[str]) -> Optional[int]:
    """The cap for ``model`` on ``client``, or None."""
    return client.request_limits.cap(model)


def apply_max_tokens_cap(client: Any, model: Optional[str], params: Optional[Dict[str, Any]],
                         chat: bool = False) -> Dict[str, Any]:
    """``params`` with ``max_tokens`` clamped to the model's cap (a new dict; input untouched)."""
    return client.request_limits.capped_params(model, params, chat=chat)


def cap_request(client: Any, request: Any) -> Any:
    """``client.request_limits.apply(request)``: what ``BaseApiBackend`` calls for every
    request it sends; a chat request's inline media are held to ``max_media_bytes`` here
    too (``MediaTooLargeError``), whatever path built it."""
    if isinstance(request, ChatRequest):
        check_media_cap(request, client.settings.max_media_bytes)
    return client.request_limits.apply(request)


def check_media_cap(request: Any, cap: int) -> None:
    """Every inline media item of ``request`` within ``cap`` decoded bytes (media.py)."""

    for where, size in media_sizes(request):
        if size > cap:
            raise MediaTooLargeError(f"{size} bytes of media, over max_media_bytes ({cap})",
                                     field=where, size=size, limit=cap)
