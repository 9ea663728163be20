"""A server (or a proxy) that mishandles prompt lists never hands a caller a wrong answer.

The double's ``list_*`` faults answer every prompt-list call wrongly (only the first prompt,
every choice numbered 0, choices without ``index`` in another order, ``[DONE]`` before the
last prompt's end, usage that does not add up). Twelve concurrent callers per mode, complete
requests and streams on both faces: no caller is given another caller's text, or a short
one, as a success (each gets its own text, or a typed error when its stream had already
yielded text); after the first mismatch the endpoint stops sharing calls, so the next round
gives every caller its own text.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Tuple

import pytest

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.servers.fake_vllm import Fault

CALLERS = 12
MODES = ["list_first_only", "list_index_zero", "list_no_index", "list_early_done",
         "list_bad_usage"]
PROMPTS = [f"caller {i} asks about item {i * 7}" for i in range(CALLERS)]
PARAMS: Dict[str, Any] = {"max_tokens": 6, "temperature": 0,
                          "stream_options": {"include_usage": True}}
COMPLETE_PARAMS: Dict[str, Any] = {"max_tokens": 6, "temperature": 0}
#: a group forms when full: long linger, a batch as large as the callers
GROUPING = dict(max_batch_size=CALLERS, batch_linger=1.0, batch_timeout=30.0,
                max_concurrent_requests=4, max_retries=1)

Outcome = Tuple[str, Any]  # ("ok", text) or ("error", the exception)


def expected_texts(make_client: Callable[..., Any], server: Any) -> Dict[str, str]:
    """Each prompt sent alone (no sharing): what its caller must get."""
    alone = make_client(server, batch_enabled=False)
    return {p: alone.run_inference(None, p, COMPLETE_PARAMS).text for p in PROMPTS}


def complete_round(client: Any) -> List[Outcome]:
    def call(prompt: str) -> Outcome:
        try:
            return "ok", client.run_inference(None, prompt, COMPLETE_PARAMS).text
        except Exception as exc:  # noqa: BLE001 - judged below
            return "error", exc
    with ThreadPoolExecutor(CALLERS) as pool:
        return list(pool.map(call, PROMPTS))


def sync_stream_round(client: Any) -> List[Outcome]:
    def call(prompt: str) -> Outcome:
        got: List[str] = []
        try:
            for piece in client.stream_generation(prompt, **PARAMS):
                got.append(piece)
            return "ok", "".join(got)
        except Exception as exc:  # noqa: BLE001 - judged below
            return "error", exc
    with ThreadPoolExecutor(CALLERS) as pool:
        return list(pool.map(call, PROMPTS))


def async_stream_round(client: Any) -> List[Outcome]:
    async def call(prompt: str) -> Outcome:
        got: List[str] = []
        try:
            async for piece in client.astream_generation(prompt, **PARAMS):
                got.append(piece)
            return "ok", "".join(got)
        except Exception as exc:  # noqa: BLE001 - judged below
            return "error", exc

    async def all_of_them() -> List[Outcome]:
        return list(await asyncio.gather(*(call(p) for p in PROMPTS)))
    return asyncio.run(all_of_them())


def async_complete_round(client: Any) -> List[Outcome]:
    async def call(prompt: str) -> Outcome:
        try:
            return "ok", (await client.arun_inference(None, prompt, COMPLETE_PARAMS)).text
        except Exception as exc:  # noqa: BLE001 - judged below
            return "error", exc

    async def all_of_them() -> List[Outcome]:
        return list(await asyncio.gather(*(call(p) for p in PROMPTS)))
    return asyncio.run(all_of_them())


ROUNDS = {"complete": complete_round, "async-complete": async_complete_round,
          "sync-stream": sync_stream_round, "async-stream": async_stream_round}


def judge(outcomes: List[Outcome], want: Dict[str, str]) -> Dict[str, int]:
    """Count what the callers saw: their own text, a typed error, or a wrong answer."""
    counts = {"own": 0, "typed_error": 0, "wrong": 0, "untyped_error": 0}
    for prompt, (kind, value) in zip(PROMPTS, outcomes):
        if kind == "ok":
            counts["own" if value == want[prompt] else "wrong"] += 1
        elif isinstance(value, errors.ReplyMismatchError):  # a stream that had yielded text
            counts["typed_error"] += 1
            assert value.expected and value.received, value
        else:
            counts["untyped_error"] += 1
    return counts


@pytest.mark.parametrize("face", sorted(ROUNDS))
@pytest.mark.parametrize("mode", MODES)
def test_a_mishandled_list_never_gives_a_caller_a_wrong_answer(start_fake, make_client,
                                                               mode: str, face: str) -> None:
    server = start_fake()
    want = expected_texts(make_client, server)
    server.add_fault(Fault(mode, count=-1, seed=3))  # every prompt-list call, from now on
    client = make_client(server, **GROUPING)
    if "stream" in face:  # a lone stream first: the streams after it are a burst, and gather
        assert "".join(client.stream_generation("prime", **PARAMS))
    shared_before = server.request_count["/v1/completions"]

    first = judge(ROUNDS[face](client), want)
    assert first["wrong"] == 0 and first["untyped_error"] == 0, first
    assert first["own"] + first["typed_error"] == CALLERS
    metrics = client.get_metrics()
    if mode == "list_bad_usage" and "stream" in face:
        # streamed usage is judged at the end (each member's own counts, then the total)
        assert metrics["batch_mismatches"] >= 1 or metrics["batches"] == 0
    else:
        assert metrics["batch_mismatches"] >= 1, (metrics, first)
    if "complete" in face:
        assert first["own"] == CALLERS  # nothing was yielded: every member was re-sent alone
        assert not client._endpoint(None).shares_prompt_lists
    assert server.request_count["/v1/completions"] > shared_before

    # The endpoint no longer shares calls: every caller of the next round has its own text.
    second = judge(ROUNDS[face](client), want)
    assert second == {"own": CALLERS, "typed_error": 0, "wrong": 0, "untyped_error": 0}, second


def test_forcing_shared_calls_still_resends_every_mismatched_member(start_fake, make_client) -> None:
    """``batch_prompt_lists=True``: the endpoint keeps sharing, and each mismatched call's
    members are still re-sent alone, round after round."""
    server = start_fake()
    want = expected_texts(make_client, server)
    server.add_fault(Fault("list_index_zero", count=-1))
    client = make_client(server, batch_prompt_lists=True, **GROUPING)
    for _ in range(2):
        assert judge(complete_round(client), want)["own"] == CALLERS
    assert client.get_metrics()["batch_mismatches"] >= 2


def test_sharing_can_be_turned_off_for_an_endpoint(start_fake, make_client) -> None:
    server = start_fake()
    want = expected_texts(make_client, server)
    client = make_client(server, batch_prompt_lists=False, **GROUPING)
    assert judge(complete_round(client), want)["own"] == CALLERS
    assert client.get_metrics()["batches"] == 0
    lists = [r for r in server.requests if isinstance((r.json or {}).get("prompt"), list)]
    assert lists == []
