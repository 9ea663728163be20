"""What travels between the double's routes and its HTTP handler: replies, streams, errors.

Why a module of its own: the routes build replies and the handler writes them; both need the
same small types (and the JSON encoder that makes bodies byte-identical to vLLM's), and neither
should import the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
    from ._faults import Fault

_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"
_PROMETHEUS = "text/plain; version=1.0.0; charset=utf-8"

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _dumps(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")
_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the double received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    timestamp: float
    body: bytes = b""
    query: str = ""


class _Halt(Exception):
    """Raised inside a handler when the server goes down while the handler sleeps."""


class _ClientGone(Exception):
    """The client closed its end; nothing more can be written."""


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    content_type: str | None = _JSON
    headers: Sequence[tuple[str, str]] = ()


@dataclass
class _Stream:
    """An SSE response: ``events`` yields complete ``data: ...\\n\\n`` frames."""

    events: Iterator[bytes]
    fault: Fault | None = None
    on_finish: Callable[[bool], None] | None = None  # called with True when fully sent


class _ApiError(Exception):
    """A vLLM-shaped error reply, raised from deep inside request validation."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None) -> None:
        super().__init__(message)
        self.reply = _error_reply(status, message, err_type, param)


def _error_reply(status: int, message: str, err_type: str, param: str | None) -> _Reply:
    return _Reply(status, _dumps({"error": {"message": message, "type": err_type, "param": param, "code": status}}))


def _bad_request(message: str, param: str | None = None) -> _ApiError:
    return _ApiError(400, message, "BadRequestError", param)


_DETAIL_404 = _Reply(404, b'{"detail":"Not Found"}')
_UNAUTHORIZED = _Reply(401, b'{"error":"Unauthorized"}')
