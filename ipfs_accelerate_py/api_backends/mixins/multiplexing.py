"""Endpoint multiplexing: many servers (or keys, or limits) behind one client.

Each endpoint has its own session, API key, limits, queue, workers, breaker and stats;
nothing is swapped on a shared object, so concurrent calls to different endpoints never
see each other's key.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from ._host import HostBase

__all__ = ["MultiplexingMixin"]


class MultiplexingMixin(HostBase):
    """README surface: ``create_endpoint``, ``make_request_with_endpoint``, ``get_stats``."""

    def create_endpoint(self, api_key: Optional[str] = None, base_url: Optional[str] = None,
                        max_concurrent_requests: Optional[int] = None,
                        max_retries: Optional[int] = None, queue_size: Optional[int] = None,
                        endpoint_id: Optional[str] = None, **settings: Any) -> str:
        """Add an endpoint (defaults: this client's settings); returns its id."""
        return self.add_endpoint(endpoint_id, api_key=api_key, base_url=base_url,
                                 max_concurrent_requests=max_concurrent_requests,
                                 max_retries=max_retries, queue_size=queue_size, **settings)

    def make_request_with_endpoint(self, endpoint_id: Optional[str], data: Any,
                                   model: Optional[str] = None,
                                   parameters: Optional[Dict[str, Any]] = None,
                                   priority: int = 1, *, fail_fast: Optional[bool] = None,
                                   timeout: Optional[float] = None) -> Any:
        """``run_inference`` through one endpoint's own queue, breaker and key (None: the
        default endpoint), with ``run_inference``'s ``fail_fast`` and ``timeout``.

        ``data`` is a prompt, a list of prompts, chat messages, or a request body dict
        (``{"prompt" | "messages": ..., "max_tokens": ..., ...}``) whose sampling fields join
        ``parameters``.
        """
        if isinstance(data, dict):
            body = dict(data)
            inputs = body.pop("messages", None)
            if inputs is None:
                inputs = body.pop("prompt", None)
            model = body.pop("model", None) or model
            data, parameters = inputs, {**body, **(parameters or {})}
        return self.run_inference(model, data, parameters, priority, endpoint_id=endpoint_id,
                                  fail_fast=fail_fast, timeout=timeout)

    def get_stats(self, endpoint_id: Optional[str] = None) -> Dict[str, Any]:
        """One endpoint's figures, or ``{"endpoints": {...}, "total": {...}}`` for all."""
        if endpoint_id is not None:
            return self._endpoint_stats(endpoint_id)
        per = {eid: self._endpoint_stats(eid) for eid in self._endpoints}
        keys = ("requests", "successes", "failures", "retries", "input_tokens", "output_tokens",
                "queue_length", "in_flight")
        total = {k: sum(s[k] for s in per.values()) for k in keys}
        return {"endpoints": per, "total": total}

    def _endpoint_stats(self, endpoint_id: str) -> Dict[str, Any]:
        ep = self._endpoint(endpoint_id)
        counts = self._metrics.endpoint_counts(ep.id)
        usage = counts["gen_ai.client.token.usage"]
        return {"endpoint_id": ep.id, "base_url": ep.settings.base_url,
                "requests": counts["requests"], "successes": counts["successes"],
                "failures": counts["failures"], "failures_by_type": counts["failures_by_type"],
                "retries": counts["retries"], "input_tokens": usage["input"],
                "output_tokens": usage["output"], "queue_length": len(ep.queue),
                "in_flight": ep.in_flight, "circuit_state": ep.breaker.state,
                "latency_seconds": counts["gen_ai.client.operation.duration"],
                "max_concurrent_requests": ep.settings.max_concurrent_requests}
