"""What a model's context can hold, as far as the client knows: refuse ``max_tokens`` that
cannot fit before anything goes on the wire.

Why: vLLM answers 400 "max_tokens=N cannot be greater than max_model_len=L" for such a
request; once the client has read ``max_model_len`` from ``/v1/models`` (every
``list_models`` call records it), it can say so itself, with both numbers, without a round
trip (and without a breaker or retry ever seeing the call). The prompt's own length is the
server's to judge: the client has no tokenizer. Lengths live beside the client in a weak
map, like ``limits.py``'s caps, so a dropped client takes them with it.

With several endpoints a model may have different lengths; the largest one seen is kept, so
the client refuses only what no endpoint could take.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, Iterable, Optional

from .errors import ValidationError

__all__ = ["learn_model_lengths", "model_length", "check_fits_context"]

_lengths: "weakref.WeakKeyDictionary[Any, Dict[str, int]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def learn_model_lengths(client: Any, models: Iterable[Dict[str, Any]]) -> None:
    """Record ``max_model_len`` of every listed model (entries without one are skipped)."""
    with _lock:
        known = _lengths.setdefault(client, {})
        for m in models:
            name, length = m.get("id"), m.get("max_model_len")
            if isinstance(name, str) and isinstance(length, int) and not isinstance(length, bool) \
                    and length > 0:
                known[name] = max(length, known.get(name, 0))


def model_length(client: Any, model: Optional[str]) -> Optional[int]:
    """The context length the client has seen for ``model``, or None."""
    if model is None:
        return None
    with _lock:
        known = _lengths.get(client)
        return known.get(model) if known else None


def check_fits_context(request: Any, max_model_len: Optional[int]) -> None:
    """Raise ``ValidationError`` when the request's output limit (``max_tokens``, chat's
    ``max_completion_tokens``) or ``truncate_prompt_tokens`` exceeds ``max_model_len``."""
    if max_model_len is None:
        return
    for field in ("max_completion_tokens", "max_tokens", "truncate_prompt_tokens"):
        value = getattr(request, field, None)
        if value is not None and value > max_model_len:
            raise ValidationError(
                f"{field}={value} cannot fit the context of model {request.model!r}: "
                f"max_model_len={max_model_len}", field=field)
