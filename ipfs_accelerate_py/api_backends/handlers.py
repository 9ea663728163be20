"""The framework's one-argument endpoint handler, for any backend client.

The ipfs_accelerate_py framework calls a handler with ONE positional argument: a prompt,
a list of prompts, chat messages, or a dict such as ``{"inputs": [...]}`` or
``{"prompt": ..., "parameters": {...}}``. It probes batch support with
``handler({"inputs": [..]})`` and expects a list back.

Return shape: a dict ``{"text", "texts", "model", "finish_reason", "usage", "id"}`` per
prompt (a list of them for a list input). For an embedding model (``task="embed"``, or
learned: ``task="auto"``, the default, turns to embeddings once the server answers that it
has no generation route, as a ``--runner pooling`` vLLM does) it is
``{"embedding": [...], "model", "usage"}`` per input. This is the ONE place that returns errors
instead of raising: the framework expects ``{"error": message, "error_type": name}``.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Dict, List, Optional

from .call_shapes import check_timeout
from .request_build import build_request
from .errors import ApiError, HTTPStatusError, ValidationError
from .models import ChatRequest, CompletionRequest, CompletionResult, unknown_field_message

__all__ = ["EndpointHandler", "make_endpoint_handler", "result_to_dict", "HANDLER_OPTIONS", "split_handler_parameters"]

#: Handler settings that shape how the handler calls the client; never sent to the server.
HANDLER_OPTIONS = {"batch_size", "priority", "timeout", "task", "endpoint_id", "fail_fast"}
#: what a handler does with its inputs: generate, embed, or learn which from the server
HANDLER_TASKS = ("auto", "generate", "embed")
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
    fields = set(fields) | _embed_fields(adapter)  # a handler may serve an embedding model
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
    if options.get("task", "auto") not in HANDLER_TASKS:
        raise ValidationError(f"must be one of {list(HANDLER_TASKS)}", field="parameters.task")
    endpoint_id = options.get("endpoint_id")
    if endpoint_id is not None and not isinstance(endpoint_id, str):
        raise ValidationError("must be an endpoint id (a string)", field="parameters.endpoint_id")
    fail_fast = options.get("fail_fast")
    if fail_fast is not None and not isinstance(fail_fast, bool):
        raise ValidationError("must be true or false", field="parameters.fail_fast")
    bs = options.get("batch_size")
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
        raise ValidationError("must be a positive integer", field="parameters.batch_size")
    return params, options


def _embed_fields(adapter: Any) -> "set[str]":
    """The fields of the adapter's embedding request (none when it serves no embeddings)."""
    request = (getattr(adapter, "operation_requests", None) or {}).get("embed")
    return set(request.model_fields) - {"input"} if request is not None else set()


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
        #: "embed" once the server turned out to serve an embedding model (task "auto")
        self.task = options.get("task", "auto")

    def run(self, inputs: Any, call_params: Optional[Dict[str, Any]] = None) -> Any:
        """The handler's work, raising typed errors (for callers that are not the framework)."""
        if not isinstance(call_params, (dict, type(None))):
            raise ValidationError("must be a dict", field="parameters")
        adapter = self.client.adapter
        sampling, call_options = split_handler_parameters(
            {**self._defaults, **self._options, **(call_params or {})}, adapter)
        # how each call is sent: the options every way to send takes (call_shapes.SEND_OPTIONS)
        send = {"priority": call_options.get("priority", 1),
                "timeout": call_options.get("timeout"),  # this call's deadline (checked)
                "endpoint_id": call_options.get("endpoint_id"),
                "fail_fast": call_options.get("fail_fast")}
        task = call_options.get("task", self.task)
        if task == "embed":
            return self._embed(inputs, sampling, send)
        try:
            return self._generate(inputs, sampling, call_options, send)
        except HTTPStatusError as exc:
            if task != "auto" or not adapter.is_missing_route(exc) or isinstance(inputs, dict):
                raise
            self.task = "embed"  # no generation route: an embedding model's server
            return self._embed(inputs, sampling, send)

    def _embed(self, inputs: Any, params: Dict[str, Any], send: Dict[str, Any]) -> Any:
        """Text (or a list of texts) -> ``{"embedding", "model", "usage"}`` per input."""
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(m, dict) for m in inputs):
            raise ValidationError("an embedding model embeds text, not chat messages",
                                  field="inputs")
        fields = _embed_fields(self.client.adapter)  # the generation parameters stay behind
        result = self.client.embed(list(inputs) if isinstance(inputs, tuple) else inputs,
                                   model=self.model, **send,
                                   **{k: v for k, v in params.items() if k in fields})
        rows = [{"embedding": [float(x) for x in row], "model": result.model,
                 "usage": result.usage.model_dump()} for row in result.vectors]
        return rows if isinstance(inputs, (list, tuple)) else rows[0]

    def _generate(self, inputs: Any, sampling: Dict[str, Any], call_options: Dict[str, Any],
                  send: Dict[str, Any]) -> Any:
        client, model = self.client, self.model
        adapter = client.adapter
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(p, str) for p in inputs):
            size = call_options.get("batch_size") or len(inputs)
            futures: List[Future] = [
                client.submit(build_request(list(inputs[i:i + size]), model, sampling,
                                            adapter=adapter), **send)
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
                                                           adapter=adapter), **send))

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

    Per-call parameters override the defaults. ``task`` ("auto", "generate" or "embed")
    says what the handler does with its inputs (auto: generate, and embed from the first
    reply that says the server has no generation route on). ``batch_size`` splits a list of prompts into
    calls of at most that many prompts (sent concurrently); ``priority`` sets the queue
    priority and ``timeout`` (seconds) the deadline of each call, queueing and retries
    included (a call past it fails with ``TimeoutError``); ``endpoint_id`` sends through
    that endpoint and ``fail_fast`` refuses at once on an OPEN circuit, as for every call.
    """
    defaults, options = split_handler_parameters(parameters, client.adapter)
    return EndpointHandler(client, model, defaults, options)
