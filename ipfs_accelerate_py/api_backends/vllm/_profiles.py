"""Optimisation profiles for a vLLM deployment: what the client can change, what the server must.

Quantisation, KV-cache dtype, prefix caching and scheduler limits are vLLM *launch flags*:
no HTTP request changes them. So ``optimize_model`` is honest about the two halves:

* the CLIENT profile is applied at once to the shared client of that endpoint: concurrency,
  batching, timeouts, retries, and a ``max_tokens`` cap for the model (``limits.py``);
* the SERVER flags the profile recommends are returned with the reason for each, split into
  those that need a restart and those the running server already has (read from
  ``vllm:cache_config_info`` on ``/metrics`` where vLLM publishes them).

``speed``: low latency and high throughput. ``memory``: the smallest KV-cache and weight
footprint. ``balanced``: close to the defaults, with the cheap wins of both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import ValidationError
from ..limits import max_tokens_cap, set_max_tokens_cap

__all__ = ["ServerFlag", "Profile", "PROFILES", "get_profile", "apply_profile"]


@dataclass(frozen=True)
class ServerFlag:
    """A vLLM launch flag, why the profile wants it, and how to see it is already in effect."""

    flag: str
    why: str
    requires: Optional[str] = None
    #: (label of ``vllm:cache_config_info``, the values that mean "already set")
    in_effect_when: Optional[Tuple[str, Tuple[str, ...]]] = None

    def as_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"flag": self.flag, "why": self.why}
        if self.requires:
            out["requires"] = self.requires
        return out


@dataclass(frozen=True)
class Profile:
    """A client profile (settings + output cap) and the server flags it recommends."""

    name: str
    goal: str
    client_settings: Mapping[str, Any]
    max_tokens_cap: int
    server_flags: Tuple[ServerFlag, ...]
    notes: Tuple[str, ...] = field(default=())


_PREFIX_CACHING = ServerFlag(
    "--enable-prefix-caching",
    "reuses the KV cache of prompt prefixes shared between requests (system prompts, few-shot "
    "examples), so their prefill is not recomputed: lower time to first token",
    in_effect_when=("enable_prefix_caching", ("True",)))
_CHUNKED_PREFILL = ServerFlag(
    "--enable-chunked-prefill",
    "splits long prompts into chunks scheduled together with decode steps, so one long prompt "
    "does not stall every running stream")

PROFILES: Dict[str, Profile] = {
    "speed": Profile(
        name="speed",
        goal="lowest latency and highest throughput",
        client_settings={
            # Many requests in flight let vLLM's continuous batching fill every engine step.
            "max_concurrent_requests": 32,
            # Coalesce bursts into prompt lists, but never hold a request back for long.
            "batch_enabled": True, "max_batch_size": 16, "batch_timeout": 0.01,
            # Fail fast: a stuck call is retried (or routed elsewhere) sooner.
            "timeout": 30.0, "connect_timeout": 3.0, "max_retries": 2,
        },
        max_tokens_cap=256,  # bounded outputs bound each request's latency
        server_flags=(
            _PREFIX_CACHING,
            _CHUNKED_PREFILL,
            ServerFlag("--max-num-seqs 256", "more sequences per engine step: higher throughput "
                       "when many requests are in flight"),
            ServerFlag("--max-num-batched-tokens 8192", "a larger token budget per step: faster "
                       "prefill of long prompts under load"),
        ),
        notes=("start the server without --enforce-eager: CUDA graphs make decoding faster",),
    ),
    "memory": Profile(
        name="memory",
        goal="smallest GPU memory footprint",
        client_settings={
            # Fewer sequences in flight need fewer KV-cache blocks on the server.
            "max_concurrent_requests": 4,
            "batch_enabled": True, "max_batch_size": 4, "batch_timeout": 0.05,
            # A memory-bound server queues and preempts: give each call time to finish.
            "timeout": 120.0, "connect_timeout": 10.0, "max_retries": 3,
        },
        max_tokens_cap=128,  # short outputs hold few KV blocks per sequence
        server_flags=(
            ServerFlag("--kv-cache-dtype fp8", "stores the KV cache in 8 bits: about half the "
                       "KV memory, for a small loss of accuracy",
                       in_effect_when=("cache_dtype", ("fp8", "fp8_e4m3", "fp8_e5m2"))),
            ServerFlag("--quantization awq", "4-bit weights: about a quarter of the fp16 weight "
                       "memory", requires="an AWQ checkpoint as --model (for example "
                       "TheBloke/Llama-2-7B-Chat-AWQ); it cannot quantise fp16 weights itself"),
            ServerFlag("--max-num-seqs 32", "fewer concurrent sequences: the engine needs a "
                       "smaller KV cache and preempts less"),
            ServerFlag("--gpu-memory-utilization 0.8", "leaves 20% of GPU memory to other "
                       "processes instead of vLLM's default 90%",
                       in_effect_when=("gpu_memory_utilization", ("0.8",))),
        ),
    ),
    "balanced": Profile(
        name="balanced",
        goal="good throughput at moderate memory",
        client_settings={
            "max_concurrent_requests": 16,
            "batch_enabled": True, "max_batch_size": 8, "batch_timeout": 0.02,
            "timeout": 60.0, "connect_timeout": 10.0, "max_retries": 3,
        },
        max_tokens_cap=512,
        server_flags=(
            _PREFIX_CACHING,
            _CHUNKED_PREFILL,
            ServerFlag("--max-num-seqs 128", "enough concurrent sequences for steady load "
                       "without the KV cache of 256"),
            ServerFlag("--gpu-memory-utilization 0.9", "vLLM's default share of GPU memory: room "
                       "for the KV cache, a margin for the rest",
                       in_effect_when=("gpu_memory_utilization", ("0.9",))),
        ),
    ),
}


def get_profile(name: Any) -> Profile:
    """The profile called ``name``; a ValidationError naming ``optimization_type`` otherwise."""
    if not isinstance(name, str) or name not in PROFILES:
        raise ValidationError(f"must be one of {sorted(PROFILES)}, got {name!r}",
                              field="optimization_type")
    return PROFILES[name]


def _resize_endpoint(client: Any, endpoint: Any, n: int, old_n: int) -> None:
    """Match the endpoint's workers and connection pool to ``n`` concurrent requests."""
    if n > max(old_n, 10):
        # A caller's transport's pool was sized for the old limit: past it, every extra
        # connection would be opened and thrown away per request. The client makes it again
        # for ``n`` (aiohttp's pool has no cap: nothing to do).
        client._renew_transport(endpoint)
    endpoint.workers.resize(n)  # surplus idle workers retire; busy ones finish their call first


def apply_profile(client: Any, model: Optional[str], profile: Profile,
                  max_model_len: Optional[int] = None,
                  server_cache_config: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Apply ``profile`` to every endpoint of ``client`` and cap ``model``; say what happened."""
    before = {k: getattr(client.settings, k) for k in profile.client_settings}
    old_cap = max_tokens_cap(client, model)
    before_by_endpoint = {eid: client._endpoint(eid).settings.max_concurrent_requests
                          for eid in client.endpoint_ids}
    client._set_on_all_endpoints(**profile.client_settings)
    notes: List[str] = list(profile.notes)
    n = profile.client_settings["max_concurrent_requests"]
    for eid in client.endpoint_ids:
        _resize_endpoint(client, client._endpoint(eid), n, before_by_endpoint[eid])
    cap = profile.max_tokens_cap
    if max_model_len:
        cap = min(cap, int(max_model_len))
    set_max_tokens_cap(client, model, cap)
    restart: List[Dict[str, Any]] = []
    in_effect: List[Dict[str, Any]] = []
    for flag in profile.server_flags:
        check = flag.in_effect_when
        if check and server_cache_config and server_cache_config.get(check[0]) in check[1]:
            in_effect.append({**flag.as_dict(), "evidence":
                              f"vllm:cache_config_info {check[0]}={server_cache_config[check[0]]}"})
        else:
            restart.append(flag.as_dict())
    if server_cache_config is None:
        notes.append("the server's cache settings could not be read from /metrics; every "
                     "recommended flag is listed as needing a restart")
    return {
        "profile": profile.name,
        "optimization_type": profile.name,
        "goal": profile.goal,
        "model": model,
        "endpoint": client.settings.base_url,
        "applied": {"client_settings": dict(profile.client_settings), "max_tokens_cap": cap,
                    "endpoints": list(client.endpoint_ids)},
        "previous": {"client_settings": before, "max_tokens_cap": old_cap},
        "requires_server_restart": restart,
        "already_in_effect": in_effect,
        "server_launch_flags": " ".join(f["flag"] for f in restart),
        "notes": notes,
    }
