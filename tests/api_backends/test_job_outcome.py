"""``Job``'s outcome with and without a future (``_core/queue.py``).

A job served in its caller's own task keeps its outcome on itself (``lazy``: no
``concurrent.futures.Future`` is made unless something asks for one). What is asserted:
for any sequence of resolutions (a result, an error, the caller leaving, the client's loop
stopping), a lazy job and one made with its future report the same thing: whether it is
done, what ``succeed`` says, what ``outcome`` returns or raises, and what its future says
when one is asked for afterwards; the first resolution wins.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import CancelledError as FutureCancelled
from typing import Any, List, Tuple

from hypothesis import given, settings, strategies as st

from ipfs_accelerate_py.api_backends._core.queue import Job
from ipfs_accelerate_py.api_backends.errors import ClientClosedError, ServerError


def make(lazy: bool, here: bool) -> Job:
    job = Job("prompt", 1, 100.0, None, None, "r-1", 0.0, lazy=lazy)
    job.here = here
    return job


def apply(job: Job, step: Tuple[str, Any]) -> Any:
    kind, value = step
    if kind == "succeed":
        return job.succeed(value)
    job.fail(value)
    return None


def observed(job: Job) -> Tuple[Any, ...]:
    """What a reader sees: done, the outcome (or its error's type and message), and the
    future's own account (asked for last, so a lazy job makes it here)."""
    done = job.done()
    try:
        outcome: Any = ("result", job.outcome()) if done else ("pending",)
    except FutureCancelled:
        outcome = ("cancelled",)
    except Exception as exc:  # noqa: BLE001 - compared by type and message
        outcome = ("error", type(exc).__name__, str(exc))
    future = job.future
    if not future.done():
        told: Any = ("pending",)
    elif future.cancelled():
        told = ("cancelled",)
    elif future.exception() is not None:
        exc = future.exception()
        told = ("error", type(exc).__name__, str(exc))
    else:
        told = ("result", future.result())
    return done, outcome, told


steps = st.lists(st.one_of(
    st.tuples(st.just("succeed"), st.integers()),
    st.tuples(st.just("fail"), st.sampled_from([ServerError("boom", status_code=500),
                                                 asyncio.CancelledError()]))),
    max_size=4)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(steps=steps, here=st.booleans())
def test_a_lazy_job_reports_what_a_job_with_a_future_reports(steps: List[Tuple[str, Any]],
                                                             here: bool) -> None:
    eager, lazy = make(False, here), make(True, here)
    for step in steps:
        assert apply(eager, step) == apply(lazy, step)
        assert eager.done() == lazy.done()
    assert observed(eager) == observed(lazy)


def test_the_first_resolution_wins_and_a_later_future_holds_it() -> None:
    job = make(True, here=True)
    assert job.succeed("text") is True
    job.fail(ServerError("late", status_code=500))
    assert job.succeed("other") is False
    assert job.outcome() == "text"
    assert job.future.result(0) == "text"


def test_a_caller_leaving_is_a_cancellation_and_the_loop_stopping_a_closed_client() -> None:
    left = make(True, here=True)
    left.fail(asyncio.CancelledError())
    assert left.done() and left.future.cancelled()
    stopped = make(True, here=False)
    stopped.fail(asyncio.CancelledError())
    try:
        stopped.outcome()
    except ClientClosedError:
        pass
    else:
        raise AssertionError("a job whose loop stopped must end as ClientClosedError")
