"""LoRA adapters across servers (issue 24 point 5): requests for an adapter go only where it
is loaded; given ``lora_paths`` the client loads it where none has it, and again elsewhere
when that server dies.

Against two doubles with runtime LoRA loading (``enable_lora``), and once against two real
LoRA servers (one of them SIGKILLed by PID mid-run).
"""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from ipfs_accelerate_py.api_backends import VllmClient, errors
from ipfs_accelerate_py.servers.fake_vllm import Fault

ADAPTER = "tiny-lora"
GEN = {"max_tokens": 2, "temperature": 0}


def _client(servers, **settings) -> VllmClient:
    """Endpoints ``a``, ``b``... one per server (the default is the first: routing leaves it
    out), round-robin routing, no retries (a failover is the routing's, not a retry's)."""
    settings = {"timeout": 10, "max_retries": 0, "routing": "round-robin", **settings}
    c = VllmClient(base_url=servers[0].base_url, **settings)
    for name, server in zip("abcd", servers):
        c.add_endpoint(name, base_url=server.base_url)
    return c


@pytest.fixture
def adapter_dir(tmp_path) -> str:
    (tmp_path / "adapter_config.json").write_text("{}")  # all the double looks at
    return str(tmp_path)


def _served(server) -> int:
    return server.request_count["/v1/completions"]


def test_requests_for_an_adapter_land_only_where_it_is_loaded(start_fake, adapter_dir):
    a, b, c3 = (start_fake(enable_lora=True) for _ in range(3))
    with _client([a, b, c3]) as c:
        c.load_lora_adapter(ADAPTER, adapter_dir, endpoint_id="b")  # the book learns it
        for i in range(12):
            assert c.run_inference(ADAPTER, f"p{i}", GEN).text is not None
        # base-model requests still rotate over all three
        for i in range(6):
            c.run_inference("tiny-llama", f"q{i}", GEN)
        assert [_served(s) for s in (a, b, c3)] == [2, 14, 2]
        assert c.lora_adapters()[ADAPTER]["endpoints"] == ["b"]
        c.unload_lora_adapter(ADAPTER, endpoint_id="b")
        assert c.lora_adapters()[ADAPTER]["endpoints"] == []


def test_loading_without_an_endpoint_goes_to_the_default_one_even_when_routing(start_fake,
                                                                              adapter_dir):
    a, b = start_fake(enable_lora=True), start_fake(enable_lora=True)
    with _client([a, b]) as c:  # the default endpoint is a's URL
        for _ in range(3):
            c.load_lora_adapter(ADAPTER, adapter_dir, load_inplace=True)
        assert ADAPTER in a.adapters and ADAPTER not in b.adapters
        assert c.lora_adapters()[ADAPTER]["endpoints"] == ["a"]
        c.run_inference(ADAPTER, "p", GEN)
        assert (_served(a), _served(b)) == (1, 0)


def test_list_models_shows_adapters_with_their_parent_and_teaches_routing(start_fake, adapter_dir):
    a, b = start_fake(enable_lora=True), start_fake(enable_lora=True)
    b.adapters[ADAPTER] = adapter_dir  # loaded by someone else: only /v1/models tells
    with _client([a, b]) as c:
        models = {m["id"]: m for m in c.list_models("b")}
        assert models[ADAPTER]["parent"] == "tiny-llama" and models["tiny-llama"]["parent"] is None
        known = c.refresh_lora_adapters()
        assert known[ADAPTER]["parent"] == "tiny-llama" and known[ADAPTER]["endpoints"] == ["b"]

        async def many():
            return await asyncio.gather(*(c.arun_inference(ADAPTER, f"p{i}", GEN)
                                          for i in range(8)))

        assert len(asyncio.run(many())) == 8
        assert _served(a) == 0 and c.get_routing_stats()["served_by"] == {"b": 8}
        # unloaded behind the client's back: b answers 404 and the book drops it there
        del b.adapters[ADAPTER]
        with pytest.raises(errors.NotFoundError):
            c.run_inference(ADAPTER, "gone", GEN)
        assert c.lora_adapters()[ADAPTER]["endpoints"] == []


def test_lora_paths_loads_once_on_the_chosen_server_for_concurrent_callers(start_fake, adapter_dir):
    a, b = start_fake(enable_lora=True), start_fake(enable_lora=True)
    with _client([a, b], lora_paths={ADAPTER: adapter_dir}) as c:
        with ThreadPoolExecutor(16) as pool:
            texts = list(pool.map(lambda i: c.run_inference(ADAPTER, f"p{i}", GEN).text,
                                  range(32)))
        assert len(texts) == 32
        loads = a.request_count["/v1/load_lora_adapter"] + b.request_count["/v1/load_lora_adapter"]
        assert loads == 1 and c.lora_adapters()[ADAPTER]["loads"] == 1
        where = [s for s in (a, b) if ADAPTER in s.adapters]
        assert len(where) == 1 and _served(where[0]) >= 1 and _served(a) * _served(b) == 0
        assert sum(c.get_routing_stats()["served_by"].values()) == 32


def test_lora_paths_with_one_endpoint_loads_it_there(start_fake, adapter_dir):
    a = start_fake(enable_lora=True)
    with VllmClient(base_url=a.base_url, timeout=10, lora_paths={ADAPTER: adapter_dir}) as c:
        c.run_inference(ADAPTER, "p", GEN)
        assert ADAPTER in a.adapters and _served(a) == 1


def test_the_adapter_moves_when_its_server_dies_and_no_request_is_lost(start_fake, adapter_dir):
    a, b = start_fake(enable_lora=True), start_fake(enable_lora=True)
    # each request its own call, so six are in flight at a when it dies
    with _client([a, b], lora_paths={ADAPTER: adapter_dir}, batch_enabled=False) as c:
        c.load_lora_adapter(ADAPTER, adapter_dir, endpoint_id="a")
        a.add_fault(Fault("gate", path="/v1/completions", count=-1))
        futures = [c.submit_inference(ADAPTER, f"p{i}", GEN) for i in range(6)]
        a.wait_held(6)  # all six at a, held there
        a.stop()  # a dies with them
        assert all(f.result(10).text is not None for f in futures)
        more = [c.run_inference(ADAPTER, f"q{i}", GEN) for i in range(4)]
        assert len(more) == 4
        assert ADAPTER in b.adapters and b.request_count["/v1/load_lora_adapter"] == 1
        assert _served(b) == 10
        assert c.lora_adapters()[ADAPTER]["endpoints"] == ["b"]


def test_streams_for_an_adapter_open_where_it_is_and_load_it_where_none_has_it(start_fake,
                                                                              adapter_dir):
    a, b = start_fake(enable_lora=True), start_fake(enable_lora=True)
    with _client([a, b], lora_paths={ADAPTER: adapter_dir}) as c:
        c.load_lora_adapter(ADAPTER, adapter_dir, endpoint_id="b")
        for i in range(4):  # sync streams: only b
            assert "".join(c.stream_generation(f"p{i}", model=ADAPTER, **GEN))

        async def astreams(n):
            out = []
            for i in range(n):
                out.append("".join([t async for t in c.astream_generation(
                    f"q{i}", model=ADAPTER, **GEN)]))
            return out

        assert all(asyncio.run(astreams(4)))
        assert (_served(a), _served(b)) == (0, 8)
        b.stop()  # b dies: the next stream loads the adapter on a and opens there
        assert "".join(c.stream_generation("after", model=ADAPTER, **GEN))
        assert all(asyncio.run(astreams(2)))
        assert ADAPTER in a.adapters and a.request_count["/v1/load_lora_adapter"] == 1
        assert _served(a) == 3


def test_a_load_that_fails_moves_on_and_is_named(start_fake, tmp_path):
    a, b = start_fake(enable_lora=True), start_fake(enable_lora=True)
    with _client([a, b], lora_paths={ADAPTER: str(tmp_path / "missing")}) as c:
        with pytest.raises(errors.NoHealthyEndpointError) as info:
            c.run_inference(ADAPTER, "p", GEN)
        assert sum("loading adapter" in t for t in info.value.context["attempts"]) == 2
        assert _served(a) + _served(b) == 0


# ------------------------------------------------------------------ real servers
@pytest.mark.real_server
@pytest.mark.slow  # a second LoRA server: about 20 s to start on 2 idle cores
def test_two_real_lora_servers_one_killed(real_lora_server, tiny_lora_path):
    """Two real LoRA servers, the adapter loaded on one: all its requests land there; that
    server SIGKILLed by PID: the adapter is loaded on the other, no request is lost."""
    from ipfs_accelerate_py.servers.vllm_cpu import lora_server

    other = lora_server()
    other.start()
    try:
        servers = [real_lora_server, other]
        # batching off: each request its own call, so some are in flight when b dies
        with _client(servers, lora_paths={ADAPTER: tiny_lora_path}, timeout=30,
                     batch_enabled=False) as c:
            c.refresh_lora_adapters()
            if ADAPTER in c.lora_adapters() and c.lora_adapters()[ADAPTER]["endpoints"]:
                for eid in c.lora_adapters()[ADAPTER]["endpoints"]:
                    c.unload_lora_adapter(ADAPTER, endpoint_id=eid)
            c.load_lora_adapter(ADAPTER, tiny_lora_path, endpoint_id="b")
            with ThreadPoolExecutor(8) as pool:
                first = list(pool.map(lambda i: c.run_inference(ADAPTER, f"p{i}", GEN),
                                      range(16)))
            assert all(r.model == ADAPTER for r in first)
            assert c.get_routing_stats()["served_by"] == {"b": 16}
            # 32 more under way; b SIGKILLed once the first is answered (others in flight)
            futures = [c.submit_inference(ADAPTER, f"q{i}", GEN) for i in range(32)]
            futures[0].result(60)
            os.kill(other.pid, signal.SIGKILL)  # by PID: the process group's leader
            after = [f.result(60) for f in futures]
            after += [c.run_inference(ADAPTER, f"r{i}", GEN) for i in range(8)]
            assert all(r.model == ADAPTER for r in after)
            served = c.get_routing_stats()["served_by"]
            assert sum(served.values()) == 56 and served["a"] >= 8
            known = c.refresh_lora_adapters()[ADAPTER]
            assert known["endpoints"] == ["a"] and known["parent"] == real_lora_server.model
            c.unload_lora_adapter(ADAPTER, endpoint_id="a")  # the shared server as it was
    finally:
        other.stop()
