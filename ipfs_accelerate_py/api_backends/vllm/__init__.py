"""vLLM for ipfs_accelerate_py: ``VllmClient`` and the framework-facing ``vllm`` backend.

Everything that knows vLLM lives in this package: the adapters the plugin registers
(``_adapter``: wire format, errors, health request, load header), vLLM's request fields
beyond the OpenAI surface (``_models``), the client
(``_client``), the framework face (``_framework``), server info from ``/metrics`` and
``/v1/models`` (``_info``) and the optimisation profiles, which are vLLM launch flags
(``_profiles``). The generic package knows none of it.

``VllmClient`` is ``BaseApiBackend`` bound to the vLLM plugin: typed results, typed errors,
queue, breaker, retry, batching, metrics and endpoints. ``vllm(resources, metadata)`` is
what the framework builds; its methods return plain dicts and share ONE client per
endpoint (URL + key) for the whole process, closed at exit, so module-level calls never
leak threads.

The README's calls work three ways, all on the same shared clients::

    from ipfs_accelerate_py.api_backends import vllm          # the class
    vllm.process_batch(url, prompts, model)                    # class-level call
    vllm(metadata={...}).process_batch(url, prompts, model)    # on an instance
    from ipfs_accelerate_py.api_backends.vllm import process_batch
    process_batch(url, prompts, model)                         # module-level function

Note: ``import ipfs_accelerate_py.api_backends.vllm as m`` binds the CLASS (Python looks
the name up on the package, which re-exports the class); every module-level call works on
it too. ``importlib.import_module("ipfs_accelerate_py.api_backends.vllm")`` gives the module.
"""

from __future__ import annotations

from ._adapter import VllmAdapter, VllmLegacyAdapter
from ._models import VllmChatBatchRequest, VllmChatRequest, VllmCompletionRequest
from ._client import VLLM_LOAD_METRIC, VllmClient, vllm_load_probe
from ._framework import (close_shared_clients, create_vllm_endpoint_handler, detokenize, embed,
                         rerank, score, tokenize,
                         create_vllm_endpoint_handler_with_params, format_request_with_params,
                         format_structured_request, get_model_info, get_model_statistics,
                         optimize_model, process_batch, process_batch_with_metrics,
                         process_batch_with_params, shared_client, vllm)

__all__ = ["VllmClient", "vllm", "shared_client", "close_shared_clients", "VLLM_LOAD_METRIC",
           "vllm_load_probe", "VllmAdapter", "VllmLegacyAdapter", "VllmCompletionRequest",
           "VllmChatRequest", "VllmChatBatchRequest",
           "create_vllm_endpoint_handler", "create_vllm_endpoint_handler_with_params",
           "process_batch", "process_batch_with_params", "process_batch_with_metrics",
           "format_request_with_params", "format_structured_request", "get_model_info",
           "get_model_statistics", "optimize_model", "embed", "score", "rerank", "tokenize",
           "detokenize"]
