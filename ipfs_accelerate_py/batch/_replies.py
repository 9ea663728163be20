"""One request of the file, sent through the client, and the output line it ends as.

``send`` is the only place a route meets the client: completions and chat go through the
client's async face (queue, shared calls, breaker, retries, routing); embeddings through
its ``aembed``.

The output line is vLLM run-batch's::

    {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}

A 200's ``body`` is the server's reply rebuilt from the client's typed result (the client
does not hand out the raw reply): the fields vLLM sends for a completion or a chat
completion, with ``usage`` this request's own counts. Where the client shared one HTTP call
between several requests (a prompt list on the wire), ``id`` and ``created`` are that call's.
A failure is an error object ``{"message", "type", "param", "code"}`` (vLLM's error shape);
``response`` carries the HTTP status when the server answered one, else it is null.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..api_backends import ChatRequest, CompletionResult, errors, validate_request

__all__ = ["send", "ok_line", "error_line", "to_request"]


def to_request(client: Any, url: str, body: Dict[str, Any]) -> Any:
    """The client's typed request for a line's body. Fields the client's request model does
    not know go in ``extra_body`` (forwarded as-is, as vLLM's own extras must be)."""
    if body.get("stream"):
        raise errors.ValidationError("a batch request is not streamed", field="stream")
    cls = (client.adapter.chat_request if url == "/v1/chat/completions"
           else client.adapter.completion_request)
    known = cls.model_fields
    data = {k: v for k, v in body.items() if k in known}
    extra = {k: v for k, v in body.items() if k not in known}
    if extra:
        data["extra_body"] = {**extra, **(body.get("extra_body") or {})}
    return validate_request(cls, data)


async def _embed(client: Any, body: Dict[str, Any]) -> Dict[str, Any]:
    """The embeddings route, through the client's ``aembed`` (concurrent lines with equal
    options share calls; vectors travel as base64 whatever the line asked), and the reply
    as vLLM writes it, in the ``encoding_format`` the line asked for (float by default)."""
    params = {k: v for k, v in body.items() if k not in ("input", "model", "encoding_format")}
    wanted = body.get("encoding_format") or "float"
    result = await client.aembed(body.get("input"), model=body.get("model"), **params)
    data = []
    for i, row in enumerate(result.vectors):
        vector: Any = (base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode()
                       if wanted == "base64" else [float(x) for x in row])
        data.append({"index": i, "object": "embedding", "embedding": vector})
    tokens = result.usage.prompt_tokens
    return {"id": result.id, "object": "list", "created": result.created, "model": result.model,
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                                    "completion_tokens": 0, "prompt_tokens_details": None,
                                    "completion_tokens_details": None}}


async def send(client: Any, url: str, body: Dict[str, Any]) -> Dict[str, Any]:
    """Send one request; the reply body as vLLM writes it. Raises the client's typed errors."""
    if url == "/v1/embeddings":
        return await _embed(client, body)
    request = to_request(client, url, body)
    result = await client.asubmit(request)
    return reply_body(request, result, body)


def reply_body(request: Any, result: CompletionResult, body: Dict[str, Any]) -> Dict[str, Any]:
    """The server's reply, rebuilt from the typed result."""
    usage = {"prompt_tokens": result.usage.prompt_tokens,
             "total_tokens": result.usage.total_tokens,
             "completion_tokens": result.usage.completion_tokens}
    ids_asked = bool(body.get("return_token_ids"))
    if isinstance(request, ChatRequest):
        choices = [{"index": c.index,
                    "message": {"role": "assistant", "content": c.text,
                                "tool_calls": c.tool_calls or [], "reasoning": c.reasoning},
                    "logprobs": c.logprobs, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "token_ids": c.token_ids if ids_asked else None}
                   for c in result.choices]
        obj = "chat.completion"
    else:
        choices = [{"index": c.index, "text": c.text, "logprobs": c.logprobs,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                    "token_ids": c.token_ids if ids_asked else None,
                    "prompt_logprobs": c.prompt_logprobs,
                    "prompt_token_ids": c.prompt_token_ids if ids_asked else None}
                   for c in result.choices]
        obj = "text_completion"
    return {"id": result.id, "object": result.object or obj, "created": result.created,
            "model": result.model, "choices": choices, "usage": usage}


#: line ids: a random prefix per process and a counter (a uuid4 per line costs more than
#: the rest of the line's formatting on some kernels)
_PREFIX = os.urandom(6).hex()
_COUNT = itertools.count(1)


def _ids() -> Tuple[str, str]:
    h = f"{_PREFIX}{next(_COUNT):010x}"
    return f"iap-{h}", f"iap-batch-{h}"


def ok_line(custom_id: str, body: Dict[str, Any]) -> bytes:
    line_id, request_id = _ids()
    return _dump({"id": line_id, "custom_id": custom_id,
                  "response": {"status_code": 200, "request_id": request_id, "body": body},
                  "error": None})


def error_of(exc: BaseException) -> Tuple[Optional[int], Dict[str, Any]]:
    """(HTTP status or None, vLLM-shaped error object) for a failed request."""
    status: Optional[int] = None
    param = None
    kind = type(exc).__name__
    message = getattr(exc, "message", None) or str(exc) or kind
    if isinstance(exc, errors.HTTPStatusError):
        status = exc.status_code
        param = exc.param
        kind = exc.error_type or kind
    elif isinstance(exc, errors.ValidationError):
        status = 400  # refused before sending, as the server refuses a bad request
        param = exc.field
    return status, {"message": errors.redact(str(message)), "type": kind, "param": param,
                    "code": status}


def error_line(custom_id: str, exc: BaseException) -> bytes:
    line_id, request_id = _ids()
    status, error = error_of(exc)
    response = None if status is None else {"status_code": status, "request_id": request_id,
                                            "body": None}
    return _dump({"id": line_id, "custom_id": custom_id, "response": response, "error": error})


def _dump(obj: Dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
