"""What a real vLLM server says about a model: ``/v1/models``, ``/version``, ``/metrics``.

Behind the README's ``get_model_info`` and ``get_model_statistics``. vLLM has no
``/model`` or ``/statistics`` route; this module asks the routes it does have.

Is a model served? vLLM serves ONE model per process under one or more names
(``--served-model-name a b``). Depending on the version, ``/v1/models`` lists every name
or only the first, so a name missing from the list may still be served. The answer then
comes from ``POST /tokenize`` with that model name: it runs no inference, costs no tokens,
needs no sampling parameters, and answers 404 (``param: "model"``) for a name the server
does not serve, 200 with ``max_model_len`` for one it does. Only a server without
``/tokenize`` (404 ``{"detail": "Not Found"}`` for the route itself) gets the fallback, a
one-token completion. An unknown model raises ``NotFoundError`` naming the served models.

Statistics: vLLM labels its ``vllm:*`` series with ``model_name`` = the FIRST served name,
whatever name a request used, so the figures for an alias are the engine's figures (the
result says which label it read). A server started with ``--disable-log-stats`` has no
``vllm:*`` series: the result then says so (``available: false`` and a message) instead
of raising.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from ..adapter import load_json
from ..errors import NotFoundError, ResponseError
from ..server_metrics import Histogram, Metrics, PrometheusParseError, parse_prometheus_text
from ..transport import HttpRequest

__all__ = ["model_info", "model_statistics", "server_metrics", "cache_config", "NO_STATS_MESSAGE"]

NO_STATS_MESSAGE = ("the server publishes no vllm:* metrics on /metrics (was it started with "
                    "--disable-log-stats?); only its process and HTTP metrics are available")
_MODEL_FIELDS = ("root", "parent", "max_model_len", "owned_by", "created")


def _is_unknown_model(exc: NotFoundError) -> bool:
    """True for vLLM's "model does not exist" 404, False for an unknown route."""
    return exc.param == "model" or "does not exist" in exc.message


def _probe_served(client: Any, model: str, endpoint_id: Optional[str]) -> Dict[str, Any]:
    """Ask the server whether it serves ``model``; returns what it said (e.g. max_model_len)."""
    try:
        resp = client.request_raw(HttpRequest("POST", "/tokenize",
                                              json={"model": model, "prompt": "a"}), endpoint_id)
        data = load_json(resp)
        return {"probe": "/tokenize",
                "max_model_len": data.get("max_model_len") if isinstance(data, dict) else None}
    except NotFoundError as exc:
        if _is_unknown_model(exc):
            raise
    # No /tokenize on this server: one token of a real completion answers the question.
    client.run_inference(model, "a", {"max_tokens": 1}, endpoint_id=endpoint_id)
    return {"probe": "/v1/completions", "max_model_len": None}


def model_info(client: Any, model: Optional[str] = None,
               endpoint_id: Optional[str] = None) -> Dict[str, Any]:
    """``{"id", "root", "max_model_len", "owned_by", "created", "server_version", ...}``.

    ``model`` None means the server's own (first listed) model. Raises ``NotFoundError``
    when the server does not serve ``model``.
    """
    models: List[Dict[str, Any]] = client.list_models(endpoint_id)
    listed = [m["id"] for m in models]
    if model is None:
        if not models:
            raise NotFoundError("the server lists no models", status_code=404, param="model")
        model = listed[0]
    entry = next((m for m in models if m["id"] == model), None)
    alias_of: Optional[str] = None
    probe: Optional[Dict[str, Any]] = None
    if entry is None:
        try:
            probe = _probe_served(client, model, endpoint_id)
        except NotFoundError as exc:
            raise NotFoundError(f"model {model!r} is not served at {client.settings.base_url}; "
                                f"it lists {listed}", status_code=404, param="model",
                                body=exc.body) from exc
        # One engine per vLLM process: every served name is an alias of the listed model.
        entry = models[0] if models else {}
        alias_of = entry.get("id")
    info: Dict[str, Any] = {"id": model, "object": "model"}
    info.update({k: entry.get(k) for k in _MODEL_FIELDS})
    if probe and probe.get("max_model_len") is not None:
        info["max_model_len"] = probe["max_model_len"]
    info.update({
        "server_version": client.version(endpoint_id),
        "endpoint": client._endpoint(endpoint_id).settings.base_url,
        "listed": alias_of is None and probe is None,
        "alias_of": alias_of,
        "served_check": "listed in /v1/models" if probe is None else f"answered by {probe['probe']}",
        "listed_models": listed,
    })
    return info


def server_metrics(client: Any, endpoint_id: Optional[str] = None) -> Metrics:
    """GET ``/metrics`` and parse it (``ResponseError`` if it is not Prometheus text)."""
    resp = client.request_raw(HttpRequest("GET", "/metrics", headers={"Accept": "text/plain"}),
                              endpoint_id)
    text = resp.body.decode("utf-8", "replace")
    try:
        return parse_prometheus_text(text)
    except PrometheusParseError as exc:
        raise ResponseError(f"/metrics is not Prometheus text: {exc}", status_code=resp.status,
                            body=text[:500]) from None


def cache_config(metrics: Metrics) -> Dict[str, str]:
    """The labels of ``vllm:cache_config_info`` (the engine's cache settings), or {}."""
    found = metrics.samples("vllm:cache_config_info")
    return dict(found[0].labels) if found else {}


def _number(value: Optional[float]) -> Any:
    if value is None:
        return None
    return int(value) if float(value).is_integer() else value


def _hist(h: Optional[Histogram]) -> Optional[Dict[str, Any]]:
    return h.summary((0.5, 0.9, 0.99)) if h is not None else None


def _metrics_label(client: Any, model: Optional[str], labels: "set[str]",
                   endpoint_id: Optional[str]) -> Optional[str]:
    """The ``model_name`` label holding ``model``'s figures (None: the server has none)."""
    if model is not None and model in labels:
        return model
    info = model_info(client, model, endpoint_id)  # NotFoundError for a model not served
    for name in (info["id"], info.get("alias_of")):
        if name in labels:
            return name
    if len(labels) == 1:
        return next(iter(labels))
    same_engine = [m["id"] for m in client.list_models(endpoint_id)
                   if m.get("root") == info.get("root") and m["id"] in labels]
    return same_engine[0] if same_engine else None


def model_statistics(client: Any, model: Optional[str] = None,
                     endpoint_id: Optional[str] = None) -> Dict[str, Any]:
    """The server's own figures for ``model`` from ``/metrics`` (see the module docstring)."""
    metrics = server_metrics(client, endpoint_id)
    labels = metrics.label_values("model_name", prefix="vllm:")
    label = _metrics_label(client, model, labels, endpoint_id)
    out: Dict[str, Any] = {
        "model": model if model is not None else label,
        "endpoint": client._endpoint(endpoint_id).settings.base_url,
        "source": "/metrics",
        "scraped_at": time.time(),
        "metrics_model_name": label,
        "available": label is not None,
        "message": None,
    }
    if label is None:
        out["message"] = (NO_STATS_MESSAGE if not any(n.startswith("vllm:") for n in metrics.sample_names())
                          else f"the server publishes vllm:* metrics, but none for model {model!r}")
        return out
    if label != out["model"]:
        out["message"] = (f"vLLM labels its metrics with its first served name {label!r}; these "
                          f"figures cover every name the engine serves, {out['model']!r} included")
    sel = {"model_name": label}
    by_reason = {k: _number(v) for k, v in
                 metrics.by_label("vllm:request_success_total", "finished_reason", sel).items()}
    kv = metrics.value("vllm:kv_cache_usage_perc", sel)
    if kv is None:  # vLLM before 0.10 called it gpu_cache_usage_perc
        kv = metrics.value("vllm:gpu_cache_usage_perc", sel)
    itl = metrics.histogram("vllm:inter_token_latency_seconds", sel) or metrics.histogram(
        "vllm:time_per_output_token_seconds", sel)
    queries = metrics.value("vllm:prefix_cache_queries_total", sel)
    hits = metrics.value("vllm:prefix_cache_hits_total", sel)
    out.update({
        "requests_running": _number(metrics.value("vllm:num_requests_running", sel)),
        "requests_waiting": _number(metrics.value("vllm:num_requests_waiting", sel)),
        "kv_cache_usage": kv,
        "prompt_tokens_total": _number(metrics.value("vllm:prompt_tokens_total", sel)),
        "generation_tokens_total": _number(metrics.value("vllm:generation_tokens_total", sel)),
        "request_success_by_reason": by_reason,
        "requests_finished_total": sum(by_reason.values()) if by_reason else None,
        "preemptions_total": _number(metrics.value("vllm:num_preemptions_total", sel)),
        "prefix_cache_hit_rate": (hits / queries) if queries and hits is not None else None,
        "time_to_first_token_seconds": _hist(metrics.histogram("vllm:time_to_first_token_seconds", sel)),
        "e2e_request_latency_seconds": _hist(metrics.histogram("vllm:e2e_request_latency_seconds", sel)),
        "inter_token_latency_seconds": _hist(itl),
    })
    return out
