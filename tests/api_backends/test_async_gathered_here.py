"""The async face's requests that may share a call, gathered on their caller's loop
(``AsyncFaceMixin._gather_here``, ``Batcher.handle_group``).

What is asserted: callers of one loop share calls sent from their own thread (no hand-off
to the client's loop), each gets its own answer, with 2x and 8x as many callers as a call
holds; a sync caller's request never shares a call with an async one (its call may not
depend on a loop that can end first); a caller that leaves a gathered call cancels its own
request only, its companions get theirs; a member whose deadline ends while the double
holds the call gets the typed timeout and the others their answers; seeded and repeated.
Faults are the double's gates, released by the test; no sleeps.
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any, Dict, List

import pytest

from support import off_loop, outcomes, run_async as run, wait_until
from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.servers.fake_vllm import Fault

P: Dict[str, Any] = {"max_tokens": 5, "temperature": 0}




def alone(client: Any, prompts: List[str]) -> Dict[str, str]:
    """Each prompt's text sent alone (the sync face, one at a time)."""
    return {p: client.generate_text(p, **P) for p in prompts}


def _spy_senders(client: Any) -> List[int]:
    """The thread of every send through the endpoint's transport."""
    seen: List[int] = []
    sender = client._endpoint(None).transport
    send = sender.send

    async def spying(*a: Any, **k: Any) -> Any:
        seen.append(threading.get_ident())
        return await send(*a, **k)
    sender.send = spying  # type: ignore[method-assign]
    return seen


def _prompt_lists(server: Any) -> List[List[str]]:
    out = []
    for r in server.requests:
        if r.path == "/v1/completions" and isinstance(r.json, dict):
            prompt = r.json.get("prompt")
            out.append(prompt if isinstance(prompt, list) else [prompt])
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("times,slots", [(2, 2), (8, 8), (8, 2)])
def test_callers_of_one_loop_share_calls_sent_from_their_own_thread(
        fake_server, make_client, seed: int, times: int, slots: int) -> None:
    """``times`` calls' worth of callers at once; with fewer slots than calls, the calls
    that find no free slot queue (in priority order with the rest) and are sent from the
    client's loop: every caller still gets its own answer."""
    size = 4
    c = make_client(fake_server, max_batch_size=size, max_concurrent_requests=slots)
    prompts = [f"gathered {seed}-{i}." for i in range(size * times)]
    random.Random(seed).shuffle(prompts)
    want = alone(c, prompts)
    before = len(fake_server.requests)
    seen = _spy_senders(c)

    async def go() -> "tuple[Dict[str, str], int]":
        got = await asyncio.gather(*(c.agenerate_text(p, **P) for p in prompts))
        return dict(zip(prompts, got)), threading.get_ident()
    got, caller = run(go())
    assert got == want  # each caller its own text
    if slots >= times:
        assert seen and set(seen) == {caller}  # every call sent from the callers' thread
    else:
        assert caller in seen  # the calls that found a slot
    lists = _prompt_lists(fake_server)[len(want):]
    assert len(fake_server.requests) - before == len(lists)
    assert sorted(p for lst in lists for p in lst) == sorted(prompts)  # each sent once
    assert len(lists) < len(prompts) and max(len(lst) for lst in lists) <= size
    m = c.get_metrics()
    assert m["batched_requests"] >= len(prompts) // 2 and m["failures"] == 0
    wait_until(lambda: c.current_requests == 0 and c._endpoint(None).workers.active == 0)


def test_a_sync_callers_request_never_shares_a_call_with_an_async_one(fake_server,
                                                                       make_client) -> None:
    c = make_client(fake_server, max_batch_size=8)
    fake_server.add_fault(Fault("gate", after_chunks=0, prompt="hold."))
    sync_prompts = [f"sync {i}." for i in range(4)]
    async_prompts = [f"async {i}." for i in range(4)]
    results: Dict[str, Any] = {}

    def sync_caller(p: str) -> None:
        results[p] = c.generate_text(p, **P)

    async def go() -> None:
        holder = asyncio.ensure_future(c.agenerate_text("hold.", **P))  # a call in flight:
        await off_loop(fake_server.wait_held, 1)                        # what follows gathers
        threads = [threading.Thread(target=sync_caller, args=(p,)) for p in sync_prompts]
        for t in threads:
            t.start()
        tasks = [asyncio.ensure_future(c.agenerate_text(p, **P)) for p in async_prompts]
        await off_loop(fake_server.release_stalls)
        for p, r in zip(async_prompts, await asyncio.gather(*tasks)):
            results[p] = r
        await holder
        for t in threads:
            await off_loop(t.join, 30)
    run(go())
    want = alone(c, sync_prompts + async_prompts)
    assert {p: results[p] for p in want} == want
    for lst in _prompt_lists(fake_server):
        faces = {p.split(" ")[0] for p in lst if p != "hold."}
        assert len(faces) <= 1, lst  # never a sync and an async caller in one call


@pytest.mark.parametrize("seed", range(3))
def test_a_caller_that_leaves_a_gathered_call_cancels_only_its_own_request(
        fake_server, make_client, seed: int) -> None:
    c = make_client(fake_server, max_batch_size=8)
    rnd = random.Random(seed)
    prompts = [f"member {seed}-{i}." for i in range(6)]
    leaver = rnd.choice(prompts)
    fake_server.add_fault(Fault("gate", after_chunks=0, prompt=leaver))
    want = alone(c, [p for p in prompts if p != leaver])
    fake_server.add_fault(Fault("gate", after_chunks=0, prompt=leaver))

    async def go() -> Dict[str, Any]:
        tasks = {p: asyncio.ensure_future(c.agenerate_text(p, **P)) for p in prompts}
        await off_loop(fake_server.wait_held, 1)  # the shared call, held at the double
        tasks[leaver].cancel()
        await off_loop(fake_server.release_stalls)
        return await outcomes(tasks)
    try:
        out = run(go())
    finally:
        fake_server.release_stalls()
    assert isinstance(out[leaver], asyncio.CancelledError)
    assert {p: out[p] for p in want} == want
    wait_until(lambda: c.current_requests == 0 and c._endpoint(None).workers.active == 0)


def test_a_member_whose_deadline_ends_mid_call_times_out_and_the_others_answer(
        fake_server, make_client) -> None:
    c = make_client(fake_server, max_batch_size=8, max_retries=2)
    prompts = [f"patient {i}." for i in range(4)]
    want = alone(c, prompts)
    fake_server.add_fault(Fault("gate", after_chunks=0, prompt="patient 0."))

    async def go() -> Dict[str, Any]:
        tasks = {p: asyncio.ensure_future(c.agenerate_text(p, **P)) for p in prompts}
        tasks["hasty."] = asyncio.ensure_future(c.agenerate_text("hasty.", timeout=0.5, **P))
        out: Dict[str, Any] = {}
        try:
            await tasks["hasty."]
        except BaseException as exc:  # noqa: BLE001
            out["hasty."] = exc
        await off_loop(fake_server.release_stalls)
        for p in prompts:
            out[p] = await tasks[p]
        return out
    try:
        out = run(go())
    finally:
        fake_server.release_stalls()
    assert isinstance(out["hasty."], errors.TimeoutError)
    assert {p: out[p] for p in prompts} == want


def test_a_loop_that_ends_with_a_gathered_call_in_flight_gives_its_slot_back(
        fake_server, make_client) -> None:
    """``asyncio.run`` returns while a shared call gathered on its loop is at the double: it
    cancels the call's turn with the rest, which gives its slot back; the endpoint serves
    on (one slot: a slot kept would stop it)."""
    c = make_client(fake_server, max_concurrent_requests=1)
    fake_server.add_fault(Fault("gate", after_chunks=0, prompt="held."))

    async def main() -> None:
        asyncio.ensure_future(c.agenerate_text("held.", **P))  # never awaited
        await off_loop(fake_server.wait_held, 1)
        assert c._endpoint(None).workers.active == 1
    try:
        asyncio.run(main())
    finally:
        fake_server.release_stalls()
    assert c._endpoint(None).workers.active == 0
    assert c.generate_text("after.", **P) == alone(c, ["after."])["after."]
