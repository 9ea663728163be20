"""The framework-facing ``vllm(resources, metadata)`` backend and its module-level calls:
plain dicts out, typed errors, ONE shared ``VllmClient`` per endpoint (URL + key) for the
whole process, closed at exit, so module-level calls never leak threads."""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..batch_ops import run_prompt_batch
from ..call_shapes import stream_call
from ..errors import ApiError, ValidationError
from ..handlers import make_endpoint_handler, result_to_dict
from ..request_format import run_structured, run_with_params
from ..settings import ClientSettings, normalize_base_url
from ._client import VllmClient
from ._info import cache_config, model_info, model_statistics, server_metrics
from ._profiles import apply_profile, get_profile

__all__ = ["vllm", "shared_client", "close_shared_clients", "embed", "score", "rerank",
           "tokenize", "detokenize"]


# --------------------------------------------------------------------------- shared clients
_shared: Dict[Tuple[str, Optional[str], str], VllmClient] = {}
_shared_lock = threading.Lock()


def shared_client(base_url: Optional[str] = None, api_key: Optional[str] = None,
                  **settings: Any) -> VllmClient:
    """The process-wide client for (URL, key, settings): built once, closed at exit."""
    probe = ClientSettings.from_env("VLLM_", {"base_url": base_url, "api_key": api_key})
    url = probe.base_url
    key = probe.api_key_value
    ident = (url, key, repr(sorted(settings.items())))
    with _shared_lock:
        client = _shared.get(ident)
        if client is None or client.closed:
            client = _shared[ident] = VllmClient(api_key=key, base_url=url, **settings)
        return client


def close_shared_clients() -> None:
    """Close every shared client (tests and long-lived programs can call it)."""
    with _shared_lock:
        clients = list(_shared.values())
        _shared.clear()
    for c in clients:
        c.close()


class _either:
    """A method usable on the class (bound to a default instance) or on an instance."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def __get__(self, obj: Any, owner: Any) -> Callable[..., Any]:
        target = obj if obj is not None else owner._default_instance()
        return self.fn.__get__(target, owner)


def _metadata_value(metadata: Dict[str, Any], *names: str) -> Any:
    for n in names:
        if metadata.get(n) not in (None, ""):
            return metadata[n]
    return None


class vllm:  # noqa: N801 - the framework's name for this backend
    """The framework-facing vLLM backend: ``vllm(resources=None, metadata=None)``.

    ``metadata`` keys: ``vllm_api_url`` / ``api_base`` / ``base_url``, ``vllm_api_key`` /
    ``api_key``, ``vllm_model`` / ``model``; ``VLLM_*`` environment variables fill the rest.
    Methods return plain dicts (``{"text": ...}``; ``generate_text`` the text itself, and
    ``stream_generation`` its pieces) and raise typed errors, except the one-argument
    handlers, which return ``{"error": ...}`` as the framework expects.
    """

    _default: Optional["vllm"] = None
    _default_lock = threading.Lock()

    def __init__(self, resources: Optional[Dict[str, Any]] = None,
                 metadata: Optional[Dict[str, Any]] = None) -> None:
        if resources is not None and not isinstance(resources, dict):
            raise ValidationError("must be a dict or None", field="resources")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValidationError("must be a dict or None", field="metadata")
        self.resources = resources or {}
        self.metadata = metadata or {}
        self.api_url = _metadata_value(self.metadata, "vllm_api_url", "api_base", "base_url")
        self._api_key = _metadata_value(self.metadata, "vllm_api_key", "api_key")
        self.model = _metadata_value(self.metadata, "vllm_model", "model")
        # Validate now: a bad URL or key fails at construction, not on first use.
        self.client = shared_client(self.api_url, self._api_key)
        if self.model is None:
            self.model = self.client.settings.model

    def __repr__(self) -> str:
        return f"<vllm {self.client.settings.base_url} model={self.model!r}>"

    @classmethod
    def _default_instance(cls) -> "vllm":
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default

    def _client_for(self, endpoint_url: Optional[str]) -> VllmClient:
        if endpoint_url is None:
            return self.client
        url = normalize_base_url(endpoint_url, field="endpoint_url")
        if url == self.client.settings.base_url:
            return self.client
        return shared_client(url, self._api_key)

    def _model(self, model: Optional[str]) -> Optional[str]:
        return model or self.model

    # ------------------------------------------------------------------ inference
    def run_inference(self, model_id: Optional[str] = None, inputs: Any = None,
                      parameters: Optional[Dict[str, Any]] = None, priority: int = 1, *,
                      model: Optional[str] = None, prompt: Any = None,
                      **sampling: Any) -> Any:
        """The inference manager's call: any of model_id/model and inputs/prompt, plus flat
        sampling parameters. Never forwards ``model_id``/``inputs`` as server fields."""
        data = inputs if inputs is not None else prompt
        target = self._model(model_id or model)
        params = {**(parameters or {}), **sampling}
        result = self.client.run_inference(target, data, params, priority)
        if isinstance(data, (list, tuple)) and data and all(isinstance(p, str) for p in data):
            n = params.get("n") or 1
            return [result_to_dict(result.for_prompt(i, n)) for i in range(len(data))]
        return result_to_dict(result)

    def generate_text(self, prompt: str, model: Optional[str] = None,
                      max_tokens: Optional[int] = None, temperature: Optional[float] = None,
                      top_p: Optional[float] = None, **kw: Any) -> str:
        """One prompt -> the generated text (a ``str``, as ``VllmClient.generate_text`` and
        every provider of the framework return); ``run_inference`` gives the full dict."""
        params = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, **kw)
        params = {k: v for k, v in params.items() if v is not None}
        return self.client.generate_text(prompt, self._model(model), **params)

    def generate(self, prompt: Any = None, model: Optional[str] = None, **kw: Any) -> Any:
        """Alias the framework also probes: ``generate(prompt=..., model=..., **sampling)``."""
        return self.run_inference(model_id=model, inputs=prompt, **kw)

    def chat_completion(self, messages: Sequence[Dict[str, Any]], model: Optional[str] = None,
                        **kw: Any) -> Dict[str, Any]:
        """Chat messages -> ``{"text", ...}`` with the assistant's reply."""
        params = {k: v for k, v in kw.items() if v is not None}
        return result_to_dict(self.client.chat_completion(messages, self._model(model), **params))

    def stream_generation(self, *args: Any, **kwargs: Any) -> Iterator[str]:
        """An iterator of text pieces; closing it early aborts the request on the server.
        Takes every call shape ``run_inference`` takes (``VllmClient.stream_generation``)."""
        model, prompt, parameters = stream_call(args, kwargs)
        return self.client.stream_generation(self._model(model), prompt, parameters=parameters)

    def list_models(self, endpoint_url: Optional[str] = None) -> List[Dict[str, Any]]:
        """The server's models as dicts (``id``, ``root``, ``max_model_len``, ...)."""
        return self._client_for(endpoint_url).list_models()

    def make_post_request_vllm(self, endpoint_url: str, data: Dict[str, Any],
                               api_key: Optional[str] = None,
                               request_id: Optional[str] = None) -> Dict[str, Any]:
        """POST ``data`` (an OpenAI-style body: ``prompt`` or ``messages``) and return the
        result as a dict; typed errors on failure. ``api_key`` overrides the backend's."""
        if not isinstance(data, dict):
            raise ValidationError("must be a dict request body", field="data")
        client = shared_client(endpoint_url, api_key or self._api_key)
        body = dict(data)
        inputs = body.pop("messages", None) or body.pop("prompt", None)
        model = body.pop("model", None) or self.model
        result = client.run_inference(model, inputs, body)
        out = result_to_dict(result)
        if request_id is not None:
            out["request_id"] = request_id
        return out

    # ------------------------------------------------------------------ handlers
    @_either
    def create_vllm_endpoint_handler(self, endpoint_url: Optional[str] = None,
                                     model: Optional[str] = None) -> Callable[[Any], Any]:
        """A ONE-argument handler (prompt, prompts, messages or dict) for the framework."""
        return make_endpoint_handler(self._client_for(endpoint_url), self._model(model))

    @_either
    def create_vllm_endpoint_handler_with_params(self, endpoint_url: Optional[str] = None,
                                                 model: Optional[str] = None,
                                                 parameters: Optional[Dict[str, Any]] = None
                                                 ) -> Callable[[Any], Any]:
        """A handler with fixed defaults (per-call parameters override them). ``batch_size``
        chunks prompt lists instead of being sent; unknown names raise ValidationError."""
        return make_endpoint_handler(self._client_for(endpoint_url), self._model(model),
                                     parameters)

    @_either
    def process_batch(self, endpoint_url: Optional[str], inputs: Sequence[str],
                      model: Optional[str] = None) -> List[Dict[str, Any]]:
        """Prompts -> results in input order; prompt lists on the wire."""
        return self.process_batch_with_params(endpoint_url, inputs, model, None)

    @_either
    def process_batch_with_params(self, endpoint_url: Optional[str], inputs: Sequence[str],
                                  model: Optional[str] = None,
                                  parameters: Optional[Dict[str, Any]] = None
                                  ) -> List[Dict[str, Any]]:
        """``process_batch`` with sampling parameters shared by every prompt."""
        return self.process_batch_with_metrics(endpoint_url, inputs, model, parameters)[0]

    @_either
    def process_batch_with_metrics(self, endpoint_url: Optional[str], inputs: Sequence[str],
                                   model: Optional[str] = None,
                                   parameters: Optional[Dict[str, Any]] = None
                                   ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
        """(results in input order, measured metrics of this batch)."""
        client = self._client_for(endpoint_url)
        return run_prompt_batch(client, inputs, self._model(model), parameters)

    # ------------------------------------------------------------------ per-request parameters
    @_either
    def format_request_with_params(self, handler: Callable[[Any], Any], input: Any,  # noqa: A002
                                   params: Optional[Dict[str, Any]] = None) -> Any:
        """Run ``input`` through ``handler`` with ``params`` over the handler's defaults.

        Returns the handler's result dict (a list for a list of prompts); raises typed
        errors, unknown parameter names included, instead of returning ``{"error": ...}``.
        """
        return run_with_params(handler, input, params)

    @_either
    def format_structured_request(self, handler: Callable[[Any], Any],
                                  request: Dict[str, Any]) -> Any:
        """Run ``{"prompt" | "messages", "context", "options", "parameters"}`` through
        ``handler``. ``context`` goes before the prompt; ``options.return_logprobs`` adds
        ``logprobs`` to the result. See ``request_format`` for every option."""
        return run_structured(handler, request)

    # ------------------------------------------------------------------ server facts
    @_either
    def get_model_info(self, endpoint_url: Optional[str] = None,
                       model: Optional[str] = None) -> Dict[str, Any]:
        """``id``, ``root``, ``max_model_len``, ``owned_by``, ``created`` and the server's
        version, from ``/v1/models`` and ``/version``. ``NotFoundError`` when the server
        does not serve ``model`` (an alias missing from the list is checked with
        ``POST /tokenize``)."""
        return model_info(self._client_for(endpoint_url), self._model(model))

    @_either
    def get_model_statistics(self, endpoint_url: Optional[str] = None,
                             model: Optional[str] = None) -> Dict[str, Any]:
        """The server's own figures from ``/metrics``: requests running and waiting, KV-cache
        use, token totals, finishes by reason, TTFT and end-to-end latency (count, mean,
        p50/p90/p99). ``available`` is False, with a ``message``, when the server publishes
        no ``vllm:*`` metrics."""
        return model_statistics(self._client_for(endpoint_url), self._model(model))

    @_either
    def optimize_model(self, endpoint_url: Optional[str] = None, model: Optional[str] = None,
                       optimization_type: str = "balanced") -> Dict[str, Any]:
        """Apply the ``speed`` / ``memory`` / ``balanced`` client profile to the shared client
        of this endpoint, cap ``max_tokens`` for ``model`` there, and return what was applied
        plus the server launch flags the profile recommends (``requires_server_restart``)."""
        profile = get_profile(optimization_type)
        client = self._client_for(endpoint_url)
        info = model_info(client, self._model(model))
        try:
            config: Optional[Dict[str, str]] = cache_config(server_metrics(client)) or None
        except ApiError:  # the advice still stands; it just cannot say what is in effect
            config = None
        return apply_profile(client, info["id"], profile, info.get("max_model_len"), config)


    # ------------------------------------------------------------------ beyond generation
    # Plain values, as the rest of this face returns: lists, not numpy arrays or result types.
    @_either
    def embed(self, inputs: Any, model: Optional[str] = None, endpoint_url: Optional[str] = None,
              **params: Any) -> Dict[str, Any]:
        """Text(s) -> ``{"embeddings": [[float, ...] per input], "model", "usage"}``."""
        r = self._client_for(endpoint_url).embed(inputs, self._model(model), **params)
        return {"embeddings": r.vectors.tolist(), "model": r.model, "usage": r.usage.model_dump()}

    @_either
    def score(self, text_1: Any, text_2: Any, model: Optional[str] = None,
              endpoint_url: Optional[str] = None, **params: Any) -> Dict[str, Any]:
        """``text_1`` against each of ``text_2`` -> ``{"scores": [...], "model", "usage"}``."""
        r = self._client_for(endpoint_url).score(text_1, text_2, self._model(model), **params)
        return {"scores": r.scores, "model": r.model, "usage": r.usage.model_dump()}

    @_either
    def rerank(self, query: str, documents: Sequence[str], top_n: Optional[int] = None,
               model: Optional[str] = None, endpoint_url: Optional[str] = None,
               **params: Any) -> Dict[str, Any]:
        """``{"results": [{"index", "relevance_score", "document"}, ...] best first, "model",
        "usage"}``."""
        r = self._client_for(endpoint_url).rerank(query, documents, top_n, self._model(model),
                                                  **params)
        return {"results": [i.model_dump() for i in r.results], "model": r.model,
                "usage": r.usage.model_dump()}

    @_either
    def tokenize(self, prompt_or_messages: Any, model: Optional[str] = None,
                 endpoint_url: Optional[str] = None, **params: Any) -> Dict[str, Any]:
        """A prompt or chat messages -> ``{"tokens", "count", "max_model_len"}``."""
        r = self._client_for(endpoint_url).tokenize(prompt_or_messages, self._model(model),
                                                    **params)
        return {"tokens": r.tokens, "count": r.count, "max_model_len": r.max_model_len}

    @_either
    def detokenize(self, tokens: Sequence[int], model: Optional[str] = None,
                   endpoint_url: Optional[str] = None, **params: Any) -> str:
        """Token ids -> their text."""
        return self._client_for(endpoint_url).detokenize(tokens, self._model(model), **params)


def _module_function(name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(vllm._default_instance(), name)(*args, **kwargs)
    call.__name__ = name
    call.__doc__ = f"Module-level ``{name}`` on the shared default backend (see ``vllm.{name}``)."
    return call


create_vllm_endpoint_handler = _module_function("create_vllm_endpoint_handler")
create_vllm_endpoint_handler_with_params = _module_function("create_vllm_endpoint_handler_with_params")
process_batch = _module_function("process_batch")
process_batch_with_params = _module_function("process_batch_with_params")
process_batch_with_metrics = _module_function("process_batch_with_metrics")
format_request_with_params = _module_function("format_request_with_params")
format_structured_request = _module_function("format_structured_request")
get_model_info = _module_function("get_model_info")
get_model_statistics = _module_function("get_model_statistics")
optimize_model = _module_function("optimize_model")
embed = _module_function("embed")
score = _module_function("score")
rerank = _module_function("rerank")
tokenize = _module_function("tokenize")
detokenize = _module_function("detokenize")
