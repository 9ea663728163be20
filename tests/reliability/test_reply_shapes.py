"""Hunting for wrong answers in shared calls (issue 22 point 4): arbitrary prompt-list reply
shapes, complete and streamed, under any byte split.

``ShapeTransport`` answers every single prompt rightly and a prompt list with a shape
hypothesis draws from the right one: choices missing, duplicated, extra (out of range),
reordered, without ``index`` (or a non-integer one), all numbered 0, unfinished; a stream's
end marker early; usage absent, zero or wrong. The property, for every caller of every
shape: it gets exactly its own choices (the text its prompt alone gets, its finish reasons,
its usage) or a typed error (``errors.ApiError``); never another caller's text, never a
short text as success. Complete requests are re-sent alone after a mismatch, so there every
caller gets its own answer, and the endpoint stops sharing (``batch_mismatches``). A shared
stream's member that was already handed text cannot be re-sent: it ends with a typed error.

Groups form deterministically as in ``test_stream_batching``: a primed burst, a long linger
and ``max_batch_size`` equal to the callers, so a group opens when full (a caller thread
stalled past the linger on a loaded machine makes a smaller call: the property holds for
whatever call is sent, and the validity of every list reply is judged per call).
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

from hypothesis import HealthCheck, example, given, settings, strategies as st

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.streaming import SharedTextStream
from ipfs_accelerate_py.api_backends.vllm import VllmClient

from reliability_support import (DONE, LIST_HEAD, ShapeTransport, answer, answer_choice,
                                 answer_events, answer_usage, chunked, event,
                                 list_stream_request)

_POOL = ThreadPoolExecutor(8, thread_name_prefix="shape-caller")
_JUNK = "<an answer nobody asked for>"
_SETTINGS = settings(max_examples=120, deadline=None, derandomize=False,
                     suppress_health_check=[HealthCheck.too_slow])


def prompts_for(k: int) -> List[str]:
    return [f"p{i} " + "\u65e5" * i for i in range(k)]


def params_for(n: int) -> Dict[str, Any]:
    return {"max_tokens": 4, "n": n, "temperature": 0 if n == 1 else 1.0}


def new_client(transport: ShapeTransport, k: int) -> VllmClient:
    """A client whose next ``k`` compatible calls gather into one (a primed burst)."""
    client = VllmClient(base_url="http://127.0.0.1:9", model="tiny-llama", max_retries=0,
                        max_batch_size=k, batch_linger=1.0, batch_timeout=60.0,
                        transport_factory=lambda s: transport)
    prime = client.stream(list_stream_request("prime"))  # a lone stream goes at once: a burst
    assert not isinstance(prime, SharedTextStream)
    assert prime.text == "" and "".join(c.text for c in prime) == "".join(answer("prime"))
    transport.calls.clear()
    return client


# =========================================================================== complete replies
_IDX = st.integers(0, 63)
COMPLETE_OPS = st.lists(st.one_of(
    st.tuples(st.just("drop"), _IDX),
    st.tuples(st.just("dup"), _IDX),
    st.tuples(st.just("extra"), st.sampled_from([-1, 0, 7])),  # index -1, W, W + 7
    st.tuples(st.just("noindex"), _IDX),
    st.tuples(st.just("badindex"), _IDX, st.sampled_from([None, "1", 1.5, True])),
    st.tuples(st.just("zero_all")),
    st.tuples(st.just("unfinish"), _IDX),
), max_size=4)
USAGE = st.sampled_from(["ok", "absent", "zero", "prompt_off", "completion_off"])


def complete_shape(prompts: List[str], n: int, ops: List[Tuple[Any, ...]], order: int,
                   usage: str) -> Tuple[bytes, bool]:
    """(the reply body, whether it rightly answers ``prompts``): the right choices with
    ``ops`` applied in order, shuffled by ``order`` (0: as they are), with ``usage``."""
    w = len(prompts) * n
    choices = [answer_choice(p, i * n + j, j) for i, p in enumerate(prompts) for j in range(n)]
    for op in ops:
        at = op[1] % len(choices) if len(op) > 1 and choices else None
        if op[0] == "drop" and at is not None:
            del choices[at]
        elif op[0] == "dup" and at is not None:
            choices.insert(at, copy.deepcopy(choices[at]))  # a copy: the same content
        elif op[0] == "extra":
            choices.append({**answer_choice(_JUNK, 0, 0), "index": -1 if op[1] < 0 else w + op[1]})
        elif op[0] == "noindex" and at is not None:
            choices[at].pop("index", None)
        elif op[0] == "badindex" and at is not None:
            choices[at]["index"] = op[2]
        elif op[0] == "zero_all":
            for c in choices:
                c["index"] = 0
        elif op[0] == "unfinish" and at is not None:
            choices[at]["finish_reason"] = None
    if order:
        random.Random(order).shuffle(choices)
    indexes = [c.get("index") for c in choices]
    right_choices = (all(type(i) is int for i in indexes) and sorted(indexes) == list(range(w))
                     and all(c["finish_reason"] for c in choices))
    body: Dict[str, Any] = {**LIST_HEAD, "choices": choices}
    u = answer_usage(prompts, n)
    if usage == "ok":
        body["usage"] = u
    elif usage == "zero":
        body["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    elif usage == "prompt_off":
        body["usage"] = {**u, "prompt_tokens": u["prompt_tokens"] // 2}
    elif usage == "completion_off":
        body["usage"] = {**u, "completion_tokens": u["completion_tokens"] + 3}
    return json.dumps(body).encode(), right_choices and usage in ("ok", "absent", "zero")


@_SETTINGS
@given(k=st.integers(2, 5), n=st.sampled_from([1, 1, 2]), ops=COMPLETE_OPS,
       order=st.integers(0, 3), usage=USAGE)
def test_any_complete_list_reply_gives_each_caller_its_own_answer(k, n, ops, order, usage):
    transport = ShapeTransport()
    verdicts: List[bool] = []

    def reply(prompts: List[str], n_: int) -> bytes:
        body, right = complete_shape(prompts, n_, ops, order, usage)
        verdicts.append(right)
        return body

    transport.list_reply = reply
    client = new_client(transport, k)
    try:
        prompts = prompts_for(k)
        outcomes = list(_POOL.map(lambda p: _complete(client, p, n), prompts))
        for p, got in zip(prompts, outcomes):
            # never another's text, never a short one: its own answer, exactly
            assert not isinstance(got, BaseException), f"{p!r}: {got!r}"
            assert [c.text for c in got.choices] == ["".join(answer(p, j)) for j in range(n)]
            assert [c.index for c in got.choices] == list(range(n))
            assert all(c.finish_reason == "length" for c in got.choices)
            assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
                len(p), sum(len(answer(p, j)) for j in range(n)))
        m = client.get_metrics()
        assert len(verdicts) == len(transport.lists)
        if all(verdicts):  # right replies are split and believed; the endpoint goes on sharing
            assert m["batch_mismatches"] == 0
            assert all(len(c) > 1 for c in transport.calls)
        else:  # a wrong one: its members were re-sent alone, and sharing stopped
            assert m["batch_mismatches"] >= 1
            assert client._endpoint(None).shares_prompt_lists is False
            wrong = transport.lists[verdicts.index(False)]
            alone = [c[0] for c in transport.calls if len(c) == 1]
            assert all(p in alone for p in wrong), (wrong, transport.calls)
        assert m["failures"] == 0 and client.current_requests == 0
    finally:
        client.close()


def _complete(client: VllmClient, prompt: str, n: int) -> Any:
    try:
        return client.run_inference(None, prompt, params_for(n))
    except BaseException as exc:  # noqa: BLE001 - judged by the test
        return exc


# =========================================================================== streamed replies
STREAM_OPS = st.lists(st.one_of(
    st.tuples(st.just("dup_choice"), _IDX),
    st.tuples(st.just("dup_final"), _IDX),
    st.tuples(st.just("extra"), st.sampled_from([-1, 0, 7])),
    st.tuples(st.just("drop_choice"), _IDX),
    st.tuples(st.just("drop_final"), _IDX),
    st.tuples(st.just("noindex"), _IDX, st.integers(0, 3)),
    st.tuples(st.just("zero_all")),
), max_size=4)
STREAM_USAGE = st.sampled_from(["ok", "no_total", "none", "bad_total", "bad_events",
                                "no_events"])
_ORDER = {"dup_choice": 0, "dup_final": 0, "extra": 0, "drop_choice": 1, "drop_final": 1,
          "noindex": 2, "zero_all": 3}


def stream_shape(prompts: List[str], n: int, ops: List[Tuple[Any, ...]], order: int,
                 usage: str, done_at: Optional[int]) -> Tuple[bytes, bool]:
    """(the SSE body, whether it rightly answers ``prompts``). Each choice's events are one
    unit, kept in order (a duplicate goes after its original, so whatever comes of it is
    seen after a ``finish_reason``); the units are interleaved by ``order`` (0: round
    robin, as vLLM does); ``done_at``: ``[DONE]`` after that many events (None: at the end)."""
    w = len(prompts) * n
    units = answer_events(prompts, n, usage=usage not in ("none", "no_events"))
    if usage == "bad_events":  # list_bad_usage: every event's prompt_tokens is the list's
        for unit in units:
            for ev in unit:
                ev["usage"]["prompt_tokens"] = sum(len(p) for p in prompts)
    for op in sorted(ops, key=lambda o: _ORDER[o[0]]):
        at = op[1] % w if len(op) > 1 else 0
        if op[0] == "dup_choice":
            units[at] = units[at] + copy.deepcopy(answer_events(prompts, n)[at])
        elif op[0] == "dup_final" and units[at]:
            units[at] = units[at] + [copy.deepcopy(units[at][-1])]
        elif op[0] == "extra":
            units.append([{**LIST_HEAD, "choices": [{"index": -1 if op[1] < 0 else w + op[1],
                                                      "text": _JUNK, "finish_reason": f}]}
                          for f in (None, "length")])
        elif op[0] == "drop_choice":
            units[at] = []
        elif op[0] == "drop_final":
            units[at] = units[at][:-1]
        elif op[0] == "noindex" and units[at]:
            units[at][op[2] % len(units[at])]["choices"][0].pop("index", None)
        elif op[0] == "zero_all":
            for unit in units:
                for ev in unit:
                    ev["choices"][0]["index"] = 0
    events: List[Dict[str, Any]] = []
    rng = random.Random(order)
    cursors = [0] * len(units)
    while True:
        live = [u for u in range(len(units)) if cursors[u] < len(units[u])]
        if not live:
            break
        if order:
            picks = [rng.choice(live)]
        else:
            picks = live  # one event of each, in turn
        for u in picks:
            events.append(units[u][cursors[u]])
            cursors[u] += 1
    total = answer_usage(prompts, n)
    if usage == "bad_total":
        total = {**total, "prompt_tokens": total["prompt_tokens"] // 2}
    if usage not in ("no_total", "none"):
        events.append({**LIST_HEAD, "choices": [], "usage": total})
    cut = len(events) if done_at is None else min(done_at, len(events))
    seen = events[:cut]  # what comes after [DONE] is never read
    # Right when every choice's events before [DONE] are exactly its own (nothing missing,
    # duplicated, extra or unnumbered) and the usage seen adds up; a usage fault shows only
    # against the call's total, the last event: cut off, it cannot be told.
    total_seen = usage not in ("no_total", "none") and cut == len(events)
    right = _units_right(seen, prompts, n) and (usage in ("ok", "no_total", "none")
                                                or not total_seen)
    return b"".join(event(e) for e in seen) + DONE + b"".join(event(e) for e in events[cut:]), right


def _units_right(events: List[Dict[str, Any]], prompts: List[str], n: int) -> bool:
    """Every choice's events, in the order they came, are exactly its right ones."""
    right = answer_events(prompts, n, usage=False)
    got: Dict[Any, List[Tuple[str, Any]]] = {}
    for e in events:
        for c in e["choices"]:
            got.setdefault(c.get("index", "none"), []).append((c["text"], c["finish_reason"]))
    want = {i: [(e["choices"][0]["text"], e["choices"][0]["finish_reason"]) for e in unit]
            for i, unit in enumerate(right)}
    return got == want


def stream_request(prompt: str, n: int) -> Any:
    return list_stream_request(prompt, **params_for(n))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(2, 4), n=st.sampled_from([1, 1, 2]), ops=STREAM_OPS,
       order=st.integers(0, 5), usage=STREAM_USAGE,
       done_at=st.one_of(st.none(), st.integers(0, 40)),
       cuts=st.lists(st.integers(0, 4000), max_size=25),
       schedule=st.lists(st.integers(0, 3), max_size=12),
       face=st.sampled_from(["sync", "async"]))
# a right reply whose duplicate events come only after [DONE] (never read): right, shared
@example(k=2, n=1, ops=[("dup_choice", 0)], order=0, usage="ok", done_at=8, cuts=[],
         schedule=[], face="sync")
def test_any_streamed_list_reply_gives_each_caller_its_own_text_or_a_typed_error(
        k, n, ops, order, usage, done_at, cuts, schedule, face):
    """Either face: sync callers open from their threads and are read from this one in the
    order ``schedule`` says; async ones open together on one loop and are read likewise
    (a shared call is opened on the client's loop by the transport given to the client,
    whichever face its members came from)."""
    transport = ShapeTransport()
    verdicts: List[bool] = []

    def reply(prompts: List[str], n_: int) -> bytes:
        body, right = stream_shape(prompts, n_, ops, order, usage, done_at)
        verdicts.append(right)
        return body

    transport.list_stream = reply
    transport.cut = lambda b: list(chunked(b, sorted(cuts)))
    client = new_client(transport, k)
    try:
        prompts = prompts_for(k)
        errs: List[Optional[BaseException]] = [None] * k
        texts: List[Dict[int, str]] = [{} for _ in range(k)]

        def take(i: int, chunk: Any) -> None:
            if chunk is not None and chunk.usage is None:
                texts[i][chunk.index] = texts[i].get(chunk.index, "") + chunk.text

        if face == "sync":
            streams = list(_POOL.map(lambda p: client.stream(stream_request(p, n)), prompts))
            for i in schedule:  # one chunk at a time from the member the schedule names
                i %= k
                if errs[i] is None:
                    try:
                        take(i, next(streams[i], None))
                    except BaseException as exc:  # noqa: BLE001 - judged below
                        errs[i] = exc
            for i, s in enumerate(streams):
                if errs[i] is None:
                    try:
                        for chunk in s:
                            take(i, chunk)
                    except BaseException as exc:  # noqa: BLE001 - judged below
                        errs[i] = exc
        else:
            streams = [client.astream(stream_request(p, n)) for p in prompts]

            async def read_all() -> None:
                await asyncio.gather(*(s.__aenter__() for s in streams))
                for i in schedule:
                    i %= k
                    if errs[i] is None:
                        try:
                            take(i, await streams[i].__anext__())
                        except StopAsyncIteration:
                            pass
                        except Exception as exc:  # noqa: BLE001 - judged below
                            errs[i] = exc
                for i, s in enumerate(streams):
                    if errs[i] is None:
                        try:
                            async for chunk in s:
                                take(i, chunk)
                        except Exception as exc:  # noqa: BLE001 - judged below
                            errs[i] = exc
                    await s.aclose()

            asyncio.run(read_all())
        wrong_as_error = 0
        for p, s, exc, got in zip(prompts, streams, errs, texts):
            own = {j: "".join(answer(p, j)) for j in range(n)}
            if exc is None:  # a success is its own full text, every choice finished
                assert got == own, (p, got, ops, usage, done_at)
                assert s.finish_reasons == {j: "length" for j in range(n)}
                if usage in ("ok", "no_total") and all(verdicts):
                    assert (s.usage.prompt_tokens, s.usage.completion_tokens) == (
                        len(p), sum(len(answer(p, j)) for j in range(n)))
            else:
                assert isinstance(exc, errors.ApiError), repr(exc)
                wrong_as_error += 1
        m = client.get_metrics()
        assert transport.lists  # (a group opens when full: they shared a call)
        if all(verdicts):
            assert wrong_as_error == 0 and m["batch_mismatches"] == 0, errs
        else:
            assert m["batch_mismatches"] >= 1, (ops, usage, done_at)
            assert client._endpoint(None).shares_prompt_lists is False
        if face == "sync":
            for s in streams:
                s.close()
        assert client.current_requests == 0
    finally:
        client.close()
    assert transport.closed == transport.opened


def test_a_shape_the_checks_refuse_is_refused_whole_for_streams_too():
    """The one answer carried under index 0 is the LAST prompt's (a proxy that streams one
    prompt of a list): at ``[DONE]`` the reply lacks every other choice, so no member's
    text from it is believed, the first member's included."""
    transport = ShapeTransport()

    def last_only(prompts: List[str], n: int) -> bytes:
        unit = answer_events([prompts[-1]], n)[0]
        return b"".join(event(e) for e in unit) + DONE

    transport.list_stream = last_only
    client = new_client(transport, 3)
    try:
        prompts = prompts_for(3)
        streams = list(_POOL.map(lambda p: client.stream(stream_request(p, 1)), prompts))
        for p, s in zip(prompts, streams):
            try:
                text = "".join(c.text for c in s)
            except errors.ApiError as exc:
                assert isinstance(exc, errors.ReplyMismatchError), repr(exc)
            else:
                assert text == "".join(answer(p)), f"{p!r} was given {text!r} as a success"
        assert client.get_metrics()["batch_mismatches"] == 1
    finally:
        client.close()
