"""A reply's fields are checked by type, and a wrong one is a typed error naming it.

The parse builds its results without pydantic's second validation (``wire_fields``): the
results must equal what validation would have built, and every field it used to leave to
pydantic must now be refused by the parse itself, as a ``ResponseError`` naming the field
(before: pydantic's own ``ValidationError`` reached the caller)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Dict

import pytest

from ipfs_accelerate_py.api_backends import MockTransport, VllmClient, errors
from ipfs_accelerate_py.api_backends.models import Choice, CompletionResult, Usage
from ipfs_accelerate_py.api_backends.transport import HttpRequest, HttpResponse
from ipfs_accelerate_py.api_backends.wire_fields import checked_model

COMPLETION: Dict[str, Any] = {
    "id": "cmpl-1", "object": "text_completion", "created": 7, "model": "tiny",
    "choices": [{"index": 0, "text": " a b", "finish_reason": "length", "stop_reason": None,
                 "logprobs": None, "token_ids": [5, 6], "prompt_token_ids": [1, 2, 3]}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
CHAT: Dict[str, Any] = {
    "id": "chat-1", "object": "chat.completion", "created": 7, "model": "tiny",
    "choices": [{"index": 0, "finish_reason": "tool_calls",
                 "message": {"role": "assistant", "content": "hi", "reasoning": "r",
                             "tool_calls": [{"id": "t", "type": "function",
                                             "function": {"name": "f", "arguments": "{}"}}]}}],
    "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}}


def _client(reply: Dict[str, Any]) -> VllmClient:
    body = json.dumps(reply).encode()

    def answer(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, {"content-type": "application/json"}, body)
    return VllmClient(base_url="http://127.0.0.1:9", model="tiny", max_retries=0,
                      transport_factory=lambda settings: MockTransport(answer))


def test_a_model_built_from_checked_fields_equals_the_validated_one() -> None:
    choice = checked_model(Choice, {"index": 1, "text": "x", "token_ids": [3],
                                    "completion_tokens": 1})
    usage = checked_model(Usage, {"prompt_tokens": 2, "completion_tokens": 1,
                                  "total_tokens": 3})
    result = checked_model(CompletionResult, {"id": "i", "choices": [choice], "usage": usage})
    want = CompletionResult(id="i", choices=[Choice(index=1, text="x", token_ids=[3],
                                                    completion_tokens=1)],
                            usage=Usage(prompt_tokens=2, completion_tokens=1, total_tokens=3))
    assert result == want
    assert repr(result) == repr(want) and result.model_dump_json() == want.model_dump_json()
    assert result.model_fields_set == want.model_fields_set
    assert choice.model_fields_set == {"index", "text", "token_ids", "completion_tokens"}
    # defaults made by factories are fresh per model, as validation makes them
    a, b = checked_model(CompletionResult, {}), checked_model(CompletionResult, {})
    a.choices.append(choice)
    assert b.choices == [] and a.usage is not b.usage
    # copies and updates behave as on a validated model
    moved = choice.model_copy(update={"index": 0})
    assert moved.index == 0 and choice.index == 1


@pytest.mark.parametrize("reply", [COMPLETION, CHAT], ids=["completion", "chat"])
def test_a_well_formed_reply_parses_to_what_validation_would_build(reply: Dict[str, Any]) -> None:
    client = _client(reply)
    try:
        if reply is CHAT:
            got = client.chat_completion([{"role": "user", "content": "q"}])
            assert got.tool_calls == reply["choices"][0]["message"]["tool_calls"]
            assert got.reasoning == "r" and got.text == "hi"
        else:
            got = client.run_inference(None, "q", {"max_tokens": 2})
            assert got.token_ids == [5, 6] and got.prompt_token_ids == [1, 2, 3]
            assert got.choices[0].completion_tokens == 2 and got.choices[0].prompt_tokens == 3
        # the same values through pydantic's validation: equal, field for field
        assert CompletionResult.model_validate(got.model_dump()) == got
        assert got.usage == Usage(**reply["usage"])
    finally:
        client.close()


def _set(reply: Dict[str, Any], path: str, value: Any) -> Dict[str, Any]:
    out = json.loads(json.dumps(reply))
    node: Any = out
    keys = path.replace("[0]", ".0").split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    node[keys[-1]] = value
    return out


WRONG = [  # (reply, the field as a path, a value of the wrong type)
    (COMPLETION, "choices[0].text", 5),
    (COMPLETION, "choices[0].finish_reason", 1),
    (COMPLETION, "choices[0].stop_reason", [1]),
    (COMPLETION, "choices[0].logprobs", [1]),
    (COMPLETION, "choices[0].token_ids", "5 6"),
    (COMPLETION, "choices[0].prompt_token_ids", {"a": 1}),
    (COMPLETION, "id", 5),
    (COMPLETION, "model", ["tiny"]),
    (COMPLETION, "created", "yesterday"),
    (COMPLETION, "usage.prompt_tokens", "3"),
    (COMPLETION, "usage.completion_tokens", 2.5),
    (CHAT, "choices[0].message.content", 42),
    (CHAT, "choices[0].message.tool_calls", "call f"),
    (CHAT, "choices[0].message.reasoning", {"r": 1}),
]


@pytest.mark.parametrize("reply,field,value", WRONG, ids=[w[1] + "-" + type(w[2]).__name__
                                                          for w in WRONG])
@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_reply_field_of_the_wrong_type_is_a_response_error_naming_it(
        reply: Dict[str, Any], field: str, value: Any, face: str) -> None:
    client = _client(_set(reply, field, value))
    try:
        with pytest.raises(errors.ResponseError) as caught:
            if reply is CHAT:
                messages = [{"role": "user", "content": "q"}]
                if face == "sync":
                    client.chat_completion(messages)
                else:
                    asyncio.run(client.achat_completion(messages))
            elif face == "sync":
                client.run_inference(None, "q", {"max_tokens": 2})
            else:
                asyncio.run(client.arun_inference(None, "q", {"max_tokens": 2}))
        assert caught.value.context["field"].startswith(field)
        assert field in str(caught.value)
    finally:
        client.close()


def test_an_element_of_token_ids_that_is_no_integer_is_refused() -> None:
    client = _client(_set(COMPLETION, "choices[0].token_ids", [5, "6"]))
    try:
        with pytest.raises(errors.ResponseError) as caught:
            client.run_inference(None, "q", {"max_tokens": 2})
        assert caught.value.context["field"] == "choices[0].token_ids[]"
    finally:
        client.close()


# ------------------------------------------------------------------ streamed events
EVENT: Dict[str, Any] = {
    "id": "cmpl-2", "object": "text_completion", "created": 7, "model": "tiny",
    "choices": [{"index": 0, "text": " a", "finish_reason": None, "stop_reason": None}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
CHAT_EVENT: Dict[str, Any] = {
    "id": "chat-2", "object": "chat.completion.chunk", "created": 7, "model": "tiny",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}


def _streaming_client(event: Dict[str, Any], template: Dict[str, Any]) -> VllmClient:
    """A double whose every stream is ``event``, then one that finishes ``template``'s
    choice, then [DONE]."""
    end = dict(template, choices=[dict(template["choices"][0], finish_reason="length")],
               usage=None)
    if "delta" in template["choices"][0]:
        end["choices"][0]["delta"] = {"content": ""}
    else:
        end["choices"][0]["text"] = ""
    sse = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in (event, end))

    def answer(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, {"content-type": "text/event-stream"},
                            sse + b"data: [DONE]\n\n")
    return VllmClient(base_url="http://127.0.0.1:9", model="tiny", max_retries=0,
                      transport_factory=lambda settings: MockTransport(answer))


def _stream_all(client: VllmClient, chat: bool, face: str) -> str:
    if chat:
        request: Any = client.adapter.chat_request(
            model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=2, stream=True)
    else:
        request = client.adapter.completion_request(model="tiny", prompt="q", max_tokens=2,
                                                    stream=True)
    if face == "sync":
        return "".join(chunk.text for chunk in client.stream(request))

    async def go() -> str:
        async with client.astream(request) as stream:
            return "".join([chunk.text async for chunk in stream])
    return asyncio.run(go())


@pytest.mark.parametrize("face", ["sync", "async"])
@pytest.mark.parametrize("event", [EVENT, CHAT_EVENT], ids=["completion", "chat"])
def test_a_well_formed_stream_event_gives_its_text(event: Dict[str, Any], face: str) -> None:
    client = _streaming_client(event, event)
    try:
        want = " a" if event is EVENT else "hi"
        assert _stream_all(client, event is CHAT_EVENT, face) == want
    finally:
        client.close()


WRONG_EVENTS = [  # (event, the field as a path, a value of the wrong type)
    (EVENT, "choices[0].text", 5),
    (EVENT, "choices[0].finish_reason", 1),
    (EVENT, "id", 5),
    (EVENT, "model", ["tiny"]),
    (EVENT, "usage.prompt_tokens", "3"),
    (EVENT, "choices", "all of them"),
    (EVENT, "choices[0]", 7),
    (CHAT_EVENT, "choices[0].delta.content", 42),
    (CHAT_EVENT, "choices[0].delta", "hi"),
]


@pytest.mark.parametrize("event,field,value", WRONG_EVENTS,
                         ids=[w[1] + "-" + type(w[2]).__name__ for w in WRONG_EVENTS])
@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_stream_event_field_of_the_wrong_type_is_a_response_error_naming_it(
        event: Dict[str, Any], field: str, value: Any, face: str) -> None:
    """Before: pydantic's untyped ValidationError (or an AttributeError for a choice that
    is no object) reached the stream's reader."""
    bad = json.loads(json.dumps(event))
    if field == "choices":
        bad["choices"] = value
    elif field == "choices[0]":
        bad["choices"] = [value]
    else:
        bad = _set(event, field, value)
    client = _streaming_client(bad, event)
    try:
        with pytest.raises(errors.ResponseError) as caught:
            _stream_all(client, event is CHAT_EVENT, face)
        assert caught.value.context["field"] == field
        assert repr(field) in str(caught.value)
    finally:
        client.close()
