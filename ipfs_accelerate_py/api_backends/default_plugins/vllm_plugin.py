"""The built-in vLLM plugin: registers the vLLM adapters (``api_backends/vllm/_adapter.py``)
through the same hook, and the same entry-point group, as any third-party backend."""

from __future__ import annotations

from typing import Callable

from ..adapter import BackendAdapter
from ..hookspecs import hookimpl
from ..vllm._adapter import VllmAdapter, VllmLegacyAdapter

__all__ = ["VllmAdapter", "VllmLegacyAdapter", "iap_register_backends"]


@hookimpl
def iap_register_backends(register: Callable[[BackendAdapter], None]) -> None:
    register(VllmAdapter())
    register(VllmLegacyAdapter())
