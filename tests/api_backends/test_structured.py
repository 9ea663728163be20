"""``response_model=`` on ``run_inference`` / ``chat_completion`` and their async twins: the
schema goes out as the server's constraint, the answer comes back as an instance
(``result.parsed``), and an answer that does not validate raises ``StructuredOutputError``
with the raw text. The double's text is word salad, so its replies here are scripted
(``bad_body`` faults carrying a well-formed reply); the real model's are in
``test_structured_real.py``."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Dict, List, Literal

import pytest
from pydantic import BaseModel

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.request_build import build_request
from ipfs_accelerate_py.api_backends.structured import ParsedResult
from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer, Fault


class Colour(BaseModel):
    name: Literal["red", "blue"]
    shade: int = 0


def _reply(text: str, chat: bool, finish: str = "stop") -> bytes:
    choice: Any = {"index": 0, "finish_reason": finish}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return json.dumps({"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 1,
                       "model": "tiny-llama", "choices": [choice],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}).encode()


@pytest.fixture
def client(fake_server: FakeVllmServer, make_client: Callable[..., VllmClient]) -> VllmClient:
    return make_client(fake_server, max_retries=0)


MESSAGES = [{"role": "user", "content": "Pick a colour"}]


def test_chat_sends_the_schema_as_response_format_and_parses(fake_server: FakeVllmServer,
                                                             client: VllmClient) -> None:
    fake_server.add_fault(Fault("bad_body", body=_reply('{"name": "blue", "shade": 3}', chat=True), count=1))
    result = client.chat_completion(MESSAGES, max_tokens=32, response_model=Colour)
    assert isinstance(result, ParsedResult) and result.parsed == Colour(name="blue", shade=3)
    assert result.text == '{"name": "blue", "shade": 3}' and result.usage.total_tokens == 8
    sent = fake_server.requests[-1].json
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "Colour", "schema": Colour.model_json_schema()}}


def test_completion_sends_structured_outputs_json(fake_server: FakeVllmServer, client: VllmClient) -> None:
    fake_server.add_fault(Fault("bad_body", body=_reply('{"name": "red"}', chat=False), count=1))
    result = client.run_inference(None, "Pick a colour:", {"max_tokens": 32}, response_model=Colour)
    assert result.parsed == Colour(name="red")
    assert fake_server.requests[-1].json["structured_outputs"] == {"json": Colour.model_json_schema()}


def test_run_inference_with_messages_uses_response_format(fake_server: FakeVllmServer, client: VllmClient) -> None:
    fake_server.add_fault(Fault("bad_body", body=_reply('{"name": "red"}', chat=True), count=1))
    assert client.run_inference(None, MESSAGES, {"max_tokens": 8}, response_model=Colour).parsed.name == "red"
    assert "response_format" in fake_server.requests[-1].json


def test_an_invalid_answer_raises_with_the_raw_text(fake_server: FakeVllmServer, client: VllmClient) -> None:
    fake_server.add_fault(Fault("bad_body", body=_reply('{"name": "gre', chat=True, finish="length"), count=1))
    with pytest.raises(errors.StructuredOutputError, match="cut short by max_tokens") as info:
        client.chat_completion(MESSAGES, max_tokens=4, response_model=Colour)
    assert info.value.raw_text == '{"name": "gre' and info.value.result.finish_reason == "length"
    assert isinstance(info.value, errors.ResponseError) and info.value.errors
    fake_server.add_fault(Fault("bad_body", body=_reply('{"name": "green"}', chat=False), count=1))
    with pytest.raises(errors.StructuredOutputError) as info:
        client.run_inference(None, "Pick", {"max_tokens": 8}, response_model=Colour)
    assert info.value.raw_text == '{"name": "green"}'


def test_async_twins_parse_too(fake_server: FakeVllmServer, client: VllmClient) -> None:
    fake_server.add_fault(Fault("bad_body", body=_reply('{"name": "red"}', chat=True), count=1))
    fake_server.add_fault(Fault("bad_body", body=_reply('{"name": "blue"}', chat=False), count=1))

    async def main() -> Any:
        chat = await client.achat_completion(MESSAGES, max_tokens=8, response_model=Colour)
        text = await client.arun_inference(None, "Pick", {"max_tokens": 8}, response_model=Colour)
        return chat.parsed, text.parsed

    assert asyncio.run(main()) == (Colour(name="red"), Colour(name="blue"))


def test_without_response_model_nothing_changes(fake_server: FakeVllmServer, client: VllmClient) -> None:
    result = client.run_inference(None, "Hello", {"max_tokens": 4})
    assert not isinstance(result, ParsedResult)
    assert "structured_outputs" not in fake_server.requests[-1].json


@pytest.mark.parametrize("call, field", [
    (lambda c: c.chat_completion(MESSAGES, response_model=Colour, response_format={"type": "json_object"}),
     "response_format"),
    (lambda c: c.run_inference(None, "Hi", {"structured_outputs": {"choice": ["a"]}}, response_model=Colour),
     "structured_outputs"),
    (lambda c: c.run_inference(None, "Hi", response_model=dict), "response_model"),
    (lambda c: c.chat_completion(MESSAGES, response_model=Colour(name="red")), "response_model"),
])
def test_conflicts_are_refused_before_sending(listener_client: VllmClient, counting_listener: Any,
                                              call: Callable[[VllmClient], Any], field: str) -> None:
    with pytest.raises(errors.ValidationError) as info:
        call(listener_client)
    assert info.value.field == field and counting_listener.connections == 0


# ------------------------------------------------------------------ streams
def _sse(pieces: List[str], chat: bool) -> bytes:
    """A vLLM-shaped SSE body whose text comes in ``pieces``, then ``[DONE]``."""
    events = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        choice: Dict[str, Any] = {"index": 0, "finish_reason": "stop" if last else None}
        choice.update({"delta": {"content": piece}} if chat else {"text": piece})
        events.append(b"data: " + json.dumps({"id": "s", "object": "x", "created": 1,
                                                "model": "tiny-llama", "choices": [choice]}).encode())
    return b"\n\n".join(events + [b"data: [DONE]"]) + b"\n\n"


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_stream_with_response_model_sends_the_schema_and_ends_parsed(
        fake_server: FakeVllmServer, client: VllmClient, face: str) -> None:
    pieces = ['{"name": ', '"red", ', '"shade": 7}']
    fake_server.add_fault(Fault("stream_raw", body=_sse(pieces, chat=True), count=1))
    request = build_request(MESSAGES, None, {"max_tokens": 32}, stream=True,
                            adapter=client.adapter)
    if face == "sync":
        stream = client.stream(request, response_model=Colour)
        texts = [c.text for c in stream]
    else:
        async def read() -> Any:
            s = client.astream(request, response_model=Colour)
            return [c.text async for c in s], s
        texts, stream = asyncio.run(read())
    assert "".join(texts) == "".join(pieces)
    assert stream.parsed == Colour(name="red", shade=7)
    sent = fake_server.requests[-1].json
    assert sent["response_format"]["json_schema"]["schema"] == Colour.model_json_schema()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_stream_whose_answer_does_not_validate_ends_with_the_typed_error(
        fake_server: FakeVllmServer, client: VllmClient, face: str) -> None:
    fake_server.add_fault(Fault("stream_raw", body=_sse(['{"name": ', '"green"}'], chat=False),
                                count=1))
    request = build_request("Pick a colour:", None, {"max_tokens": 32}, stream=True,
                            adapter=client.adapter)
    got: List[str] = []
    with pytest.raises(errors.StructuredOutputError) as info:
        if face == "sync":
            for c in client.stream(request, response_model=Colour):
                got.append(c.text)
        else:
            async def read() -> None:
                async for c in client.astream(request, response_model=Colour):
                    got.append(c.text)
            asyncio.run(read())
    assert "".join(got) == info.value.raw_text == '{"name": "green"}'  # every piece came first
    assert fake_server.requests[-1].json["structured_outputs"]["json"] == Colour.model_json_schema()
