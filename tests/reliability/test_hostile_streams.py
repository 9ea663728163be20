"""Hostile SSE streams: the client ends every stream with text or a typed error, leaks nothing.

Two halves:

* No server: ``ScriptedTransport`` hands the client's stream path (``TextStream`` + the SSE
  decoder + the vLLM adapter) exactly the bytes a test chooses, cut where it chooses: at
  every byte boundary, with ``\\r\\n`` or ``\\r`` line endings, keep-alive comments, ignored
  SSE fields, empty reads, and an event that never ends.
* Over the wire, on both transports (aiohttp, the default, and ``requests`` given as a
  ``transport_factory``), against the
  test double: ``\\r\\n`` + comments, a 4 MB event, invalid JSON, an ``{"error": ...}`` event
  after text, no ``[DONE]``, a dropped socket, a stall (the idle timeout fires), and a reader
  that stops early (the connection is closed, the pool keeps working).

After each wire test the double's open connections and this process's thread count go back
to where they were (bounded polls).
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
from typing import Any, Iterator, List

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.base import build_request
from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.fake_vllm import Fault

from reliability_support import DONE, ScriptedTransport, chunked, event, real_stream
from support import COMPLETE_TRANSPORT_IDS as TRANSPORT_IDS, wait_until

STREAM, TEXT, USAGE = real_stream()


def stream_request(max_tokens: int = 6, **params: Any):
    return build_request("Tell me a story", "tiny-llama",
                         {"max_tokens": max_tokens, "temperature": 0,
                          "stream_options": {"include_usage": True}, **params}, stream=True)


# =========================================================================== no server
def read_all(client: VllmClient, transport: ScriptedTransport, chunks: List[bytes]):
    """Stream ``chunks`` through the client; (text, usage, finish reasons)."""
    transport.script = lambda: list(chunks)
    stream = client.stream(stream_request())
    text = "".join(c.text for c in stream)
    return text, stream.usage, stream.finish_reasons


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_every_byte_boundary_gives_the_same_text_and_usage(scripted, eol):
    client, transport = scripted
    body = STREAM.replace(b"\n", eol)
    expect = (TEXT, USAGE["completion_tokens"], {0: "length"})
    splits = [[body[:i], body[i:]] for i in range(len(body) + 1)]
    splits.append([bytes([b]) for b in body])  # one byte per read
    for chunks in splits:
        text, usage, finish = read_all(client, transport, chunks)
        assert (text, usage.completion_tokens, finish) == expect, chunks[0][-20:]
    assert transport.closed == transport.opened  # every stream was closed
    assert client.current_requests == 0


_NOISE = [b": keep-alive\n\n", b":\n", b": ping 1\n", b"event: message\n", b"id: 42\n",
          b"retry: 1000\n", b"\n"]


def _two_data_lines(frame: bytes) -> bytes:
    """``data: {"a":1,"b":2}`` -> ``data: {"a":1,\\ndata: "b":2}``: SSE joins the lines
    with a newline, which JSON reads as whitespace, so the payload means the same."""
    if not frame.startswith(b"data: {"):
        return frame
    cut = frame.index(b",") + 1
    return frame[:cut] + b"\ndata: " + frame[cut:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=25),
       eol=st.sampled_from([b"\n", b"\r\n", b"\r"]),
       noise=st.lists(st.sampled_from(_NOISE), min_size=8, max_size=8),
       multiline=st.lists(st.booleans(), min_size=8, max_size=8))
def test_any_chunking_with_comments_and_empty_reads_gives_the_same_text(scripted, cuts, eol, noise,
                                                                         multiline):
    """Hypothesis: random cut points (duplicates make empty reads), any line ending,
    comments / ignored fields between events, and events whose JSON spans two ``data:``
    lines never change what the client reads."""
    client, transport = scripted
    frames = [_two_data_lines(f) if m else f
              for f, m in zip(STREAM.split(b"\n\n")[:-1], itertools.cycle(multiline))]
    # A comment or ignored field line goes before each event (it then belongs to it, and
    # SSE says the event's data is unchanged), and a blank line may separate events.
    body = b"".join(n + f + b"\n\n" for n, f in zip(itertools.cycle(noise), frames))
    body = body.replace(b"\n", eol)
    text, usage, finish = read_all(client, transport, list(chunked(body, sorted(cuts))))
    assert text == TEXT and usage.completion_tokens == USAGE["completion_tokens"]
    assert finish == {0: "length"}
    assert transport.closed == transport.opened


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"], ids=["CRLF", "CR"])
def test_an_empty_read_between_cr_and_lf_does_not_split_an_event(scripted, eol):
    """Found by the property above: a read that returns nothing between the CR and the LF of
    a CRLF made the LF count as a blank line, cutting a two-line event in two."""
    client, transport = scripted
    frames = [_two_data_lines(f) for f in STREAM.split(b"\n\n")[:-1]]
    body = b"".join(f + b"\n\n" for f in frames).replace(b"\n", eol)
    cuts = [i + 1 for i, b in enumerate(body) if b == 13]  # after every CR ...
    chunks = list(chunked(body, sorted(cuts + cuts)))  # ... an empty read
    assert b"" in chunks
    text, usage, _ = read_all(client, transport, chunks)
    assert text == TEXT and usage.completion_tokens == USAGE["completion_tokens"]


def test_an_event_that_never_ends_is_refused_not_buffered_forever(scripted):
    """A hostile server sends one endless ``data:`` line: the client stops at its event size
    limit (32 MiB) with a typed error instead of growing without bound."""
    client, transport = scripted
    mib = b"x" * (1 << 20)
    sent = {"n": 0}

    def endless() -> Iterator[bytes]:
        yield event({"choices": [{"index": 0, "text": "before"}]})
        yield b"data: "
        while sent["n"] < 200:  # bounded: a correct client stops after ~32
            sent["n"] += 1
            yield mib

    transport.script = endless
    stream = client.stream(stream_request())
    with pytest.raises(errors.ResponseError, match="larger than"):
        for _ in stream:
            pass
    assert sent["n"] <= 40
    assert stream.text == "before"
    assert transport.closed == transport.opened


@pytest.mark.parametrize("bad, error", [
    (b"data: {not json}\n\n", errors.ResponseError),
    (b"data: [1, 2]\n\n", errors.ResponseError),
    (b"data: \xff\xfe\n\n", errors.ResponseError),
    (event({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}),
     errors.StreamError),
    (event({"error": "plain string"}), errors.StreamError),
], ids=["invalid-json", "not-an-object", "not-utf8", "error-object", "error-string"])
def test_bad_events_after_text_raise_typed_errors_with_the_partial_text(scripted, bad, error):
    client, transport = scripted
    good = STREAM.split(b"\n\n")
    head = b"\n\n".join(good[:3]) + b"\n\n"
    partial = "niri" + "talk" + " terumagi"
    for i in range(len(bad) + 1):  # the bad event split at every byte too
        transport.script = lambda: [head, bad[:i], bad[i:], DONE]
        stream = client.stream(stream_request())
        with pytest.raises(error) as info:
            for _ in stream:
                pass
        exc = info.value
        assert type(exc) is error
        if isinstance(exc, errors.StreamError):
            assert exc.partial_text == partial
        else:
            assert exc.context["partial_text"] == partial
        assert stream.text == partial
    assert transport.closed == transport.opened
    assert client.current_requests == 0


def test_a_stream_that_ends_without_done_is_a_typed_error(scripted):
    client, transport = scripted
    body = STREAM[: STREAM.rindex(DONE)]
    for tail in (b"", b"data: [DON", b"data: {\"choices\": [{\"text\": \"cut"):
        transport.script = lambda: [body, tail]
        stream = client.stream(stream_request())
        with pytest.raises(errors.ResponseError) as info:
            list(stream)
        assert type(info.value) is errors.ResponseError
    assert transport.closed == transport.opened


# =========================================================================== over the wire
def assert_no_leaks(double, client: VllmClient, baseline_threads: int) -> None:
    """Close the client; the double's connections and our threads go back to the baseline."""
    assert client.current_requests == 0
    client.close()
    wait_until(lambda: double.open_connections == 0, 10, what="the double's connections to close")
    wait_until(lambda: threading.active_count() <= baseline_threads, 10,
               what=f"threads back to {baseline_threads} (now {threading.active_count()}: "
                    f"{[t.name for t in threading.enumerate()]})")


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_crlf_comments_and_keepalives_over_the_wire(wire, transport):
    double, make, baseline = wire
    frames = STREAM.split(b"\n\n")[:-1]
    body = b": keep-alive\r\n\r\n" + b"".join(
        b":ping\r\n" + f.replace(b"\n", b"\r\n") + b"\r\n\r\n" + b": keep-alive\r\n\r\n"
        for f in frames)
    double.add_fault(Fault("stream_raw", body=body))
    client = make(transport)
    stream = client.stream(stream_request())
    assert "".join(c.text for c in stream) == TEXT
    assert stream.usage.completion_tokens == USAGE["completion_tokens"]
    assert_no_leaks(double, client, baseline)


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_multi_megabyte_event_over_the_wire(wire, transport):
    double, make, baseline = wire
    big = "\u00e9" * (2 << 20)  # 4 MiB of UTF-8 in one event
    body, text, _ = real_stream(["start ", big, " end"])
    double.add_fault(Fault("stream_raw", body=body))
    client = make(transport)
    stream = client.stream(stream_request())
    got = "".join(c.text for c in stream)
    assert len(got) == len(text) and got == text
    assert_no_leaks(double, client, baseline)


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_invalid_json_event_over_the_wire(wire, transport):
    double, make, baseline = wire
    head = b"\n\n".join(STREAM.split(b"\n\n")[:2]) + b"\n\n"
    double.add_fault(Fault("stream_raw", body=head + b"data: {\"choices\": [\n\n" + DONE))
    client = make(transport)
    stream = client.stream(stream_request())
    with pytest.raises(errors.ResponseError) as info:
        list(stream)
    assert info.value.context["partial_text"] == "niritalk" == stream.text
    assert client.run_inference(None, "still fine?", {"max_tokens": 2}).usage.completion_tokens == 2
    assert_no_leaks(double, client, baseline)


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_error_event_after_text_raises_stream_error_with_partial_text(wire, transport):
    double, make, baseline = wire
    double.add_fault(Fault("stream_error", after_chunks=3))
    client = make(transport)
    stream = client.stream(stream_request(max_tokens=10))
    seen = []
    with pytest.raises(errors.StreamError) as info:
        for chunk in stream:
            seen.append(chunk.text)
    exc = info.value
    assert len(seen) == 3 and exc.partial_text == "".join(seen) == stream.text != ""
    assert exc.error_type == "InternalServerError" and exc.code == 500
    assert "engine error mid-stream" in str(exc)
    assert client.get_metrics()["failures_by_type"] == {"StreamError": 1}
    # The connection was dropped (the reply was not read to its end), and nothing re-sent it.
    wait_until(lambda: double.open_connections == 0, 5, what="the errored stream's socket to close")
    assert double.request_count["/v1/completions"] == 1
    assert_no_leaks(double, client, baseline)


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_stream_without_done_raises_response_error(wire, transport):
    double, make, baseline = wire
    double.add_fault(Fault("stream_no_done"))
    client = make(transport)
    stream = client.stream(stream_request(max_tokens=5))
    with pytest.raises(errors.ResponseError, match=r"\[DONE\]") as info:
        list(stream)
    assert type(info.value) is errors.ResponseError
    assert stream.usage is not None and stream.usage.completion_tokens == 5  # all but [DONE] came
    assert_no_leaks(double, client, baseline)


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_dropped_stream_raises_a_typed_error_and_is_not_resent(wire, transport):
    double, make, baseline = wire
    double.add_fault(Fault("stream_drop", after_chunks=2))
    client = make(transport)
    stream = client.stream(stream_request(max_tokens=10))
    with pytest.raises((errors.ConnectionError, errors.ResponseError)) as info:
        list(stream)
    assert isinstance(info.value, errors.ApiError)
    assert len(stream.text) > 0
    assert double.request_count["/v1/completions"] == 1  # never retried after text came
    assert_no_leaks(double, client, baseline)


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_stalled_stream_fires_the_idle_timeout(wire, transport):
    double, make, baseline = wire
    idle = 0.5
    double.add_fault(Fault("gate", after_chunks=2))  # the third event never comes
    client = make(transport, stream_idle_timeout=idle, timeout=5.0)
    stream = client.stream(stream_request(max_tokens=10))
    it = iter(stream)
    next(it), next(it)
    t0 = time.monotonic()
    with pytest.raises(errors.TimeoutError):
        next(it)
    waited = time.monotonic() - t0
    assert idle * 0.8 <= waited < idle + 1.0, waited
    assert client.get_metrics()["failures_by_type"] == {"TimeoutError": 1}
    assert double.request_count["/v1/completions"] == 1
    # The double notices the closed socket once its gate is released.
    double.release_stalls()
    assert_no_leaks(double, client, baseline)


@pytest.mark.parametrize("how", ["close", "context-manager", "generator-close", "generator-break"])
@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_reader_that_stops_early_closes_the_connection_and_the_pool_stays_good(wire, transport, how):
    double, make, baseline = wire
    client = make(transport)
    params = {"max_tokens": 300, "temperature": 0}
    if how == "close":
        stream = client.stream(stream_request(max_tokens=300))
        next(iter(stream)), next(iter(stream))
        stream.close()
    elif how == "context-manager":
        with client.stream(stream_request(max_tokens=300)) as stream:
            next(iter(stream))
    elif how == "generator-close":
        gen = client.stream_generation("Tell me a story", **params)
        next(gen)
        gen.close()
    else:
        for i, _ in enumerate(client.stream_generation("Tell me a story", **params)):
            if i == 2:
                break
    assert client.current_requests == 0
    wait_until(lambda: double.open_connections == 0, 5, what="the early-closed socket to close")
    m = client.get_metrics()
    assert m["failures_by_type"] == {"ClosedEarly": 1} and m["streams"] == 1
    # The same client goes on: a stream to its end, then a plain request.
    assert "".join(client.stream_generation("again", max_tokens=4, temperature=0))
    assert client.run_inference(None, "and again", {"max_tokens": 3}).usage.completion_tokens == 3
    assert client.get_metrics()["successes"] == 2
    assert_no_leaks(double, client, baseline)


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_a_stream_closed_before_reading_anything_releases_everything(wire, transport):
    """``stream_generation`` opens the request at once; closing (or dropping) the generator
    before the first ``next`` must still close the connection and the in-flight count."""
    double, make, baseline = wire
    client = make(transport)
    gen = client.stream_generation("Tell me a story", max_tokens=300, temperature=0)
    assert client.current_requests == 1
    gen.close()
    assert client.current_requests == 0
    wait_until(lambda: double.open_connections == 0, 5, what="the unread stream's socket to close")
    stream = client.stream(stream_request(max_tokens=300))
    stream.close()
    assert client.current_requests == 0
    assert client.get_metrics()["failures_by_type"] == {"ClosedEarly": 2}
    assert client.run_inference(None, "after", {"max_tokens": 2}).usage.completion_tokens == 2
    assert_no_leaks(double, client, baseline)


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
@pytest.mark.parametrize("read", [0, 2], ids=["unread", "partly-read"])
def test_a_dropped_stream_is_released_when_collected(wire, transport, read):
    """A ``TextStream`` that its caller drops, neither read to its end nor closed, gives back
    its connection and its place in ``current_requests`` once it is garbage-collected."""
    double, make, baseline = wire
    client = make(transport)
    stream = client.stream(stream_request(max_tokens=300))
    for _ in range(read):
        next(stream)
    assert client.current_requests == 1
    del stream
    gc.collect()  # a partly read stream sits in a reference cycle with its generator
    assert client.current_requests == 0
    wait_until(lambda: double.open_connections == 0, 5, what="the dropped stream's socket to close")
    assert client.get_metrics()["failures_by_type"] == {"ClosedEarly": 1}
    assert client.run_inference(None, "after", {"max_tokens": 2}).usage.completion_tokens == 2
    assert_no_leaks(double, client, baseline)
