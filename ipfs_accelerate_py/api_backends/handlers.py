"""The framework's one-argument endpoint handler, for any backend client.

The ipfs_accelerate_py framework calls a handler with ONE positional argument: a prompt,
a list of prompts, chat messages, or a dict such as ``{"inputs": [...]}`` or
``{"prompt": ..., "parameters": {...}}``. It probes batch support with
``handler({"inputs": [..]})`` and expects a list back.

Return shape: a dict ``{"text", "texts", "model", "finish_reason", "usage", "id"}`` per
prompt (a list of them for a list input). This is the ONE place that returns errors
instead of raising: the framework expects ``{"error": message, "error_type": name}``.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Dict, List, Optional

from .call_shapes import check_timeout
from .request_build import build_request
from .errors import ApiError, ValidationError
from .models import ChatRequest, CompletionRequest, CompletionResult, unknown_field_message

__all__ = ["EndpointHandler", "make_endpoint_handler", "result_to_dict", "HANDLER_OPTIONS", "split_handler_parameters"]

#: Handler settings that shape how the handler calls the client; never sent to the server.
HANDLER_OPTIONS = {"batch_size", "priority", "timeout"}
_OPTIONAL_RESULT_FIELDS = ("logprobs", "token_ids", "prompt_token_ids", "prompt_logprobs",
                           "tool_calls", "reasoning")


def result_to_dict(result: CompletionResult) -> Dict[str, Any]:
    out = {"text": result.text, "texts": result.texts, "model": result.model,
           "finish_reason": result.finish_reason, "id": result.id,
           "usage": result.usage.model_dump()}
    first = result.choices[0] if result.choices else None
    # only what was asked for (and sent): logprobs, token ids, prompt logprobs, tools, reasoning
    for name in _OPTIONAL_RESULT_FIELDS:
        value = getattr(first, name, None)
        if value is not None:
            out[name] = value
    return out


def split_handler_parameters(parameters: Optional[Dict[str, Any]], adapter: Any = None
                             ) -> "tuple[Dict[str, Any], Dict[str, Any]]":
    """(sampling parameters for the server, handler options); names that are neither a field
    of ``adapter``'s requests (the OpenAI surface without one) nor an option raise now."""
    params = dict(parameters or {})
    if not isinstance(parameters, (dict, type(None))):
        raise ValidationError("must be a dict", field="parameters")
    options = {k: params.pop(k) for k in list(params) if k in HANDLER_OPTIONS}
    fields = adapter.request_fields() if adapter is not None else (
        set(CompletionRequest.model_fields) | set(ChatRequest.model_fields))
    known = set(fields) - {"prompt", "messages"}
    unknown = sorted(set(params) - known - {"prompt", "messages"})
    if unknown:
        raise ValidationError(f"{unknown_field_message(unknown[0], known | HANDLER_OPTIONS)}; "
                              f"handler options are {sorted(HANDLER_OPTIONS)}",
                              field=f"parameters.{unknown[0]}")
    if "timeout" in options:
        try:
            options["timeout"] = check_timeout(options["timeout"])
        except ValidationError as exc:
            raise ValidationError(str(exc), field="parameters.timeout") from None
    bs = options.get("batch_size")
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
        raise ValidationError("must be a positive integer", field="parameters.batch_size")
    return params, options


def _unpack(data: Any) -> "tuple[Any, Dict[str, Any]]":
    """A framework input -> (inputs, per-call parameters)."""
    if isinstance(data, dict):
        params = data.get("parameters") or {}
        if not isinstance(params, dict):
            raise ValidationError("must be a dict", field="parameters")
        for key in ("inputs", "prompt", "messages", "input", "text"):
            if key in data:
                return data[key], params
        raise ValidationError("a dict input needs 'inputs', 'prompt' or 'messages'", field="inputs")
    return data, {}


class EndpointHandler:
    """The handler ``make_endpoint_handler`` returns: call it with one framework input.

    Its attributes say what it is bound to (``client``, ``model``, default ``parameters``
    and handler ``options``); ``run(inputs, parameters)`` does the same work but raises
    typed errors, for callers that are not the framework."""

    def __init__(self, client: Any, model: Optional[str], defaults: Dict[str, Any],
                 options: Dict[str, Any]) -> None:
        self.client = client
        self.model = model
        self.parameters = dict(defaults)
        self.options = dict(options)
        self._defaults = defaults
        self._options = options

    def run(self, inputs: Any, call_params: Optional[Dict[str, Any]] = None) -> Any:
        """The handler's work, raising typed errors (for callers that are not the framework)."""
        if not isinstance(call_params, (dict, type(None))):
            raise ValidationError("must be a dict", field="parameters")
        client, model = self.client, self.model
        adapter = client.adapter
        sampling, call_options = split_handler_parameters(
            {**self._defaults, **self._options, **(call_params or {})}, adapter)
        priority = call_options.get("priority", 1)
        timeout = call_options.get("timeout")  # this call's deadline (checked when split)
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(p, str) for p in inputs):
            size = call_options.get("batch_size") or len(inputs)
            futures: List[Future] = [
                client.submit(build_request(list(inputs[i:i + size]), model, sampling,
                                            adapter=adapter),
                              priority, timeout=timeout)
                for i in range(0, len(inputs), size)]
            n = sampling.get("n") or 1
            out: List[Dict[str, Any]] = []
            for start, fut in zip(range(0, len(inputs), size), futures):
                result: CompletionResult = fut.result()
                for i in range(min(size, len(inputs) - start)):
                    part = result.for_prompt(i, n)
                    part.batch_usage = result.usage
                    out.append(result_to_dict(part))
            return out
        return result_to_dict(client.execute(build_request(inputs, model, sampling,
                                                           adapter=adapter), priority,
                                             timeout=timeout))

    def __call__(self, data: Any) -> Any:
        try:
            return self.run(*_unpack(data))
        except ApiError as exc:
            return {"error": str(exc), "error_type": type(exc).__name__}

    def __repr__(self) -> str:
        return f"<EndpointHandler model={self.model!r} options={self.options!r}>"


def make_endpoint_handler(client: Any, model: Optional[str] = None,
                          parameters: Optional[Dict[str, Any]] = None) -> EndpointHandler:
    """A one-argument handler bound to ``client`` and ``model`` with default ``parameters``.

    Per-call parameters override the defaults. ``batch_size`` splits a list of prompts into
    calls of at most that many prompts (sent concurrently); ``priority`` sets the queue
    priority and ``timeout`` (seconds) the deadline of each call, queueing and retries
    included (a call past it fails with ``TimeoutError``).
    """
    defaults, options = split_handler_parameters(parameters, client.adapter)
    return EndpointHandler(client, model, defaults, options)
