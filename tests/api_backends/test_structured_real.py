"""``response_model=`` against the real server (the session's ``real_vllm_server``): the tiny
model, constrained by the schema (xgrammar), answers an instance; a schema it cannot finish
within ``max_tokens`` raises ``StructuredOutputError`` with the raw text."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.vllm import VllmClient

pytestmark = pytest.mark.real_server


class Colour(BaseModel):
    name: Literal["red", "blue"]


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def client(real_base_url: str) -> Any:
    with VllmClient(base_url=real_base_url, model="tiny-llama", timeout=60) as c:
        yield c


def test_response_model_returns_an_instance_on_both_faces(client: VllmClient) -> None:
    params = {"max_tokens": 32, "temperature": 0}
    assert isinstance(client.run_inference(None, "Answer in JSON:", params, response_model=Colour).parsed, Colour)
    chat = client.chat_completion([{"role": "user", "content": "Answer in JSON"}], response_model=Colour, **params)
    assert isinstance(chat.parsed, Colour) and Colour.model_validate_json(chat.text) == chat.parsed

    async def main() -> Any:
        return await client.achat_completion([{"role": "user", "content": "JSON"}], response_model=Colour, **params)

    assert isinstance(asyncio.run(main()).parsed, Colour)


def test_an_unfinished_answer_is_a_typed_error_with_the_raw_text(client: VllmClient) -> None:
    # the tiny model writes digits for ``age`` until max_tokens ends it: not valid JSON
    with pytest.raises(errors.StructuredOutputError) as info:
        client.run_inference(None, "Answer in JSON:", {"max_tokens": 32, "temperature": 0}, response_model=Person)
    assert info.value.raw_text.startswith('{"name":') and info.value.result.finish_reason == "length"
