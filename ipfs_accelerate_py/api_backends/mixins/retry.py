"""Retry with exponential backoff and jitter: the ONE place a request is retried.

Retried: connection errors, timeouts, 408, 409, 429 and 5xx (``errors.TransientError``).
Never: other 4xx, or a stream that already yielded text. An open circuit rejects a fresh
call at once; a call already retrying waits for the breaker's next probe window instead
(``breaker.circuit_wait``), but only when that window opens within ``max_retry_delay`` (the
longest backoff the call would have waited anyway): a breaker with a long ``reset_timeout`` fails the call at once rather
than hold its caller for minutes (and lets a router fail it over). The wait is
``retry_delay * backoff_factor**attempt`` (capped at ``max_retry_delay``) with "equal
jitter" (half fixed, half random) so clients that failed together do not retry together;
a server's ``Retry-After`` / ``retry-after-ms`` wins, capped at ``max_retry_after``. No
attempt starts after the call's deadline.

Hand-written rather than tenacity: the loop must consult the circuit breaker before each
attempt, honour a per-error ``Retry-After``, stop at a whole-call deadline, count retries
into our metrics and wake up early when the client closes; with tenacity each of those is
a callback around the same dozen lines.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Awaitable, Callable, Optional, TypeVar

from .. import tracing
from ..breaker import circuit_wait
from ..clock import SYSTEM_CLOCK, Clock
from ..errors import (ApiError, CircuitOpenError, HTTPStatusError,
                      TimeoutError, TransientError)
from ..models import CompletionResult, Request
from ._host import HostBase

__all__ = ["RetryPolicy", "RetryMixin", "acall_with_retries", "retry_wait"]

T = TypeVar("T")
log = logging.getLogger("ipfs_accelerate_py.api_backends")


class RetryPolicy:
    """Which errors to retry and how long to wait before attempt ``attempt + 1``."""

    def __init__(self, max_retries: int = 3, retry_delay: float = 0.5, backoff_factor: float = 2.0,
                 max_retry_delay: float = 8.0, max_retry_after: float = 60.0,
                 rng: Optional[Callable[[], float]] = None) -> None:
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.backoff_factor = backoff_factor
        self.max_retry_delay = max_retry_delay
        self.max_retry_after = max_retry_after
        self._rng = rng or random.random

    @classmethod
    def from_settings(cls, settings: Any) -> "RetryPolicy":
        return cls(settings.max_retries, settings.retry_delay, settings.backoff_factor,
                   settings.max_retry_delay, settings.max_retry_after)

    def jitter(self) -> float:
        """A random number in [0, 1) from this policy's source."""
        return self._rng()

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        return isinstance(error, TransientError) and attempt < self.max_retries

    def delay(self, error: BaseException, attempt: int) -> float:
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            return min(float(retry_after), self.max_retry_after)
        base = min(self.retry_delay * (self.backoff_factor ** attempt), self.max_retry_delay)
        return base / 2 + self._rng() * base / 2


def retry_wait(error: ApiError, attempt: int, policy: RetryPolicy, deadline: float,
               clock: Clock = SYSTEM_CLOCK) -> float:
    """Seconds to wait before attempt ``attempt + 1`` after ``error``; raises ``error`` when
    it is not retried, or a ``TimeoutError`` when the wait would pass ``deadline``."""
    if not policy.should_retry(error, attempt):
        raise error
    wait = policy.delay(error, attempt)
    remaining = deadline - clock.monotonic()
    if wait >= remaining:
        if isinstance(error, TimeoutError):
            raise error
        raise TimeoutError(
            f"gave up after {attempt + 1} attempt(s): the call deadline leaves "
            f"{max(0.0, remaining):.2f}s but the next retry is due in {wait:.2f}s; "
            f"last error: {error}") from error
    return wait


async def acall_with_retries(attempt_fn: Callable[[int], Awaitable[T]], policy: RetryPolicy,
                             deadline: float, clock: Clock,
                             sleep: Callable[[float, str], Awaitable[None]],
                             on_retry: Optional[Callable[[BaseException, int, float], None]] = None,
                             first_attempt: int = 0, last_attempt: Optional[int] = None,
                             first_error: Optional[ApiError] = None) -> T:
    """Run ``await attempt_fn(attempt)`` until it returns, a non-retryable error, or the deadline.

    A call that is already retrying when the circuit opens (it was caught by the outage)
    waits for the breaker's next probe window, within its deadline, instead of failing:
    that is how it rides out a server restart. It waits only when the window opens within
    ``policy.max_retry_delay``; a longer one raises the ``CircuitOpenError`` at once. A
    fresh call (attempt 0) is rejected at once. Such waits send nothing, so they use no
    retry budget; the probe they lead to does. All of a call's circuit waits together stay
    within ``max_retry_delay``.

    ``first_attempt`` numbers the first attempt made here (a call that carries on the
    attempts of an earlier one, as the halves of a failed shared call do); after attempt
    ``last_attempt`` its error is raised as it is, for the caller to retry in its own way.

    Each wait is ``await sleep(s, doing)`` (the client's ``_asleep``, which a closing
    client cuts short). ``first_error``: attempt ``first_attempt`` was already made, by the
    caller, and failed so (the caller makes a first attempt itself, where it succeeds the
    loop's machinery is never built: most calls succeed at once).
    """
    attempt = first_attempt
    circuit_waited = 0.0
    error = first_error
    while True:
        if error is None:
            try:
                return await attempt_fn(attempt)
            except ApiError as exc:
                error = exc
        failed, error = error, None
        if isinstance(failed, CircuitOpenError):
            wait = circuit_wait(failed, attempt, policy, deadline, circuit_waited, clock)
            circuit_waited += wait
            await sleep(wait, "waiting for the circuit")
            continue
        if last_attempt is not None and attempt >= last_attempt:
            raise failed
        wait = retry_wait(failed, attempt, policy, deadline, clock)
        if on_retry is not None:
            on_retry(failed, attempt, wait)
        attempt += 1
        await sleep(wait, "waiting to retry")


class RetryMixin(HostBase):
    """Gives ``BaseApiBackend`` its retry loop, built from each endpoint's settings."""

    async def _call(self, ep: Any, request: Request, deadline: float, model: Optional[str],
                    request_id: str, queue_priority: Optional[int] = None,
                    fail_fast: bool = False, first_attempt: int = 0,
                    last_attempt: Optional[int] = None,
                    fresh_id: bool = False) -> CompletionResult:
        """Send ``request`` with retries; parse the reply. Raises typed errors only.
        ``first_attempt`` / ``last_attempt``: see ``acall_with_retries``; ``fresh_id``: see
        ``_aretry``. Here, not in the client, so that a job's call enters this layer once
        and goes on down (``_asend``: breaker, slot, transport) from it.

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
                response = await self._asend(ep, http, deadline, fail_fast)
            except HTTPStatusError as exc:
                if priority is not None and adapter.is_priority_rejection(exc):
                    # The server runs without --scheduling-policy priority: stop sending it.
                    ep.priority_supported = False
                    forward = False
                    log.info("endpoint %s refused the priority field; sending without it", ep.id)
                    # The same request id goes out again: that is a retry, count it.
                    self._metrics.record_retry(ep.id, model)
                    http = adapter.format_request(request, priority=None, request_id=request_id)
                    response = await self._asend(ep, http, deadline, fail_fast)
                else:
                    raise
            return adapter.parse_response(request, response)

        return await self._aretry(ep, attempt, deadline, model, first_attempt, last_attempt,
                                  fresh_id)

    async def _aretry(self, endpoint: Any, attempt_fn: Callable[[int], Awaitable[T]],
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
        counting = _Counting(self._metrics, endpoint.id, model, uncounted)

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


class _Counting:
    """Which attempts are retries, as the server counts them (``RetryMixin._aretry``)."""

    __slots__ = ("_metrics", "_endpoint", "_model", "uncounted")

    def __init__(self, metrics: Any, endpoint: str, model: Optional[str], uncounted: int) -> None:
        self._metrics = metrics
        self._endpoint = endpoint
        self._model = model
        self.uncounted = uncounted  # the attempt whose request id was never sent before

    def made(self) -> None:
        self._metrics.record_retry(self._endpoint, self._model)

    def failed(self, exc: BaseException) -> None:
        """A retry that failed: counted unless the breaker refused it (sent nothing) or
        the deadline stopped it unsent."""
        if isinstance(exc, CircuitOpenError):
            return
        if isinstance(exc, ApiError) and exc.context.get("sent") is False:
            return
        self.made()
