"""Chat batching (``batch_chat=True``): waiting chat requests share ONE
``/v1/chat/completions/batch`` call, each caller gets its own reply, and a server without
that route is asked once, then each chat goes alone.

Queueing is made deterministic the way the completion batching tests do it: one worker is
busy on a stalled request while the chats queue behind it.
"""

from __future__ import annotations

from typing import Any, List

import pytest

from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.fake_vllm import Fault

CHAT_BATCH = "/v1/chat/completions/batch"
CHAT = "/v1/chat/completions"
PARAMS = {"max_tokens": 4, "temperature": 0}
QUESTIONS = ["Hello", "Tell me a story", "What is AI?", "Name a colour and say why"]


def conversation(text: str) -> List[dict]:
    return [{"role": "user", "content": text}]


def queue_chats_behind_a_stalled_blocker(client: VllmClient, server: Any) -> List[Any]:
    """One worker busy on a gated completion; the chats of QUESTIONS queued behind it, then
    the gate released."""
    server.add_fault(Fault("gate", count=1))
    blocker = client.submit_inference(None, "blocker", {"max_tokens": 2})
    server.wait_held(1)  # the blocker reached the double and waits at the gate
    futures = [client.submit_inference(None, conversation(q), PARAMS) for q in QUESTIONS]
    assert len(client.request_queue) == len(QUESTIONS)
    server.release_stalls()
    assert blocker.result(5).usage.completion_tokens == 2
    return [f.result(5) for f in futures]


def solo_replies(server: Any) -> List[Any]:
    """What each chat gets when it is asked alone (a client without chat batching)."""
    with VllmClient(base_url=server.base_url, model="tiny-llama") as alone:
        return [alone.chat_completion(conversation(q), **PARAMS) for q in QUESTIONS]


def test_waiting_chats_share_one_call_and_each_gets_its_own_reply(fake_server, make_client):
    client = make_client(fake_server, max_concurrent_requests=1, batch_chat=True)
    results = queue_chats_behind_a_stalled_blocker(client, fake_server)

    batch_calls = [r for r in fake_server.requests if r.path == CHAT_BATCH]
    assert len(batch_calls) == 1 and fake_server.request_count[CHAT] == 0
    assert batch_calls[0].json["messages"] == [conversation(q) for q in QUESTIONS]

    solo = solo_replies(fake_server)
    assert [r.text for r in results] == [s.text for s in solo]
    # completion tokens are exact per reply (token ids per choice); prompt tokens come back
    # only summed, so each reply carries an even share and the shares add up to the call's
    assert [r.usage.completion_tokens for r in results] == [s.usage.completion_tokens for s in solo]
    call_usage = results[0].batch_usage
    assert all(r.batch_size == len(QUESTIONS) and r.batch_usage == call_usage for r in results)
    assert sum(r.usage.prompt_tokens for r in results) == call_usage.prompt_tokens
    assert call_usage.prompt_tokens == sum(s.usage.prompt_tokens for s in solo)

    m = client.get_metrics()
    assert m["batches"] == 1 and m["batched_requests"] == len(QUESTIONS)
    assert m["requests"] == m["successes"] == 1 + len(QUESTIONS)


def test_chat_batching_is_off_by_default(fake_server, make_client):
    client = make_client(fake_server, max_concurrent_requests=1)
    results = queue_chats_behind_a_stalled_blocker(client, fake_server)
    assert fake_server.request_count[CHAT_BATCH] == 0
    assert fake_server.request_count[CHAT] == len(QUESTIONS)
    assert all(r.batch_size == 1 for r in results)


def test_a_server_without_the_route_is_asked_once_then_chats_go_alone(start_fake, make_client):
    server = start_fake(missing_routes=[CHAT_BATCH])
    client = make_client(server, max_concurrent_requests=1, batch_chat=True)
    first = queue_chats_behind_a_stalled_blocker(client, server)
    assert server.request_count[CHAT_BATCH] == 1  # the one 404
    assert server.request_count[CHAT] == len(QUESTIONS)
    again = queue_chats_behind_a_stalled_blocker(client, server)
    assert server.request_count[CHAT_BATCH] == 1  # not asked again
    assert server.request_count[CHAT] == 2 * len(QUESTIONS)

    solo = solo_replies(server)
    assert [r.text for r in first] == [r.text for r in again] == [s.text for s in solo]
    m = client.get_metrics()
    assert m["failures"] == 0 and m["successes"] == 2 * (1 + len(QUESTIONS))
    # the first chat's id went out twice (with the batch, then alone): one honest retry
    assert m["retries"] == 1 == server.retries_seen


def test_chats_that_cannot_share_a_call_go_alone(fake_server, make_client):
    client = make_client(fake_server, max_concurrent_requests=1, batch_chat=True)
    fake_server.add_fault(Fault("gate", count=1))
    blocker = client.submit_inference(None, "blocker", {"max_tokens": 2})
    fake_server.wait_held(1)  # the blocker waits at the gate
    # n=2 (a chat batch refuses it) and two different temperatures: nothing may merge
    futures = [client.submit_inference(None, conversation("a"), {"max_tokens": 2, "n": 2}),
               client.submit_inference(None, conversation("b"), {"max_tokens": 2, "n": 2}),
               client.submit_inference(None, conversation("c"), {"max_tokens": 2, "temperature": 0}),
               client.submit_inference(None, conversation("d"), {"max_tokens": 2, "temperature": 1})]
    assert len(client.request_queue) == 4
    fake_server.release_stalls()
    blocker.result(5)
    results = [f.result(5) for f in futures]
    assert [len(r.choices) for r in results] == [2, 2, 1, 1]
    assert fake_server.request_count[CHAT_BATCH] == 0 and fake_server.request_count[CHAT] == 4


@pytest.mark.real_server
def test_chat_batch_on_the_real_server_matches_solo_replies(real_base_url):  # noqa: F811
    questions = [f"Question {i}: what is {i} plus {i}?" for i in range(8)]
    with VllmClient(base_url=real_base_url, model="tiny-llama") as alone:
        solo = [alone.chat_completion(conversation(q), **PARAMS) for q in questions]
    with VllmClient(base_url=real_base_url, model="tiny-llama", batch_chat=True,
                    max_concurrent_requests=2) as client:
        futures = [client.submit_inference(None, conversation(q), PARAMS) for q in questions]
        results = [f.result(60) for f in futures]
        m = client.get_metrics()
    assert [r.text for r in results] == [s.text for s in solo]
    assert [r.usage.completion_tokens for r in results] == [s.usage.completion_tokens for s in solo]
    assert m["batches"] >= 1 and m["batched_requests"] >= 2  # fewer calls than chats
    assert m["requests"] == m["successes"] == len(questions)
    # prompt tokens: the calls' totals are exact, so they add up to the solo replies' sum
    assert m["gen_ai.client.token.usage"]["input"] == sum(s.usage.prompt_tokens for s in solo)
