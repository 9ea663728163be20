"""What a model's context can hold, as far as the client knows: refuse ``max_tokens`` that
cannot fit before anything goes on the wire.

Why: an OpenAI-style server answers 400 "max_tokens=N cannot be greater than
max_model_len=L" for such a request; once the client has read ``max_model_len`` from
``/v1/models`` (every ``list_models`` call records it in the client's ``request_limits``,
``limits.py``), it can say so itself, with both numbers, without a round trip (and without
a breaker or retry ever seeing the call). The prompt's own length is the server's to judge:
the client has no tokenizer.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

from .errors import ValidationError

__all__ = ["learn_model_lengths", "model_length", "check_fits_context"]


def learn_model_lengths(client: Any, models: Iterable[Dict[str, Any]]) -> None:
    """Record ``max_model_len`` of every listed model in the client's ``request_limits``."""
    client.request_limits.learn_lengths(models)


def model_length(client: Any, model: Optional[str]) -> Optional[int]:
    """The context length ``client`` has seen for ``model``, or None."""
    return client.request_limits.length(model)


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
