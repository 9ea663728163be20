"""Hand-offs from other threads to an event loop (``_core.loop``): ``call_soon_from_afar``
runs every call exactly once, in order, with one wake-up per burst; ``await_future``
brings a result, an error or a cancellation across, and a caller that leaves cancels the
work it waited for; an async call asks for its running loop once (a system call on 3.11)."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from concurrent.futures import Future
from typing import Any, List

import pytest

from ipfs_accelerate_py.api_backends import MockTransport, VllmClient
from ipfs_accelerate_py.api_backends._core.loop import (_PENDING, await_future,
                                                          call_soon_from_afar)
from ipfs_accelerate_py.api_backends.transport import HttpRequest, HttpResponse


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: List[Any] = []
        self.loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_calls_made_before_the_loop_wakes_ride_one_wake_up_in_order() -> None:
    loop = asyncio.new_event_loop()  # not running: nothing drains until it runs
    try:
        seen: List[int] = []
        for i in range(50):
            assert call_soon_from_afar(loop, seen.append, i)
        pending = _PENDING[loop]
        assert pending.scheduled and len(pending.calls) == 50  # one wake-up on its way
        loop.run_until_complete(asyncio.sleep(0))
        assert seen == list(range(50))
        assert not pending.scheduled and pending.calls == []
        assert call_soon_from_afar(loop, seen.append, 50)  # a new burst, a new wake-up
        assert pending.scheduled
        loop.run_until_complete(asyncio.sleep(0))
        assert seen == list(range(51))
    finally:
        loop.close()


def test_a_failing_call_does_not_stop_the_others_and_is_reported() -> None:
    lt = _LoopThread()
    try:
        done = threading.Event()
        seen: List[str] = []

        def boom() -> None:
            raise RuntimeError("one call's error")
        call_soon_from_afar(lt.loop, seen.append, "before")
        call_soon_from_afar(lt.loop, boom)
        call_soon_from_afar(lt.loop, seen.append, "after")
        call_soon_from_afar(lt.loop, done.set)
        assert done.wait(10)
        assert seen == ["before", "after"]
        assert [type(c["exception"]) for c in lt.errors] == [RuntimeError]
    finally:
        lt.stop()


def test_a_closed_loop_refuses_without_keeping_the_call() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    assert call_soon_from_afar(loop, print, "never") is False
    pending = _PENDING[loop]
    assert pending.calls == [] and not pending.scheduled


@pytest.mark.parametrize("seed", range(5))
def test_every_call_from_many_threads_runs_exactly_once_while_the_loop_drains(seed: int) -> None:
    """Producers race the drain (each burst's wake-up is taken while others append):
    no call is lost or run twice, and each thread's calls keep their order."""
    rng = random.Random(seed)
    lt = _LoopThread()
    try:
        seen: List[tuple] = []
        threads_n, per = rng.randint(2, 8), rng.randint(200, 2000)
        go = threading.Barrier(threads_n)

        def produce(t: int) -> None:
            go.wait()
            for i in range(per):
                call_soon_from_afar(lt.loop, seen.append, (t, i))
        producers = [threading.Thread(target=produce, args=(t,)) for t in range(threads_n)]
        for p in producers:
            p.start()
        for p in producers:
            p.join(30)
        done = threading.Event()
        call_soon_from_afar(lt.loop, done.set)
        assert done.wait(10)
        assert len(seen) == threads_n * per
        for t in range(threads_n):
            assert [i for (u, i) in seen if u == t] == list(range(per))
    finally:
        lt.stop()


@pytest.mark.parametrize("how", ["result", "error", "cancelled"])
def test_await_future_brings_the_outcome_across(how: str) -> None:
    async def main() -> Any:
        future: "Future[int]" = Future()
        awaited = await_future(future)

        def resolve() -> None:
            if how == "result":
                future.set_result(7)
            elif how == "error":
                future.set_exception(KeyError("x"))
            else:
                future.cancel()
        resolver = threading.Thread(target=resolve)
        resolver.start()
        try:
            return await awaited
        finally:
            resolver.join(10)
    if how == "result":
        assert asyncio.run(main()) == 7
    elif how == "error":
        with pytest.raises(KeyError):
            asyncio.run(main())
    else:
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(main())


def test_a_caller_that_leaves_cancels_the_future_it_awaited() -> None:
    future: "Future[int]" = Future()

    async def main() -> None:
        task = asyncio.ensure_future(await_future(future))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(main())
    assert future.cancelled()  # the pipeline drops a job whose future is cancelled


def _reply(request: HttpRequest) -> HttpResponse:
    body = request.json or {}
    reply = {"id": "r", "object": "text_completion", "created": 1, "model": body.get("model"),
             "choices": [{"index": 0, "text": f"to {body.get('prompt')}",
                          "finish_reason": "length"}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    return HttpResponse(200, {"Content-Type": "application/json"}, json.dumps(reply).encode())


@pytest.mark.parametrize("callers", [1, 8, 32])
def test_an_async_call_asks_for_its_running_loop_once(monkeypatch, free_port, callers) -> None:
    """On Python 3.11 ``asyncio.get_running_loop()`` is a ``getpid()`` system call: an async
    call served in its caller's task asks once and hands the loop down (the in-flight limit
    asks only for a caller that must wait, and none waits here: its slots are enough)."""
    mock = MockTransport(_reply)
    with VllmClient(base_url=f"http://127.0.0.1:{free_port}", model="m", max_retries=0,
                    batch_enabled=False, max_concurrent_requests=64,
                    transport_factory=lambda s: mock) as c:
        async def calls(n: int) -> List[str]:
            return list(await asyncio.gather(*[c.agenerate_text(f"p{i}", max_tokens=2)
                                               for i in range(n)]))

        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(calls(2)) == ["to p0", "to p1"]  # settled first
            asked: List[int] = []
            real = asyncio.get_running_loop

            def counted() -> asyncio.AbstractEventLoop:
                asked.append(1)
                return real()
            monkeypatch.setattr(asyncio, "get_running_loop", counted)
            texts = loop.run_until_complete(calls(callers))
            monkeypatch.undo()
        finally:
            loop.close()
    assert texts == [f"to p{i}" for i in range(callers)]  # each caller its own answer
    assert len(asked) == callers
