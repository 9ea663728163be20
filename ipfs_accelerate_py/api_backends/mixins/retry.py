"""The retry loop's face on the client: ``_call`` (format, attempts with retries, parse) and
``_aretry`` (the loop around any attempt, its retries counted into the metrics).

The policy and the loop themselves (``RetryPolicy``, ``acall_with_retries``, ``retry_wait``:
what is retried, the backoff, ``Retry-After``, the deadline) are in ``_core/retry.py``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Awaitable, Callable, Optional, TypeVar

from .. import tracing
from .._core.retry import Counting, RetryPolicy, acall_with_retries
from ..errors import ApiError, HTTPStatusError
from ..models import CompletionResult, Request
from ._host import HostBase

if TYPE_CHECKING:
    from .._core.endpoint import Endpoint

__all__ = ["RetryMixin"]

T = TypeVar("T")
log = logging.getLogger("ipfs_accelerate_py.api_backends")


class RetryMixin(HostBase):
    """Gives ``BaseApiBackend`` its retry loop, built from each endpoint's settings."""

    async def _call(self, ep: "Endpoint", request: Request, deadline: float, model: Optional[str],
                    request_id: str, queue_priority: Optional[int] = None,
                    fail_fast: bool = False, first_attempt: int = 0,
                    last_attempt: Optional[int] = None,
                    fresh_id: bool = False) -> CompletionResult:
        """Send ``request`` with retries; parse the reply. Raises typed errors only.
        ``first_attempt`` / ``last_attempt``: see ``acall_with_retries``; ``fresh_id``: see
        ``_aretry``. Here, not in the client, so that a job's call enters this layer once
        and goes on down (``Attempt.send``: breaker, slot, transport) from it.

        With ``forward_priority`` the server gets the request's own ``priority`` field, else
        the queue priority it was submitted with (0 HIGH .. 2 LOW; lower runs earlier in
        vLLM too)."""
        adapter = self._adapter
        forward = ep.settings.forward_priority and ep.priority_supported
        wire_priority = request.priority
        if wire_priority is None:
            wire_priority = queue_priority

        async def attempt(n: int) -> CompletionResult:
            nonlocal forward
            priority = wire_priority if forward else None
            http = adapter.format_request(request, priority=priority, request_id=request_id)
            try:
                response = await self._attempts.send(ep, http, deadline, fail_fast)
            except HTTPStatusError as exc:
                if priority is not None and adapter.is_priority_rejection(exc):
                    # The server runs without --scheduling-policy priority: stop sending it.
                    ep.priority_supported = False
                    forward = False
                    log.info("endpoint %s refused the priority field; sending without it", ep.id)
                    # The same request id goes out again: that is a retry, count it.
                    self._metrics.record_retry(ep.id, model)
                    http = adapter.format_request(request, priority=None, request_id=request_id)
                    response = await self._attempts.send(ep, http, deadline, fail_fast)
                else:
                    raise
            return adapter.parse_response(request, response)

        return await self._aretry(ep, attempt, deadline, model, first_attempt, last_attempt,
                                  fresh_id)

    async def _aretry(self, endpoint: "Endpoint", attempt_fn: Callable[[int], Awaitable[T]],
                      deadline: float, model: Optional[str], first_attempt: int = 0,
                      last_attempt: Optional[int] = None, fresh_id: bool = False,
                      on_retry: Optional[Callable[[BaseException, int, float], None]] = None
                      ) -> T:
        """The retry loop around ``attempt_fn`` (``acall_with_retries``), waits by ``_asleep``.
        A retry is counted when its attempt was made, not when it was scheduled: an
        attempt the circuit breaker refused (it opened during the backoff), or one the call
        deadline stopped before sending (``context["sent"] is False``), sent nothing.
        A retry is a request that repeats a request id on the wire, as the server counts
        them: with ``fresh_id`` the first attempt here carries an id never sent before (a
        part of a failed shared call), so only the attempts after it are retries.
        ``on_retry``: the span event of a retry (default: on the current task's span)."""
        uncounted = first_attempt if fresh_id else 0
        first_error: Optional[ApiError] = None
        if first_attempt == uncounted:  # no retry: made here, the loop built only if it fails
            try:
                return await attempt_fn(first_attempt)
            except ApiError as exc:
                first_error = exc
        counting = Counting(self._metrics, endpoint.id, model, uncounted)

        async def counted(attempt: int) -> T:
            if attempt == counting.uncounted:
                return await attempt_fn(attempt)
            try:
                result = await attempt_fn(attempt)
            except BaseException as exc:
                counting.failed(exc)
                raise
            counting.made()
            return result

        return await acall_with_retries(
            counted, RetryPolicy.from_settings(endpoint.settings), deadline, self._clock,
            self._asleep, on_retry=on_retry or tracing.retrying, first_attempt=first_attempt,
            last_attempt=last_attempt, first_error=first_error)
