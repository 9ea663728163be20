"""Retry with exponential backoff and jitter: the ONE place a request is retried.

Retried: connection errors, timeouts, 408, 409, 429 and 5xx (``errors.TransientError``).
Never: other 4xx, or a stream that already yielded text. An open circuit rejects a fresh
call at once; a call already retrying waits for the breaker's next probe window instead
(``breaker.circuit_wait``), but only when that window opens within ``max_retry_delay`` (the
longest backoff the call would have waited anyway): a breaker with a long ``reset_timeout``
fails the call at once rather than hold its caller for minutes (and lets a router fail it
over). The wait is
``retry_delay * backoff_factor**attempt`` (capped at ``max_retry_delay``) with "equal
jitter" (half fixed, half random) so clients that failed together do not retry together;
a server's ``Retry-After`` / ``retry-after-ms`` wins, capped at ``max_retry_after``. No
attempt starts after the call's deadline.

Hand-written rather than tenacity: the loop must consult the circuit breaker before each
attempt, honour a per-error ``Retry-After``, stop at a whole-call deadline, count retries
into our metrics and wake up early when the client closes; with tenacity each of those is
a callback around the same dozen lines.

The client's face of it (``mixins/retry.py``: ``_call``, ``_aretry``) builds a policy from
an endpoint's settings and counts the retries (``Counting``).
"""

from __future__ import annotations

import random
from typing import Any, Awaitable, Callable, Optional, TypeVar

from .breaker import circuit_wait
from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ApiError, CircuitOpenError, TimeoutError, TransientError

__all__ = ["RetryPolicy", "acall_with_retries", "retry_wait", "Counting"]

T = TypeVar("T")


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


class Counting:
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
