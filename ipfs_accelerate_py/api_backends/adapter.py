"""What a backend plugin supplies: the wire format, and nothing else.

A ``BackendAdapter`` turns our typed requests into HTTP requests and the server's bytes
back into typed results; it also builds the framework's one-argument endpoint handlers.
Queueing, retries, the circuit breaker, batching and metrics belong to ``BaseApiBackend``
and are the same for every adapter.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Collection, Dict, FrozenSet, List, Optional, Type

from .errors import HTTPStatusError, ResponseError, StreamError, error_for_status
from .models import ChatRequest, CompletionRequest, CompletionResult, Request, StreamChunk
from .transport import HttpRequest, HttpResponse

__all__ = ["BackendAdapter", "load_json", "decode_stream_event", "parse_model_list", "wire_body"]

log = logging.getLogger("ipfs_accelerate_py.api_backends")


def wire_body(request: Request, exclude: Collection[str] = ()) -> Dict[str, Any]:
    """The request's JSON body: every field that is set (wire names, e.g. ``json`` and
    ``schema`` inside structured outputs), then ``extra_body`` merged over it as-is.

    ``extra_body`` is forwarded only after the known fields validated; its keys (never its
    values, which may be secret) are logged at DEBUG so a forwarded field can be traced."""
    body = request.model_dump(exclude_none=True, by_alias=True,
                              exclude={"extra_body", *exclude})
    extra = request.extra_body
    if extra:
        log.debug("forwarding extra_body keys %s as-is", sorted(extra))
        body.update(extra)
    return body


def load_json(response: HttpResponse) -> Any:
    """Decode a JSON reply, or raise ``ResponseError`` saying what came instead."""
    body = response.body
    try:
        return json.loads(body)
    except ValueError:
        if not body.strip():
            raise ResponseError("empty reply from server", status_code=response.status) from None
        text = body[:200].decode("utf-8", errors="replace")
        kind = "HTML" if text.lstrip().lower().startswith(("<!doctype", "<html")) else "non-JSON"
        raise ResponseError(f"{kind} reply from server (status {response.status}): {text!r}",
                            status_code=response.status, body=text) from None


def decode_stream_event(data: str) -> Optional[Dict[str, Any]]:
    """An OpenAI-style SSE payload -> its JSON object; ``None`` for ``[DONE]``. A mid-stream
    ``{"error": ...}`` event (sent after a 200 status) raises ``StreamError``."""
    if data[:1] != "{" and data.strip() == "[DONE]":  # (an object needs no strip)
        return None
    try:
        event = json.loads(data)
    except ValueError:
        raise ResponseError(f"stream event is not JSON: {data[:200]!r}") from None
    if not isinstance(event, dict):
        raise ResponseError(f"stream event is not an object: {data[:200]!r}")
    err = event.get("error")
    if err is not None:
        if isinstance(err, dict):
            code = err.get("code")
            raise StreamError(str(err.get("message") or err), error_type=err.get("type"),
                              code=code if isinstance(code, int) else None)
        raise StreamError(str(err))
    return event


def parse_model_list(response: HttpResponse) -> List[Dict[str, Any]]:
    """An OpenAI-style ``/v1/models`` reply -> the model dicts (each with an ``id``)."""
    data = load_json(response)
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ResponseError("models reply has no 'data' list", status_code=response.status)
    return [m for m in items if isinstance(m, dict) and "id" in m]


class BackendAdapter(ABC):
    """The wire format of one kind of server. Subclasses set the class attributes."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: environment-variable prefix for this backend's settings, e.g. ``VLLM_``
    env_prefix: ClassVar[str] = ""
    default_base_url: ClassVar[str] = "http://localhost:8000"
    #: completion requests with equal sampling parameters may share one call (prompt list)
    supports_prompt_list: ClassVar[bool] = False
    #: chat requests with equal sampling parameters may share one call (``ChatBatchRequest``)
    supports_chat_batch: ClassVar[bool] = False
    supports_streaming: ClassVar[bool] = True
    #: request headers that make the server put its load report on the reply (vLLM:
    #: ``endpoint-load-metrics-format: JSON``); the client adds them when its last report
    #: of that endpoint is getting old, not to every request (they cost the server time)
    load_report_headers: ClassVar[Dict[str, str]] = {}
    #: whether the unified test generator writes a runner for this backend
    unified_runner: ClassVar[bool] = True
    #: the typed requests this server takes: the OpenAI surface, or subclasses with the
    #: server's own fields (every path of the client builds these)
    completion_request: ClassVar[Type[CompletionRequest]] = CompletionRequest
    chat_request: ClassVar[Type[ChatRequest]] = ChatRequest
    #: the typed request of each operation beyond generation this server answers, by name
    #: (``operations.OPERATIONS``: "embed", "score", ...); format/parse take them too
    operation_requests: ClassVar[Dict[str, Type[Any]]] = {}

    @classmethod
    def request_fields(cls) -> FrozenSet[str]:
        """Every field a completion or chat request to this server may carry."""
        return frozenset(cls.completion_request.model_fields) | frozenset(
            cls.chat_request.model_fields)

    @abstractmethod
    def format_request(self, request: Request, *, priority: Optional[int] = None,
                       request_id: Optional[str] = None) -> HttpRequest:
        """Our typed request -> the HTTP request this server expects."""

    @abstractmethod
    def parse_response(self, request: Request, response: HttpResponse) -> CompletionResult:
        """A 2xx reply -> our typed result (raises ResponseError if it is not one)."""

    @abstractmethod
    def parse_stream_event(self, request: Request, data: str) -> Optional[List[StreamChunk]]:
        """One SSE ``data`` payload -> chunks; ``None`` marks the end of the stream."""

    def stream_parser(self, request: Request) -> Callable[[str], Optional[List[StreamChunk]]]:
        """``parse_stream_event`` for every event of one stream of ``request``: what the
        request decides (chat or not, a list or not) is looked at once per stream, not once
        per event (an adapter overrides it where that pays; the default asks
        ``parse_stream_event`` each time)."""
        parse = self.parse_stream_event
        return lambda data: parse(request, data)

    @abstractmethod
    def models_request(self) -> HttpRequest:
        """The request that lists served models."""

    @abstractmethod
    def parse_models(self, response: HttpResponse) -> List[Dict[str, Any]]:
        """The models reply -> a list of dicts with at least ``id``."""

    def health_request(self) -> Optional[HttpRequest]:
        """A cheap request that answers below 500 while the server is up: an OPEN circuit
        probes it on its own schedule, and a suspected outage is checked with it. ``None``:
        no such request; the breaker lets a caller's request through as its probe."""
        return HttpRequest("GET", "/health")

    def parse_error(self, response: HttpResponse) -> HTTPStatusError:
        """A non-2xx reply -> the typed error for its status."""
        return error_for_status(response.status, response.text(), dict(response.headers))

    def is_priority_rejection(self, error: HTTPStatusError) -> bool:
        """True when the server refused the request only because it carried a priority."""
        return False

    def is_missing_route(self, error: HTTPStatusError) -> bool:
        """True when the server has no such route (an older version), as opposed to, say,
        no such model: the framework's bare ``{"detail": ...}`` 404/405, not an API error."""
        return error.status_code in (404, 405) and error.error_type is None

    @abstractmethod
    def create_endpoint_handler(self, client: Any, model: Optional[str] = None,
                                parameters: Optional[Dict[str, Any]] = None) -> Callable[[Any], Any]:
        """A one-argument callable for the framework, bound to ``client`` and ``model``."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.name!r}>"
