"""Every way to send a request accepts the same options, and each option does what it says.

``endpoint_id`` (which server), ``priority`` (the queue's, 0-2), ``fail_fast`` (an OPEN
circuit refuses at once) and ``timeout`` (the call's deadline, seconds): on the sync face
(``run_inference``, ``submit_inference``, ``generate_text``, ``chat_completion``,
``submit``, ``execute``, ``stream``, ``stream_generation``, ``make_request_with_endpoint``),
their async twins, the routed calls (``route_inference``, ``route_submit``: ``endpoint_id``
routes to that endpoint alone; ``fail_fast``, with every endpoint down, raises
``NoHealthyEndpointError`` at once) and the framework's handlers (options among their
parameters). The table of these options is in docs/request-parameters.md.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

from api_support import client_over
from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.call_shapes import SEND_OPTIONS
from ipfs_accelerate_py.api_backends.handlers import HANDLER_OPTIONS, make_endpoint_handler
from ipfs_accelerate_py.api_backends.plugins import get_backend
from ipfs_accelerate_py.api_backends.request_build import build_request
from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.servers.fake_vllm import Fault

P: Dict[str, Any] = {"max_tokens": 3, "temperature": 0}
MESSAGES = [{"role": "user", "content": "hi"}]


def request(stream: bool = False) -> Any:
    return build_request("hello", None, P, stream=stream, adapter=get_backend("vllm"))


def _drain(stream: Any) -> str:
    return "".join(c.text for c in stream)


async def _adrain(stream: Any) -> str:
    return "".join([c.text async for c in stream])


async def _atexts(pieces: Any) -> str:
    return "".join([t async for t in pieces])


#: name -> a call taking (client, **options) and returning the text it got
SYNC: Dict[str, Callable[..., str]] = {
    "run_inference": lambda c, **o: c.run_inference(None, "hello", P, **o).text,
    "submit_inference": lambda c, **o: c.submit_inference(None, "hello", P, **o).result(10).text,
    "generate_text": lambda c, **o: c.generate_text("hello", **P, **o),
    "chat_completion": lambda c, **o: c.chat_completion(MESSAGES, **P, **o).text,
    "submit": lambda c, **o: c.submit(request(), **o).result(10).text,
    "execute": lambda c, **o: c.execute(request(), **o).text,
    "stream": lambda c, **o: _drain(c.stream(request(stream=True), **o)),
    "stream_generation": lambda c, **o: "".join(c.stream_generation("hello", **P, **o)),
    "make_request_with_endpoint": lambda c, endpoint_id=None, **o: c.make_request_with_endpoint(
        endpoint_id, "hello", parameters=P, **o).text,
    "route_inference": lambda c, **o: c.route_inference(None, "hello", P, **o).text,
    "route_submit": lambda c, **o: c.route_submit(request(), **o).result(10).text,
    # the framework's handlers take them as options among their parameters
    "handler": lambda c, **o: make_endpoint_handler(c, None, P).run("hello", o)["text"],
}
#: routed calls: with every endpoint down, ``fail_fast`` says so at once
ROUTED = ("route_inference", "route_submit")
ASYNC: Dict[str, Callable[..., Any]] = {
    "arun_inference": lambda c, **o: c.arun_inference(None, "hello", P, **o),
    "agenerate_text": lambda c, **o: c.agenerate_text("hello", **P, **o),
    "achat_completion": lambda c, **o: c.achat_completion(MESSAGES, **P, **o),
    "asubmit": lambda c, **o: c.asubmit(request(), **o),
    "astream": lambda c, **o: _adrain(c.astream(request(stream=True), **o)),
    "astream_generation": lambda c, **o: _atexts(c.astream_generation("hello", **P, **o)),
}


def call(name: str, client: VllmClient, **options: Any) -> str:
    if name in SYNC:
        return SYNC[name](client, **options)

    async def go() -> str:
        out = await ASYNC[name](client, **options)
        return out if isinstance(out, str) else out.text
    return asyncio.run(go())


ALL = sorted(SYNC) + sorted(ASYNC)
#: the operations of a pooling model take the same options (their behaviour: test_operations)
OPERATIONS = ["embed", "aembed", "pool", "apool", "score", "ascore", "rerank", "arerank",
              "tokenize", "atokenize", "detokenize", "adetokenize", "load_lora_adapter",
              "aload_lora_adapter", "unload_lora_adapter", "aunload_lora_adapter"]


def test_every_way_to_send_names_the_same_options_in_its_signature() -> None:
    assert set(SEND_OPTIONS) <= HANDLER_OPTIONS
    for name in [n for n in ALL if n != "handler"] + OPERATIONS:
        method = getattr(VllmClient, name)
        params = inspect.signature(method).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        missing = [o for o in SEND_OPTIONS if o not in params]
        # the call-shape readers (stream_generation) take them through **kwargs
        assert not missing or (takes_kwargs and name.endswith("stream_generation")), (name, missing)


@pytest.mark.parametrize("name", ALL)
def test_endpoint_id_sends_to_that_server(start_fake, name: str) -> None:
    a, b = start_fake(), start_fake()
    c = client_over({"a": a.base_url, "b": b.base_url}, model="tiny-llama")
    try:
        assert call(name, c, endpoint_id="b")
        path = "/v1/chat/completions" if "chat" in name else "/v1/completions"
        assert b.request_count[path] == 1 and a.request_count[path] == 0
    finally:
        c.close()


@pytest.mark.parametrize("name", ALL)
def test_bad_priority_and_timeout_are_refused_before_sending(counting_listener, name: str) -> None:
    c = VllmClient(base_url=counting_listener.base_url, model="tiny-llama", max_retries=0)
    try:
        with pytest.raises(errors.ValidationError) as info:
            call(name, c, priority=7)
        assert info.value.field in ("priority", "parameters.priority")
        with pytest.raises(errors.ValidationError) as info:
            call(name, c, timeout=0)
        assert info.value.field in ("timeout", "parameters.timeout")
    finally:
        c.close()
    assert counting_listener.connections == 0


@pytest.mark.parametrize("name", ALL)
def test_timeout_ends_a_held_call_with_a_typed_timeout(fake_server, make_client, name: str) -> None:
    c = make_client(fake_server, max_retries=0, timeout=30)
    fake_server.add_fault(Fault("gate", count=-1))
    try:
        with pytest.raises(errors.TimeoutError):
            call(name, c, timeout=0.5)
    finally:
        fake_server.release_stalls()


@pytest.mark.parametrize("name", ALL)
def test_fail_fast_refuses_at_once_on_an_open_circuit(fake_server, make_client, name: str) -> None:
    c = make_client(fake_server, max_retries=0, minimum_calls=2, failure_threshold=2,
                    reset_timeout=60.0, deadline=60.0)
    fake_server.add_fault(Fault("status", status=503, count=-1))
    for _ in range(2):
        with pytest.raises(errors.ApiError):
            c.run_inference(None, "fails", P, fail_fast=True)
    assert c.circuit_state == "OPEN"
    seen = sum(fake_server.request_count.values())
    with pytest.raises(errors.NoHealthyEndpointError if name in ROUTED
                       else errors.CircuitOpenError):
        call(name, c, fail_fast=True)
    assert sum(fake_server.request_count.values()) == seen  # nothing was sent


def test_the_calls_table_in_the_docs_shows_the_real_signatures() -> None:
    """docs/client.md's table of calls: every parameter it shows is the call's own, in the
    call's order, and each way to send there shows the four options."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "client.md").read_text()
    rows = re.findall(r"^\| `(\w+)\(([^`]*)\)`", page[page.index("## Calls"):], re.M)
    assert len(rows) >= 8
    for name, shown in rows:
        real = [p for p in inspect.signature(getattr(VllmClient, name)).parameters if p != "self"]
        names = [a.split("=")[0].strip().lstrip("*") for a in shown.split(",")]
        names = [n for n in names if n and n != "..."]
        assert all(n in real for n in names), (name, set(names) - set(real))
        assert [n for n in real if n in names] == names, name  # in the call's order
        if name in ALL:
            assert all(option in names for option in SEND_OPTIONS), (name, shown)
