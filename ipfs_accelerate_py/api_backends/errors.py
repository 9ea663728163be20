"""Every error an API backend call can raise, in one tree.

Callers catch the branch they care about: ``ApiError`` for everything,
``TransientError`` for what the retry layer retries, ``HTTPStatusError`` for any
answer the server gave with a non-2xx status.

    ApiError
    ├── ValidationError            bad input, raised before anything is sent (names the field;
    │   │                          also a ``ValueError``)
    │   ├── ConfigurationError     bad client settings (URL, port, header, profile name)
    │   └── MediaTooLargeError     a content part's media over ``max_media_bytes``
    ├── ResponseError              a reply that cannot be understood (non-JSON, truncated, HTML,
    │   │                          empty, missing fields, broken framing such as two different
    │   │                          ``Content-Length`` values)
    │   ├── ResponseTooLargeError  a reply body over ``max_response_bytes``; refused while reading
    │   ├── ReplyMismatchError     a reply that does not answer what was asked (choices missing,
    │   │                          duplicated or unnumbered in a prompt list, a member's stream
    │   │                          ended early, usage that does not add up); never split
    │   ├── StreamError            an ``{"error": ...}`` event inside a 200 SSE stream
    │   └── StructuredOutputError  a ``response_model`` answer that does not validate (keeps
    │                              the raw text and the result)
    ├── TransientError             worth retrying (and counted by the circuit breaker)
    │   ├── ConnectionError        refused, reset, dropped, DNS
    │   └── TimeoutError           connect/read timeout, stream idle timeout, call deadline
    │       ├── QueueTimeoutError  waited in the queue past the deadline
    │       └── CircuitWaitTimeoutError  waited for an OPEN circuit past the deadline (says
    │                                    how long it waited)
    ├── HTTPStatusError            the server answered with a non-2xx status
    │   ├── BadRequestError        400 (also: context too long, n>1 with greedy sampling)
    │   │   └── UnsupportedMediaError  a media content part the model does not take
    │   ├── AuthenticationError    401
    │   ├── PermissionDeniedError  403
    │   ├── NotFoundError          404 (unknown model, unknown route)
    │   ├── MethodNotAllowedError  405
    │   ├── RequestTimeoutError    408  (also a TransientError)
    │   ├── ConflictError          409  (also a TransientError)
    │   ├── UnprocessableEntityError 422
    │   ├── RateLimitError         429  (also a TransientError; carries ``retry_after``)
    │   └── ServerError            5xx  (also a TransientError)
    │       └── ServiceUnavailableError 503
    ├── CircuitOpenError           the endpoint's breaker is OPEN; says when it retries
    ├── QueueFullError             the bounded request queue is full
    ├── ClientClosedError          the client was closed; queued work is failed with this
    └── NoHealthyEndpointError     every endpoint of a routed call is down

Messages never contain an API key: error text from the server is passed through
``redact`` before it is stored.
"""

from __future__ import annotations

import json
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any, Dict, Optional, Type

__all__ = [
    "ApiError", "ValidationError", "ConfigurationError", "ResponseError",
    "ResponseTooLargeError", "ReplyMismatchError", "MediaTooLargeError", "UnsupportedMediaError", "StreamError", "StructuredOutputError",
    "TransientError", "ConnectionError", "TimeoutError", "HTTPStatusError", "BadRequestError",
    "AuthenticationError", "PermissionDeniedError", "NotFoundError", "MethodNotAllowedError",
    "RequestTimeoutError", "ConflictError", "UnprocessableEntityError", "RateLimitError",
    "ServerError", "ServiceUnavailableError", "CircuitOpenError", "QueueFullError",
    "QueueTimeoutError", "CircuitWaitTimeoutError", "ClientClosedError", "NoHealthyEndpointError", "error_for_status",
    "describe_error_body", "redact",
]

_BEARER = re.compile(r"(Bearer\s+)[^\s\"',;]+", re.IGNORECASE)
_SECRETS: "set[str]" = set()


def register_secret(secret: Optional[str]) -> None:
    """Remember a secret so that ``redact`` removes it from any text (keys of 4+ chars)."""
    if secret and len(secret) >= 4:
        _SECRETS.add(secret)


def redact(text: str) -> str:
    """Remove bearer tokens and every registered secret from ``text``."""
    if not text:
        return text
    text = _BEARER.sub(r"\1***", text)
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class ApiError(Exception):
    """Base of every error raised by an API backend."""

    def __init__(self, message: str, **context: Any) -> None:
        message = redact(str(message))
        super().__init__(message)
        self.message = message
        self.context = context

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class ValidationError(ApiError, ValueError):
    """Bad input, caught before anything went on the wire. ``field`` names the culprit."""

    def __init__(self, message: str, field: Optional[str] = None, **context: Any) -> None:
        self.field = field
        if field and field not in message:
            message = f"{field}: {message}"
        super().__init__(message, **context)


class ConfigurationError(ValidationError):
    """Bad client configuration (URL, port, header, profile); a kind of bad input."""


class MediaTooLargeError(ValidationError):
    """A chat content part carries more media than the ``max_media_bytes`` setting allows
    (never sent); ``field`` names the part, ``context`` has ``size`` and ``limit``."""


class ResponseError(ApiError):
    """The server's reply could not be understood."""

    def __init__(self, message: str, status_code: Optional[int] = None, body: str = "",
                 **context: Any) -> None:
        super().__init__(message, **context)
        self.status_code = status_code
        self.body = redact(body[:2000]) if body else ""


class StructuredOutputError(ResponseError):
    """The answer to a ``response_model`` request is not an instance of it: ``raw_text`` is
    what the model said, ``result`` the whole reply, ``errors`` pydantic's complaints."""

    def __init__(self, message: str, raw_text: str = "", result: Any = None,
                 errors: Any = None) -> None:
        super().__init__(message, body=raw_text)
        self.raw_text = raw_text
        self.result = result
        self.errors = errors or []


class ResponseTooLargeError(ResponseError):
    """A reply body passed the ``max_response_bytes`` cap; ``limit`` is that cap in bytes.

    Raised while reading (a declared ``Content-Length`` over the cap before any byte of the
    body is read), so a hostile or broken server cannot make the client allocate without
    bound. Not transient: the same request would get the same reply. The connection it came
    on is closed, never reused."""

    def __init__(self, message: str, limit: int, status_code: Optional[int] = None,
                 **context: Any) -> None:
        super().__init__(message, status_code=status_code, limit=limit, **context)
        self.limit = limit


class ReplyMismatchError(ResponseError):
    """The reply does not match the request: a prompt list answered with missing, extra,
    duplicated or unnumbered choices, a shared stream that ended before a member's last
    choice, or usage that does not add up. ``expected`` and ``received`` say what was asked
    and what came; ``partial_text`` is what a stream had yielded before it was detected.

    Why a type of its own: a shared call's reply is split among callers, and a reply that
    does not match would hand a caller another caller's text (or a short one) as success.
    The batcher re-sends the members of a mismatched shared call alone and stops sharing
    prompt lists with that endpoint (``batch_prompt_lists``)."""

    def __init__(self, message: str, expected: str = "", received: str = "",
                 partial_text: str = "", **context: Any) -> None:
        super().__init__(f"{message} (expected {expected}; received {received})"
                         if expected or received else message, **context)
        self.expected = expected
        self.received = received
        self.partial_text = partial_text


class StreamError(ResponseError):
    """An error event arrived inside a stream; ``partial_text`` is what came before it."""

    def __init__(self, message: str, partial_text: str = "", error_type: Optional[str] = None,
                 code: Optional[int] = None, **context: Any) -> None:
        super().__init__(message, status_code=code, **context)
        self.partial_text = partial_text
        self.error_type = error_type
        self.code = code


class TransientError(ApiError):
    """A failure that may pass: retried with backoff and counted by the circuit breaker."""


class ConnectionError(TransientError):  # noqa: A001 - deliberate, like httpx
    """Could not connect, or the connection dropped before a full reply."""


class TimeoutError(TransientError):  # noqa: A001
    """A connect, read, idle-stream or whole-call deadline passed."""


class HTTPStatusError(ApiError):
    """The server answered with a non-2xx status."""

    status_code: int = 0

    def __init__(self, message: str, status_code: Optional[int] = None,
                 error_type: Optional[str] = None, param: Optional[str] = None,
                 body: str = "", headers: Optional[Dict[str, str]] = None,
                 **context: Any) -> None:
        if status_code is not None:
            self.status_code = status_code
        super().__init__(message, **context)
        self.error_type = error_type
        self.param = param
        self.body = redact(body[:2000]) if body else ""
        self.headers = {k: v for k, v in (headers or {}).items()
                        if k.lower() not in ("authorization", "set-cookie")}

    def __str__(self) -> str:
        return f"HTTP {self.status_code}: {self.message}"


class BadRequestError(HTTPStatusError):
    """400: the server rejected the parameters or the prompt."""
    status_code = 400


class UnsupportedMediaError(BadRequestError):
    """The server's model takes no media of a content part's kind (a text-only model given
    an image, audio or video part): the server's 400, typed."""


class AuthenticationError(HTTPStatusError):
    """401: missing or wrong API key."""
    status_code = 401


class PermissionDeniedError(HTTPStatusError):
    """403."""
    status_code = 403


class NotFoundError(HTTPStatusError):
    """404: unknown model or route."""
    status_code = 404


class MethodNotAllowedError(HTTPStatusError):
    """405."""
    status_code = 405


class RequestTimeoutError(HTTPStatusError, TransientError):
    """408: the server timed the request out."""
    status_code = 408


class ConflictError(HTTPStatusError, TransientError):
    """409."""
    status_code = 409


class UnprocessableEntityError(HTTPStatusError):
    """422."""
    status_code = 422


class RateLimitError(HTTPStatusError, TransientError):
    """429: slow down; ``retry_after`` (seconds) when the server said."""
    status_code = 429

    def __init__(self, message: str, retry_after: Optional[float] = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(HTTPStatusError, TransientError):
    """5xx: the server failed."""
    status_code = 500

    def __init__(self, message: str, retry_after: Optional[float] = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServiceUnavailableError(ServerError):
    """503: overloaded, or the engine died."""
    status_code = 503


class CircuitOpenError(ApiError):
    """The endpoint's circuit breaker is OPEN: rejected at once, nothing sent."""

    def __init__(self, message: str, retry_at: Optional[float] = None,
                 retry_in: Optional[float] = None, endpoint: Optional[str] = None) -> None:
        super().__init__(message)
        self.retry_at = retry_at
        self.retry_in = retry_in
        self.endpoint = endpoint


class QueueFullError(ApiError):
    """The bounded request queue is at ``queue_size``."""


class QueueTimeoutError(TimeoutError):
    """The request waited in the queue past its deadline; it was never sent."""


class CircuitWaitTimeoutError(TimeoutError):
    """The request waited for its endpoint's OPEN circuit until its deadline; never sent.

    ``waited`` is how long it waited for the circuit, in seconds."""

    def __init__(self, message: str, waited: float = 0.0, endpoint: Optional[str] = None,
                 **context: Any) -> None:
        super().__init__(message, sent=False, **context)
        self.waited = waited
        self.endpoint = endpoint


class ClientClosedError(ApiError):
    """The client was closed before this request could run."""


class NoHealthyEndpointError(ApiError):
    """A routed call found every endpoint down (breaker open or failing)."""


_BY_STATUS: Dict[int, Type[HTTPStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
    404: NotFoundError, 405: MethodNotAllowedError, 408: RequestTimeoutError,
    409: ConflictError, 422: UnprocessableEntityError, 429: RateLimitError,
    503: ServiceUnavailableError,
}


def parse_retry_after(headers: Dict[str, str]) -> Optional[float]:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = lower.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def describe_error_body(body: str) -> "tuple[str, Optional[str], Optional[str]]":
    """(message, type, param) from the error shapes OpenAI-style servers and FastAPI send;
    any other body gives its first 200 characters as the message. A backend with an error
    shape of its own describes it first (``BackendAdapter.parse_error``)."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):  # OpenAI style
            return (str(err.get("message") or err), err.get("type"),
                    err.get("param") if isinstance(err.get("param"), str) else None)
        if isinstance(err, str):  # a bare string, e.g. a 401: {"error": "Unauthorized"}
            return err, None, None
        if "detail" in data:  # FastAPI: {"detail": "Not Found"} or a list of problems
            return str(data["detail"]), None, None
    snippet = body.strip().replace("\n", " ")[:200] if body else ""
    return snippet or "(empty body)", None, None


def error_for_status(status_code: int, body: str = "",
                     headers: Optional[Dict[str, str]] = None,
                     described: "Optional[tuple[str, Optional[str], Optional[str]]]" = None
                     ) -> HTTPStatusError:
    """Build the typed error for a non-2xx reply from its status, body and headers.

    ``described`` is (message, type, param) when the caller already read them from the body
    (a backend's own error shape); by default ``describe_error_body`` reads them."""
    headers = headers or {}
    message, error_type, param = described if described is not None else describe_error_body(body)
    if status_code in _BY_STATUS:
        cls = _BY_STATUS[status_code]
    elif status_code >= 500:
        cls = ServerError
    else:
        cls = HTTPStatusError
    kw: Dict[str, Any] = dict(status_code=status_code, error_type=error_type, param=param,
                              body=body, headers=headers)
    if issubclass(cls, (RateLimitError, ServerError)):
        kw["retry_after"] = parse_retry_after(headers)
    return cls(message, **kw)
