"""``MockTransport``: an ``AsyncTransport`` that answers from a function, for unit tests.

Why: a test of what the client does with a reply (parsing, retries, the breaker's verdict,
routing) needs no socket and no server, only a reply chosen per request. Give the client
``transport_factory=lambda settings: MockTransport(handler)``; ``handler(request)`` (a plain
function or a coroutine function) returns the ``HttpResponse`` for that ``HttpRequest``, or
raises one of the project's errors (``errors.ConnectionError`` for a dead server). A
streamed request gets the reply's body as its stream, one piece per SSE event (a body that
is ``data: ...`` lines), so a test writes a stream as the server would send it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import AsyncIterator, Awaitable, Callable, Dict, List, Optional, Tuple, Union

from ._transports.headers import Headers
from .transport import HttpRequest, HttpResponse

__all__ = ["MockTransport", "MockStream"]

Handler = Callable[[HttpRequest], Union[HttpResponse, Awaitable[HttpResponse]]]


class MockStream:
    """A reply already in memory, read as a stream (``transport.AsyncStream``)."""

    def __init__(self, reply: HttpResponse) -> None:
        self.status = reply.status
        self.headers = Headers((k.lower(), v) for k, v in reply.headers.items())
        self._pieces = _events(reply.body)
        self.closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        for piece in self._pieces:
            if self.closed:
                return
            yield piece

    async def read_body(self) -> bytes:
        body = b"".join([piece async for piece in self.chunks()])
        self.close()
        return body

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        self.closed = True


class MockTransport:
    """Answers every request with ``handler(request)`` (see the module docstring); keeps
    the requests it was sent, in order, in ``requests``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: List[HttpRequest] = []
        self.closed = False

    def __repr__(self) -> str:
        return f"MockTransport({getattr(self.handler, '__name__', 'handler')})"

    async def _answer(self, request: HttpRequest) -> HttpResponse:
        self.requests.append(request)
        reply = self.handler(request)
        if inspect.isawaitable(reply):
            reply = await reply
        assert isinstance(reply, HttpResponse), f"the handler returned {type(reply).__name__}"
        return HttpResponse(reply.status, Headers((k.lower(), v) for k, v in reply.headers.items()),
                            reply.body)

    async def send(self, request: HttpRequest, timeout: Tuple[float, float]) -> HttpResponse:
        return await self._answer(request)

    async def open_stream(self, request: HttpRequest, timeout: Tuple[float, float],
                          headers: Optional[Dict[str, str]] = None) -> MockStream:
        if headers is not None and headers is not request.headers:
            request = dataclasses.replace(request, headers=headers)
        return MockStream(await self._answer(request))

    async def aclose(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


def _events(body: bytes) -> List[bytes]:
    """The body cut after each blank line (one SSE event a piece); the rest as one piece."""
    pieces: List[bytes] = []
    rest = body
    while True:
        cut = rest.find(b"\n\n")
        if cut < 0:
            break
        pieces.append(rest[:cut + 2])
        rest = rest[cut + 2:]
    if rest:
        pieces.append(rest)
    return pieces
