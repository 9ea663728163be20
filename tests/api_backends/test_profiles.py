"""Optimisation profiles: what ``optimize_model`` applies to the client, caps, and advises.

Unit tests use a client pointed at a port where nothing listens: applying a profile sends
nothing. The real-server tests show the cap at work: with the ``memory`` profile a request
asking for 1000 tokens (a 400 from this server, whose context is 512) gets exactly 128.
"""

from __future__ import annotations

import importlib

import pytest

from api_support import README_MODEL
from support import transport_factory
from ipfs_accelerate_py.api_backends._transports.aio import AioTransport
from ipfs_accelerate_py.api_backends.vllm import VllmClient
from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.limits import (apply_max_tokens_cap, max_tokens_cap,
                                                    set_max_tokens_cap)
from ipfs_accelerate_py.api_backends.vllm._profiles import PROFILES, apply_profile, get_profile

# ``import ...api_backends.vllm as m`` would give the CLASS: the package re-exports the class
# under the submodule's name. The module itself comes from importlib.
vllm_module = importlib.import_module("ipfs_accelerate_py.api_backends.vllm")



# ---------------------------------------------------------------------------- profiles
def test_three_profiles_cover_the_client_knobs_and_name_server_flags():
    assert sorted(PROFILES) == ["balanced", "memory", "speed"]
    for p in PROFILES.values():
        assert {"max_concurrent_requests", "batch_enabled", "max_batch_size", "batch_timeout",
                "timeout", "connect_timeout"} <= set(p.client_settings)
        assert p.max_tokens_cap > 0 and all(f.why for f in p.server_flags)
    flags = {name: [f.flag for f in p.server_flags] for name, p in PROFILES.items()}
    assert {"--enable-prefix-caching", "--max-num-seqs 256",
            "--enable-chunked-prefill"} <= set(flags["speed"])
    assert {"--kv-cache-dtype fp8", "--quantization awq", "--max-num-seqs 32",
            "--gpu-memory-utilization 0.8"} <= set(flags["memory"])
    awq = next(f for f in PROFILES["memory"].server_flags if f.flag == "--quantization awq")
    assert "AWQ checkpoint" in awq.requires
    speed, memory = PROFILES["speed"].client_settings, PROFILES["memory"].client_settings
    assert speed["max_concurrent_requests"] > PROFILES["balanced"].client_settings[
        "max_concurrent_requests"] > memory["max_concurrent_requests"]


@pytest.mark.parametrize("bad", ["fast", "", None, 1, "SPEED"])
def test_unknown_optimization_type_names_the_field(bad):
    with pytest.raises(errors.ValidationError) as info:
        get_profile(bad)
    assert info.value.field == "optimization_type"


def test_unknown_type_fails_before_any_request(counting_listener):
    with pytest.raises(errors.ValidationError, match="optimization_type"):
        vllm_module.optimize_model(counting_listener.base_url, README_MODEL, optimization_type="turbo")
    assert counting_listener.connections == 0


def test_apply_profile_changes_every_endpoint_and_caps_the_model(offline_client):
    c = offline_client
    c.create_endpoint(endpoint_id="second", max_concurrent_requests=3)
    out = apply_profile(c, "m", get_profile("memory"), max_model_len=512,
                        server_cache_config={"cache_dtype": "fp8_e4m3", "gpu_memory_utilization": "0.92"})
    for eid in ("default", "second"):
        s = c._endpoint(eid).settings
        got = (s.max_concurrent_requests, s.max_batch_size, s.batch_timeout, s.timeout)
        assert got == (4, 4, 0.05, 120.0)
    assert c.settings.max_concurrent_requests == 4 and c.batch_timeout == 0.05
    assert max_tokens_cap(c, "m") == 128 == out["applied"]["max_tokens_cap"]
    assert out["profile"] == "memory" and out["applied"]["endpoints"] == ["default", "second"]
    assert out["previous"]["client_settings"]["max_concurrent_requests"] == 10
    restart = [f["flag"] for f in out["requires_server_restart"]]
    # fp8 KV cache is already on (the server's cache_config_info says so); 0.92 is not 0.8
    assert "--kv-cache-dtype fp8" not in restart and "--gpu-memory-utilization 0.8" in restart
    assert out["already_in_effect"][0]["flag"] == "--kv-cache-dtype fp8"
    assert out["server_launch_flags"] == " ".join(restart)


def test_cap_never_exceeds_the_context_and_unknown_config_is_said(offline_client):
    out = apply_profile(offline_client, "m", get_profile("balanced"), max_model_len=300)
    assert out["applied"]["max_tokens_cap"] == 300
    assert len(out["requires_server_restart"]) == len(PROFILES["balanced"].server_flags)
    assert any("could not be read" in n for n in out["notes"])


def test_raising_concurrency_resizes_workers_and_connection_pool(offline_client, free_port):
    # A caller's transport (its pool sized from the concurrency) is made again for 32.
    with VllmClient(base_url=f"http://127.0.0.1:{free_port}",
                    transport_factory=transport_factory("requests")) as c:
        before = c._endpoint("default").transport
        apply_profile(c, "m", get_profile("speed"))
        ep = c._endpoint("default")
        assert ep.transport is not before  # a session pooled for 32 connections, not 10
        assert ep.transport.transport._session.adapters["http://"]._pool_maxsize == 32
        assert ep.workers._n == 32
    # aiohttp's pool has no cap (its connector's limit is 0): the transport stays.
    c = offline_client
    before = c._endpoint("default").transport
    apply_profile(c, "m", get_profile("speed"))
    ep = c._endpoint("default")
    assert ep.transport is before and isinstance(ep.transport, AioTransport)
    assert ep.workers._n == 32


# ---------------------------------------------------------------------------- caps
def test_cap_rules(offline_client):
    c = offline_client
    assert apply_max_tokens_cap(c, "m", {"max_tokens": 999}) == {"max_tokens": 999}  # no cap yet
    set_max_tokens_cap(c, "m", 64)
    assert apply_max_tokens_cap(c, "m", {"max_tokens": 999}) == {"max_tokens": 64}
    assert apply_max_tokens_cap(c, "m", {"max_tokens": 10}) == {"max_tokens": 10}
    assert apply_max_tokens_cap(c, "m", {}) == {}  # completions default to 16 < 64
    assert apply_max_tokens_cap(c, "m", {}, chat=True) == {"max_tokens": 64}
    assert apply_max_tokens_cap(c, "m", {"max_completion_tokens": 100}, chat=True) == {
        "max_completion_tokens": 64}
    assert apply_max_tokens_cap(c, "other", {"max_tokens": 999}) == {"max_tokens": 999}
    set_max_tokens_cap(c, "m", 8)
    assert apply_max_tokens_cap(c, "m", {}) == {"max_tokens": 8}  # below the default of 16
    set_max_tokens_cap(c, "m", None)
    assert max_tokens_cap(c, "m") is None
    with pytest.raises(errors.ValidationError, match="max_tokens_cap"):
        set_max_tokens_cap(c, "m", 0)


# ---------------------------------------------------------------------------- real server
@pytest.mark.real_server
def test_optimize_model_on_a_real_server(real_vllm_server, shared_real_client):
    url = real_vllm_server.base_url
    out = vllm_module.optimize_model(url, README_MODEL, optimization_type="memory")
    assert out["applied"]["client_settings"]["max_concurrent_requests"] == 4
    assert shared_real_client.settings.max_concurrent_requests == 4  # the SHARED client changed
    assert vllm_module.vllm.optimize_model(url, README_MODEL, "memory")["model"] == README_MODEL
    # what the running server reports through vllm:cache_config_info is used, not guessed
    speed = vllm_module.optimize_model(url, README_MODEL, optimization_type="speed")
    in_effect = {f["flag"]: f["evidence"] for f in speed["already_in_effect"]}
    assert in_effect == {"--enable-prefix-caching": "vllm:cache_config_info enable_prefix_caching=True"}
    assert "--enable-prefix-caching" not in speed["server_launch_flags"]
    assert speed["previous"]["client_settings"]["max_concurrent_requests"] == 4
    with pytest.raises(errors.NotFoundError):
        vllm_module.optimize_model(url, "no-such-model", optimization_type="speed")


@pytest.mark.real_server
def test_memory_cap_is_enforced_on_real_requests(real_vllm_server, shared_real_client):
    url = real_vllm_server.base_url
    handler = vllm_module.create_vllm_endpoint_handler(url, README_MODEL)
    too_many = {"max_tokens": 1000, "temperature": 0}
    # Without a cap, 1000 > max_model_len 512: refused before sending once the client has
    # read the model's length from /v1/models (it lists every served name).
    shared_real_client.list_models()
    with pytest.raises(errors.ValidationError, match="max_tokens=1000.*max_model_len=512"):
        vllm_module.format_request_with_params(handler, "Hello", too_many)
    vllm_module.optimize_model(url, README_MODEL, optimization_type="memory")
    r = vllm_module.format_request_with_params(handler, "Hello", too_many)
    assert r["usage"]["completion_tokens"] == 128
    chat = vllm_module.vllm(metadata={"vllm_api_url": url}).chat_completion(
        [{"role": "user", "content": "hi"}], model=README_MODEL, temperature=0)
    assert chat["usage"]["completion_tokens"] == 128  # chat without max_tokens gets the cap
    batch = vllm_module.process_batch_with_params(url, ["a", "b"], README_MODEL, too_many)
    assert [x["usage"]["completion_tokens"] for x in batch] == [128, 128]
    # Another served name is another model: not capped.
    other = vllm_module.create_vllm_endpoint_handler(url, "tiny-llama")
    assert vllm_module.format_request_with_params(other, "Hello", {"max_tokens": 200})[
        "usage"]["completion_tokens"] == 200
    vllm_module.optimize_model(url, README_MODEL, optimization_type="speed")
    assert vllm_module.format_request_with_params(handler, "Hello", too_many)[
        "usage"]["completion_tokens"] == 256
