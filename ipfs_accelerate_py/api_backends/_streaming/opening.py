"""Opening one streamed reply, for both faces and the shared streams: ``StreamOpener``.

The retry loop (before the first byte only) around one attempt under the breaker and the
in-flight slot (``Attempt.guarded``), through the endpoint's transport; span events go on the
caller's span. Every stream opens here: the sync face's (on the client's loop), the async
face's (on its caller's loop), a shared prompt-list stream and a member re-sent alone
(``stream_batching``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, Optional

from .. import tracing

if TYPE_CHECKING:
    from .._core.attempt import Attempt
    from .._core.endpoint import Endpoint
    from ..transport import AsyncStream, HttpRequest

__all__ = ["StreamOpener"]


class StreamOpener:
    """Opens a streamed reply (``aopen``).

    ``attempts``: one attempt under the breaker and the in-flight slot (``Attempt``);
    ``retry``: the retry loop around the attempts, its retries counted into the metrics
    (``RetryMixin._aretry``: ``retry(endpoint, attempt_fn, deadline, model, on_retry=...)``)."""

    __slots__ = ("_attempts", "_retry")

    def __init__(self, attempts: "Attempt", retry: Callable[..., Awaitable[Any]]) -> None:
        self._attempts = attempts
        self._retry = retry

    async def aopen(self, ep: "Endpoint", http: "HttpRequest", headers: Dict[str, str],
                    deadline: float, model: Optional[str], fail_fast: bool,
                    op: Any, rid: str) -> "AsyncStream":
        """Open one streamed reply: the retry loop (before the first byte only) around one
        attempt under the breaker and the in-flight slot (``Attempt.guarded``), through the
        endpoint's transport. Span events go on ``op``."""
        attempts = self._attempts

        async def attempt(n: int) -> "AsyncStream":
            return await attempts.guarded(
                ep, deadline, ep.settings.idle_timeout, False,
                lambda timeout: ep.transport.open_stream(http, timeout, headers), fail_fast,
                op=op, rid=rid)

        def retrying(exc: BaseException, attempt: int, wait: float) -> None:
            with tracing.working_for(op, rid):
                tracing.retrying(exc, attempt, wait)

        result: "AsyncStream" = await self._retry(ep, attempt, deadline, model,
                                                  on_retry=retrying)
        return result
