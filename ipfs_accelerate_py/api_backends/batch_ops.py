"""Prompt-list batch helpers behind ``process_batch*``: real batching, measured figures."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .base import BaseApiBackend
from .errors import ValidationError
from .handlers import result_to_dict

__all__ = ["run_prompt_batch"]


def run_prompt_batch(client: BaseApiBackend, inputs: Sequence[str], model: Optional[str],
                     parameters: Optional[Dict[str, Any]] = None,
                     chunk_size: Optional[int] = None) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Send ``inputs`` as prompt lists of at most ``chunk_size`` (default: the client's
    ``max_batch_size``), concurrently; return results in input order and what was measured."""
    if isinstance(inputs, str) or not isinstance(inputs, (list, tuple)) or not inputs:
        raise ValidationError("must be a non-empty list of prompt strings", field="inputs")
    if not all(isinstance(p, str) for p in inputs):
        raise ValidationError("every item must be a string", field="inputs")
    size = chunk_size or client.settings.max_batch_size
    params = dict(parameters or {})
    n = params.get("n") or 1
    start = time.perf_counter()
    futures = [client.submit_inference(model, list(inputs[i:i + size]), params)
               for i in range(0, len(inputs), size)]
    results: List[Dict[str, Any]] = []
    prompt_tokens = completion_tokens = 0
    for first, fut in zip(range(0, len(inputs), size), futures):
        result = fut.result()
        prompt_tokens += result.usage.prompt_tokens
        completion_tokens += result.usage.completion_tokens
        for i in range(min(size, len(inputs) - first)):
            part = result.for_prompt(i, n)
            part.batch_usage = result.usage
            results.append(result_to_dict(part))
    wall = time.perf_counter() - start
    metrics = {
        "batch_size": len(inputs),
        "http_requests": len(futures),
        "chunk_size": size,
        "wall_time_seconds": wall,
        "per_item_seconds": wall / len(inputs),
        "items_per_second": len(inputs) / wall if wall > 0 else None,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "completion_tokens_per_second": completion_tokens / wall if wall > 0 else None,
    }
    return results, metrics
