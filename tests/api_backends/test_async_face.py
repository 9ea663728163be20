"""The async face (api_backends/async_face.py): streams on one event loop, no thread each.

What is asserted: the text of every stream is the double's deterministic text for its
prompt; the process's thread count does not grow with the number of concurrent streams;
an async stream goes through the sync face's retry, breaker, in-flight bookkeeping and
validation (a 500 before the first byte is retried, an OPEN circuit fails fast or is waited
out, an idle stream raises the typed TimeoutError keeping its text, an early ``aclose``
frees the stream's place, bad input raises before anything is sent); the loop is never
blocked (a stalled stream does not hold up another); ``close()`` closes the sessions it
made. Faults come from the double (its gates, released by the test), not sleeps.
"""

from __future__ import annotations

import asyncio
import json
import resource
import threading
from typing import Any, Dict, List

import pytest

from api_support import COMPLETIONS, client_over, request_ids
from support import TRANSPORT_IDS, DoubleProcess, run_async as run, transport_factory, wait_until
from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.base import build_request
from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.fake_vllm import Fault

P: Dict[str, Any] = {"max_tokens": 6, "temperature": 0}


async def gather(coros: Any) -> List[Any]:
    return list(await asyncio.gather(*coros))


async def collect(client: VllmClient, prompt: str, **params: Any) -> str:
    return "".join([t async for t in client.astream_generation(prompt, **{**P, **params})])


# ------------------------------------------------------------------ the double, alone
async def _streams_at_once(client: VllmClient, prompts: List[str]) -> "tuple[List[str], int]":
    """Open one stream per prompt, all at once; when every one has its first piece (all
    open together), count the threads; then read them all to the end."""
    n = len(prompts)
    opened = 0
    all_open = asyncio.Event()
    threads: List[int] = []

    async def one(prompt: str) -> str:
        nonlocal opened
        async with client.astream(build_request(prompt, None, P, stream=True)) as s:
            it = s.texts()
            pieces = [await it.__anext__()]
            opened += 1
            if opened == n:
                threads.append(threading.active_count())
                all_open.set()
            await all_open.wait()
            pieces += [t async for t in it]
            return "".join(pieces)

    texts = await asyncio.gather(*(one(p) for p in prompts))
    return list(texts), threads[0]


@pytest.mark.slow
def test_2000_concurrent_streams_on_one_loop_use_no_thread_each() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4500:  # 2 000 sockets here and 2 000 in the double (it inherits the limit)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    double = DoubleProcess(backlog=4096)  # 2 000 connections arrive at once
    try:
        prompts = [f"stream number {i} says" for i in range(2000)]
        with VllmClient(base_url=double.base_url, model="tiny-llama") as sync:
            expected = {}
            for i in range(0, len(prompts), 250):  # the double's text, one prompt list a call
                part = prompts[i:i + 250]
                result = sync.run_inference(None, part, P)
                expected.update(zip(part, (c.text for c in result.choices)))
        client = VllmClient(base_url=double.base_url, model="tiny-llama",
                            max_concurrent_requests=1024, timeout=60.0)
        try:
            async def rounds() -> Dict[int, int]:
                counts = {}
                for n in (10, 200, 2000):
                    texts, counts[n] = await _streams_at_once(client, prompts[:n])
                    assert texts == [expected[p] for p in prompts[:n]]
                return counts
            counts = run(rounds(), timeout=300)
            assert counts[10] == counts[200] == counts[2000], counts
            m = client.get_metrics()
            assert m["requests"] == 2210 and m["failures"] == 0, m
        finally:
            client.close()
    finally:
        double.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.real_server
def test_200_concurrent_streams_against_the_real_server(real_vllm_server) -> None:
    client = VllmClient(base_url=real_vllm_server.base_url, model=real_vllm_server.model,
                        timeout=120.0, max_concurrent_requests=64)
    try:
        async def all_streams() -> List[str]:
            return await asyncio.gather(*(collect(client, f"Count {i}:", max_tokens=4)
                                          for i in range(200)))
        texts = run(all_streams(), timeout=600)
        assert len(texts) == 200 and all(texts)
        m = client.get_metrics()
        assert m["requests"] == 200 and m["failures"] == 0, m
    finally:
        client.close()


# ------------------------------------------------------------------ errors
def test_a_500_before_the_first_byte_is_retried(fake_server, make_client) -> None:
    c = make_client(fake_server)
    fake_server.add_fault(Fault("status", status=500, count=1, path=COMPLETIONS))
    text = run(collect(c, "retry me"))
    assert text == "".join(c.stream_generation("retry me", **P))
    ids = request_ids(fake_server)
    assert len(ids) == 3 and ids[0] == ids[1] != ids[2]  # the same id, sent twice
    assert c.get_metrics()["retries"] == 1


def test_an_open_circuit_fails_fast_without_sending(fake_server, make_client) -> None:
    c = make_client(fake_server, fail_fast=True, minimum_calls=2, failure_threshold=2,
                    reset_timeout=60.0)
    fake_server.add_fault(Fault("status", status=503, count=-1, path=COMPLETIONS))
    for _ in range(2):
        with pytest.raises(errors.ApiError):
            run(collect(c, "fails", max_tokens=2))
    assert c.circuit_state == "OPEN"
    seen = fake_server.request_count[COMPLETIONS]
    with pytest.raises(errors.CircuitOpenError) as info:
        run(collect(c, "rejected"))
    assert info.value.retry_in > 0
    assert fake_server.request_count[COMPLETIONS] == seen  # nothing was sent


def test_an_open_circuit_is_waited_out_before_the_first_byte(fake_server, make_client) -> None:
    c = make_client(fake_server, max_retries=3)
    fake_server.down()
    with pytest.raises((errors.ConnectionError, errors.CircuitOpenError)):
        c.run_inference(None, "detects it", P, fail_fast=True)
    wait_until(lambda: c.circuit_state != "CLOSED", what="the circuit to open")

    async def waits_then_streams() -> str:
        task = asyncio.ensure_future(collect(c, "held"))
        while not c._circuit_waiters:  # the stream registered for the circuit to close
            assert not task.done(), task
            await asyncio.sleep(0.005)
        fake_server.up()
        return await task
    assert run(waits_then_streams()) == "".join(c.stream_generation("held", **P))
    assert c.get_metrics()["circuit_wait_seconds"]["count"] >= 1


def test_an_idle_stream_raises_the_typed_timeout_with_its_text(fake_server, make_client) -> None:
    c = make_client(fake_server, stream_idle_timeout=0.3)
    fake_server.add_fault(Fault("gate", after_chunks=2, path=COMPLETIONS))  # held after 2
    got: List[str] = []

    async def read() -> None:
        async for t in c.astream_generation("stalls", max_tokens=8):
            got.append(t)
    try:
        with pytest.raises(errors.TimeoutError) as info:
            run(read())
    finally:
        fake_server.release_stalls()
    assert len(got) == 2 and info.value.context["partial_text"] == "".join(got)
    assert "idle" in str(info.value)
    assert c.get_metrics()["failures"] == 1


def test_aclose_before_the_end_frees_the_stream(fake_server, make_client) -> None:
    c = make_client(fake_server)
    ep = c._endpoint(None)

    async def stop_early() -> "tuple[int, int]":
        s = c.astream(build_request("long one", None, {"max_tokens": 50}, stream=True))
        first = await s.__anext__()
        assert first is not None
        held = (c.current_requests, ep.limit.in_flight)
        await s.aclose()
        return held
    held = run(stop_early())
    assert held == (1, 0)  # the open stream counted; its slot was returned at the head
    assert (c.current_requests, ep.limit.in_flight) == (0, 0)
    m = c.get_metrics()
    assert m["failures"] == 1 and m["failures_by_type"].get("ClosedEarly") == 1, m


def test_bad_input_raises_naming_the_field_before_anything_is_sent(fake_server,
                                                                     make_client) -> None:
    c = make_client(fake_server)
    with pytest.raises(errors.ValidationError) as info:
        c.astream_generation(123)
    assert info.value.field == "inputs"
    with pytest.raises(errors.ValidationError) as info:
        c.astream_generation("hi", max_tokens=-1)
    assert info.value.field == "max_tokens"
    with pytest.raises(errors.ValidationError) as info:
        c.astream({"prompt": "not a request"})
    assert info.value.field == "request"
    with pytest.raises(errors.ValidationError) as info:
        run(c.achat_completion([]))
    assert info.value.field == "messages"
    with pytest.raises(errors.ValidationError) as info:
        run(c.arun_inference(None, "hi", {"temperature": "hot"}))
    assert info.value.field == "temperature"
    assert sum(fake_server.request_count.values()) == 0


# ------------------------------------------------------------------ the loop and the sessions
def test_a_stalled_stream_does_not_block_the_loop(fake_server, make_client) -> None:
    c = make_client(fake_server)
    fake_server.add_fault(Fault("gate", after_chunks=0, prompt="stalled"))  # held before its head

    async def both() -> "tuple[str, str]":
        stalled = asyncio.ensure_future(collect(c, "stalled"))
        # the gated one waits at the double (waited for off the loop, which must run it)
        await asyncio.get_running_loop().run_in_executor(None, fake_server.wait_held, 1)
        other = await collect(c, "other")  # completes while the first waits for its head
        assert not stalled.done() and fake_server.held == 1
        fake_server.release_stalls()
        return other, await stalled
    try:
        other, stalled = run(both())
    finally:
        fake_server.release_stalls()
    assert other == "".join(c.stream_generation("other", **P))
    assert stalled == "".join(c.stream_generation("stalled", **P))


def test_non_streamed_async_calls_share_the_queue(fake_server, make_client) -> None:
    c = make_client(fake_server)

    async def calls() -> List[Any]:
        return await asyncio.gather(c.arun_inference(None, "a", P), c.agenerate_text("b", **P),
                                    c.achat_completion([{"role": "user", "content": "c"}], **P))
    a, b, chat = run(calls())
    assert a.text == c.run_inference(None, "a", P).text and b == c.generate_text("b", **P)
    assert chat.text


def test_close_closes_the_sessions_of_running_loops(fake_server, make_client) -> None:
    c = make_client(fake_server)
    aio = c._aio_transport(c._endpoint(None))

    async def stream_then_close_from_a_thread() -> bool:
        assert await collect(c, "one")
        session = aio._sessions[asyncio.get_running_loop()][0]
        await asyncio.get_running_loop().run_in_executor(None, c.close)
        return session.closed
    assert run(stream_then_close_from_a_thread())
    with pytest.raises(errors.ClientClosedError):
        c.astream_generation("after close")


def test_aclose_closes_this_loops_session(fake_server, make_client) -> None:
    c = make_client(fake_server)
    aio = c._aio_transport(c._endpoint(None))

    async def stream_then_aclose() -> bool:
        assert await collect(c, "one")
        session = aio._sessions[asyncio.get_running_loop()][0]
        await c.aclose()
        return session.closed and c.closed
    assert run(stream_then_aclose())


def test_streams_from_two_loops_get_a_session_each(fake_server, make_client) -> None:
    c = make_client(fake_server)
    first = run(collect(c, "first loop"))
    out: List[str] = []
    t = threading.Thread(target=lambda: out.append(run(collect(c, "second loop"))))
    t.start()
    t.join(30)
    assert first and out and out[0] == "".join(c.stream_generation("second loop", **P))


def test_error_replies_are_typed_and_not_retried(fake_server, make_client) -> None:
    c = make_client(fake_server)
    with pytest.raises(errors.NotFoundError):
        run(collect(c, "x", model="no-such-model"))
    assert fake_server.request_count[COMPLETIONS] == 1
    big = json.dumps({"error": {"message": "x" * 2000}}).encode()
    c2 = make_client(fake_server, max_response_bytes=1000)
    fake_server.add_fault(Fault("status", status=400, body=big, path=COMPLETIONS))
    with pytest.raises(errors.ResponseTooLargeError):
        run(collect(c2, "y"))


# ------------------------------------------------------------------ shared state: routing, spans
def test_a_routed_async_stream_fails_over_while_it_opens(fakes) -> None:
    a, b = fakes
    # batch_streams off: four calls to count (async streams share prompt-list calls now)
    c = client_over({"a": a.base_url, "b": b.base_url}, model="tiny-llama", routing="round-robin",
                    retry_delay=0.002, max_retry_delay=0.01, max_retries=0, batch_streams=False)
    try:
        a.down()
        texts = run(gather(collect(c, f"routed {i}") for i in range(4)))
        assert all(texts) and b.request_count[COMPLETIONS] == 4
        tried_a = c.get_metrics()["per_endpoint"]["a"]
        assert tried_a["failures"] >= 1, tried_a  # the round went to "a" first, then on to "b"
    finally:
        c.close()


def test_concurrent_async_streams_each_get_their_own_span(fake_server, make_client) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from api_support import OtelCapture, parse_traceparent, span_id, trace_id

    otel = OtelCapture()
    try:
        c = make_client(fake_server)
        texts = run(gather(collect(c, f"traced {i}") for i in range(3)))
        assert all(texts)
        spans = [s for s in otel.named("text_completion")
                 if s.attributes.get("gen_ai.response.time_to_first_chunk")]
        assert len(spans) == 3 and len({span_id(s) for s in spans}) == 3
        by_id = {s.attributes["ipfs_accelerate.request_id"]: s for s in spans}
        for r in [r for r in fake_server.requests if r.path == COMPLETIONS]:
            span = by_id[r.headers["x-request-id"]]  # each request carries its own span
            assert parse_traceparent(r.headers["traceparent"]) == (trace_id(span), span_id(span))
            assert span.attributes["gen_ai.response.finish_reasons"] == ("length",)
    finally:
        otel.close()


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_an_async_stream_goes_through_a_users_transport_factory(fake_server, make_client,
                                                                 transport: str) -> None:
    """A transport the caller gave carries async streams too (its calls and reads run in the
    client's executor and are awaited on the caller's loop): the same text as the sync face,
    sent by that transport, and the loop is never blocked."""
    sent: List[str] = []
    base = transport_factory(transport)

    def counting(settings: Any) -> Any:
        inner = base(settings)
        original = inner.open_stream

        def open_stream(request: Any, timeout: Any) -> Any:
            sent.append(request.path)
            return original(request, timeout)
        inner.open_stream = open_stream  # type: ignore[method-assign]
        return inner

    c = make_client(fake_server, counting, batch_streams=False)
    async def both() -> List[str]:
        ticks = 0
        task = asyncio.ensure_future(collect(c, "through the user's transport", max_tokens=6))
        while not task.done():  # the loop keeps turning while the transport works in a thread
            ticks += 1
            await asyncio.sleep(0)
        return [await task, str(ticks > 0)]
    text, turned = run(both())
    assert text == "".join(c.stream_generation("through the user's transport", **{**P, "max_tokens": 6}))
    assert sent == ["/v1/completions", "/v1/completions"] and turned == "True"
