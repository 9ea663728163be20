"""The call shapes the framework uses, read once for every face that takes them.

Why: the framework calls ``run_inference(model_id, inputs, parameters, priority)`` and
expects ``stream_generation`` to take the same arguments; users of the short form write
``stream_generation(prompt, model=..., max_tokens=...)``. Both faces (``VllmClient`` and
the framework's ``vllm``) read their arguments here, so they cannot drift apart.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

from .errors import ValidationError

__all__ = ["stream_call", "check_timeout", "SEND_OPTIONS", "pop_send_options"]

#: What every way to send a request accepts (docs/client.md has the table): which endpoint,
#: the queue priority, fail at once on an OPEN circuit, and the call's deadline in seconds.
SEND_OPTIONS = ("endpoint_id", "priority", "fail_fast", "timeout")

_MODEL_NAMES = ("model_id", "model")
_INPUT_NAMES = ("inputs", "prompt")


def _one_of(kwargs: Dict[str, Any], names: Sequence[str]) -> Any:
    given = [n for n in names if kwargs.get(n) is not None]
    if len(given) > 1:
        raise ValidationError(f"give one of {list(names)}, not both", field=given[1])
    return kwargs.pop(given[0]) if given else None


def stream_call(args: Sequence[Any], kwargs: Dict[str, Any]) -> Tuple[Optional[str], Any, Dict[str, Any]]:
    """``(model, prompt, parameters)`` from any accepted call shape.

    One positional argument is the prompt (``stream_generation("Hi", model=...)``); two are
    ``(model_id, inputs)`` as in ``run_inference``. Keywords ``model_id``/``model`` and
    ``inputs``/``prompt`` name them; ``parameters={...}`` and flat sampling keywords merge,
    flat ones winning. A second positional that is a model name written the old way
    (``(prompt, model)``) cannot be told apart from ``(model, prompt)``: the run_inference
    order wins, as the framework expects."""
    kwargs = {k: v for k, v in kwargs.items() if not (k in _MODEL_NAMES + _INPUT_NAMES and v is None)}
    if len(args) > 2:
        raise ValidationError(f"takes at most 2 positional arguments (model_id, inputs), "
                              f"got {len(args)}", field="args")
    model = _one_of(kwargs, _MODEL_NAMES)
    prompt = _one_of(kwargs, _INPUT_NAMES)
    if len(args) == 2:
        if model is not None or prompt is not None:
            raise ValidationError("model and prompt given both by position and by name",
                                  field="model")
        model, prompt = args
    elif len(args) == 1:
        if prompt is not None:
            if model is not None:
                raise ValidationError("model and prompt given both by position and by name",
                                      field="model")
            model = args[0]  # stream_generation(MODEL, inputs=...)
        else:
            prompt = args[0]
    parameters = kwargs.pop("parameters", None)
    if not isinstance(parameters, (dict, type(None))):
        raise ValidationError(f"must be a dict, got {type(parameters).__name__}",
                              field="parameters")
    return model, prompt, {**(parameters or {}), **kwargs}


def check_timeout(timeout: Any) -> Optional[float]:
    """A call deadline in seconds: a positive finite number, or None for the default."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not math.isfinite(timeout) or timeout <= 0:
        raise ValidationError(f"must be a positive number of seconds, got {timeout!r}",
                              field="timeout")
    return float(timeout)


def pop_send_options(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Take the send options out of a call's keywords (the rest are request parameters)."""
    return {name: kwargs.pop(name) for name in SEND_OPTIONS if name in kwargs}
