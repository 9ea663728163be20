"""The async face's requests that share no call, served in their caller's task
(``AsyncFaceMixin._serve_here``, ``Dispatcher.claim``).

What is asserted: a request that would start at once runs on its caller's loop and answers
as the queued path does; one that would wait (the endpoint's slots taken) queues, so waiting
jobs keep their priority order; a caller that leaves (cancelled) stops its own request,
its slot is freed and the metrics count it ``Cancelled``; a deadline that ends while the
server holds the request raises the typed timeout; ``close()`` called on a loop that serves
requests itself does not wait for them; many callers, 2x and 8x the endpoint's slots, some
leaving early, seeded and repeated: every caller that stays gets its own text, every other
one a cancellation, and nothing is left in flight. Faults are the double's gates, released
by the test; no sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import weakref
from typing import Any, Dict, List

import pytest

from support import off_loop, outcomes, run_async as run, wait_until
from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.servers.fake_vllm import Fault

P: Dict[str, Any] = {"max_tokens": 5, "temperature": 0}


def texts_of(client: Any, prompts: List[str]) -> Dict[str, str]:
    return {p: client.generate_text(p, **P) for p in prompts}


def test_a_request_that_would_start_at_once_is_served_on_its_callers_loop(fake_server,
                                                                          make_client) -> None:
    c = make_client(fake_server, batch_enabled=False)
    seen: List[int] = []
    sender = c._endpoint(None).transport  # the endpoint's AsyncTransport
    send = sender.send

    async def spying(*a: Any, **k: Any) -> Any:  # which thread sends it
        seen.append(threading.get_ident())
        return await send(*a, **k)
    sender.send = spying  # type: ignore[method-assign]

    async def one() -> "tuple[str, int]":
        r = await c.arun_inference(None, "here", P)
        return r.text, threading.get_ident()
    text, caller = run(one())
    assert seen == [caller]
    assert text == c.generate_text("here", **P)  # the sync face's, on the client's loop
    assert seen[1] != caller


def test_requests_that_would_wait_queue_in_priority_order(fake_server, make_client) -> None:
    c = make_client(fake_server, batch_enabled=False, max_concurrent_requests=1)
    fake_server.add_fault(Fault("gate", after_chunks=0, prompt="first"))

    async def go() -> List[str]:
        first = asyncio.ensure_future(c.agenerate_text("first", **P))
        await off_loop(fake_server.wait_held, 1)
        order: List[str] = []

        async def one(prompt: str, priority: int) -> None:
            await c.agenerate_text(prompt, priority=priority, **P)
            order.append(prompt)
        low = asyncio.ensure_future(one("low", 2))
        await off_loop(lambda: _wait_queued(c, 1))
        high = asyncio.ensure_future(one("high", 0))
        await off_loop(lambda: _wait_queued(c, 2))
        fake_server.release_stalls()
        await asyncio.gather(first, low, high)
        return order
    assert run(go()) == ["high", "low"]


def _wait_queued(client: Any, n: int) -> None:
    wait_until(lambda: len(client.request_queue) >= n)


def test_a_caller_that_leaves_cancels_its_own_request(fake_server, make_client) -> None:
    c = make_client(fake_server, batch_enabled=False)
    fake_server.add_fault(Fault("gate", after_chunks=0, prompt="leaves"))

    async def go() -> None:
        task = asyncio.ensure_future(c.agenerate_text("leaves", **P))
        await off_loop(fake_server.wait_held, 1)
        assert c.current_requests == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert c.current_requests == 0  # its slot is free at once
    try:
        run(go())
    finally:
        fake_server.release_stalls()
    m = c.get_metrics()
    assert m["failures_by_type"] == {"Cancelled": 1}
    assert c.generate_text("after", **P) == texts_of(c, ["after"])["after"]


def test_a_deadline_that_ends_while_the_server_holds_it_is_the_typed_timeout(
        fake_server, make_client) -> None:
    c = make_client(fake_server, batch_enabled=False, max_retries=0)
    fake_server.add_fault(Fault("gate", after_chunks=0, prompt="slow"))

    async def go() -> BaseException:
        try:
            await c.agenerate_text("slow", timeout=0.5, **P)
        except errors.TimeoutError as exc:
            return exc
        raise AssertionError("no timeout")
    try:
        exc = run(go())
    finally:
        fake_server.release_stalls()
    assert isinstance(exc, errors.TimeoutError)
    assert c.current_requests == 0


def test_close_on_a_loop_that_serves_requests_does_not_wait_for_them(fake_server,
                                                                     make_client) -> None:
    c = make_client(fake_server, batch_enabled=False)
    fake_server.add_fault(Fault("gate", after_chunks=0, prompt="held"))

    async def go() -> BaseException:
        task = asyncio.ensure_future(c.agenerate_text("held", **P))
        await off_loop(fake_server.wait_held, 1)
        c.close(timeout=30.0)  # blocking, on this loop: its own request cannot end meanwhile
        assert fake_server.held == 1  # so close did not wait for it
        fake_server.release_stalls()
        try:
            await task
        except BaseException as exc:  # noqa: BLE001
            return exc
        raise AssertionError("a request outlived close()")
    try:
        exc = run(go())
    finally:
        fake_server.release_stalls()
    assert isinstance(exc, errors.ApiError)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("times", [2, 8])
def test_many_callers_some_leaving_each_get_their_own_answer(fake_server, make_client,
                                                             seed: int, times: int) -> None:
    slots = 4
    c = make_client(fake_server, batch_enabled=False, max_concurrent_requests=slots)
    rnd = random.Random(seed)
    prompts = [f"caller {seed}-{i}." for i in range(slots * times)]  # none inside another
    leaving = set(rnd.sample(prompts, len(prompts) // 4))
    for p in leaving:  # they reach the double and wait there until the test lets them go
        fake_server.add_fault(Fault("gate", after_chunks=0, prompt=p))
    want = texts_of(c, [p for p in prompts if p not in leaving])

    async def go() -> Dict[str, Any]:
        tasks = {p: asyncio.ensure_future(c.agenerate_text(p, **P)) for p in prompts}
        # every leaving caller holds a slot at the double or waits in the queue
        await off_loop(lambda: _wait_held_or_queued(fake_server, c, len(leaving), slots))
        for p in leaving:
            tasks[p].cancel()
        return await outcomes(tasks)
    try:
        out = run(go())
    finally:
        fake_server.release_stalls()
    for p in prompts:
        if p in leaving:
            assert isinstance(out[p], asyncio.CancelledError), (p, out[p])
        else:
            assert out[p] == want[p], p
    # a leaver whose job had queued went on at the double (a queued job that was sent
    # runs to its end); once released, nothing is left in flight
    wait_until(lambda: c.current_requests == 0 and c._endpoint(None).workers.active == 0)
    assert len(c.request_queue) == 0
    assert c.get_metrics()["failures_by_type"].get("Cancelled", 0) <= len(leaving)


def _wait_held_or_queued(server: Any, client: Any, n: int, slots: int) -> None:
    wait_until(lambda: server.held >= min(n, slots) or
               server.held + len(client.request_queue) >= n, timeout=10.0)


def test_nothing_keeps_a_finished_requests_result_alive(fake_server, make_client) -> None:
    """asyncio copies the caller's context into every timer and task it makes: a context
    that held the job's future (and so its result) kept each request's objects alive after
    the caller dropped them, into the collector's oldest generation. With the collector off,
    reference counts alone free every result once the caller lets go of it."""
    c = make_client(fake_server, batch_enabled=False)

    async def go() -> List[Any]:
        refs = []
        for i in range(40):
            result = await c.arun_inference(None, f"kept {i}.", P)
            refs.append(weakref.ref(result))
            del result
        await asyncio.sleep(0)  # one turn of the loop: callbacks already due have run
        return refs
    enabled = gc.isenabled()
    gc.disable()
    try:
        refs = run(go())
        alive = [r for r in refs if r() is not None]
    finally:
        if enabled:
            gc.enable()
    assert alive == []
