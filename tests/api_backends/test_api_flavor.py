"""``VllmClient(api_flavor="auto")``: the server is asked which API it speaks by the first call
that sends, never by the constructor.

What is asserted: constructing the client sends nothing (even toward a port where nothing
listens); the first call asks ``GET /v1/models`` once and then goes on, on each face and for a
stream; a server without ``/v1`` (a 404 there) turns the client to the legacy ``/generate``
route, which the first call then uses; a question that fails fails that call, typed, and the
next call asks again.
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict

import pytest

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.plugins import get_backend
from ipfs_accelerate_py.servers.fake_vllm import Fault

P: Dict[str, Any] = {"max_tokens": 4, "temperature": 0}


def test_making_an_auto_client_sends_nothing(make_client) -> None:
    c = make_client("http://127.0.0.1:9", api_flavor="auto")  # nothing listens there
    assert c.api_flavor == "auto"


def test_the_first_call_asks_once_then_sends(fake_server, make_client) -> None:
    c = make_client(fake_server, api_flavor="auto")
    assert sum(fake_server.request_count.values()) == 0
    text = c.generate_text("first", **P)
    assert c.api_flavor == "openai" and c.adapter is get_backend("vllm")
    assert fake_server.request_count["/v1/models"] == 1
    assert c.generate_text("second", **P) and fake_server.request_count["/v1/models"] == 1
    assert text == make_client(fake_server).generate_text("first", **P)


def test_an_async_first_call_asks_on_its_own_loop(fake_server, make_client) -> None:
    c = make_client(fake_server, api_flavor="auto")

    async def go() -> str:
        return await c.agenerate_text("first", **P)
    assert asyncio.run(go()) == make_client(fake_server).generate_text("first", **P)
    assert c.api_flavor == "openai" and fake_server.request_count["/v1/models"] == 1


def test_a_first_stream_asks_too(fake_server, make_client) -> None:
    c = make_client(fake_server, api_flavor="auto")

    async def go() -> str:
        return "".join([t async for t in c.astream_generation("s", **P)])
    assert asyncio.run(go())
    assert c.api_flavor == "openai" and fake_server.request_count["/v1/models"] == 1


def test_a_server_without_v1_turns_the_client_to_the_legacy_route(fake_server,
                                                                  make_client) -> None:
    fake_server.add_fault(Fault("status", status=404, path="/v1/models", count=-1))
    c = make_client(fake_server, api_flavor="auto")
    result = c.run_inference(None, "legacy please", P)
    assert c.api_flavor == "legacy" and c.adapter is get_backend("vllm-legacy")
    assert fake_server.request_count["/generate"] == 1
    assert fake_server.request_count["/v1/completions"] == 0
    assert result.text
    with pytest.raises(errors.ConfigurationError) as caught:  # the legacy route cannot stream
        c.stream_generation("no streams", **P)
    assert caught.value.field == "stream"


def test_a_failed_question_fails_that_call_and_the_next_asks_again(fake_server,
                                                                   make_client) -> None:
    fake_server.add_fault(Fault("status", status=400, path="/v1/models", count=1))
    c = make_client(fake_server, api_flavor="auto")
    with pytest.raises(errors.ApiError):
        c.generate_text("first", **P)
    assert c.api_flavor == "auto" and fake_server.request_count["/v1/completions"] == 0
    assert c.generate_text("second", **P)
    assert c.api_flavor == "openai" and fake_server.request_count["/v1/models"] == 2
