"""``VllmClient``: ``BaseApiBackend`` bound to the vLLM plugin's adapters, with the calls
only a vLLM server answers (``/version``, ``/health``, the legacy ``/generate`` flavour) and
the ``/metrics`` load probe that ``least-loaded`` routing reads."""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..adapter import BackendAdapter, load_json
from ..base import BaseApiBackend
from ..errors import ConfigurationError, NotFoundError
from ..plugins import get_backend
from ..server_metrics import prometheus_probe
from ..settings import ClientSettings
from ..structured import StructuredOutputsMixin
from ..transport import HttpRequest
from ._adapter import VllmLegacyAdapter

__all__ = ["VllmClient", "VLLM_LOAD_METRIC", "vllm_load_probe"]


class VllmClient(StructuredOutputsMixin, BaseApiBackend):
    """A resilient vLLM client. Arguments win over ``VLLM_*`` environment variables.

    ``response_model=`` on ``run_inference`` / ``chat_completion`` (and the async twins)
    returns ``result.parsed`` (``structured.py``).

    ``api_flavor``: ``"openai"`` (``/v1/*``, default), ``"legacy"`` (the demo server's
    ``/generate``), or ``"auto"``: the server is asked which it speaks (``GET /v1/models``)
    by the first call that sends, not by the constructor, so making a client never blocks
    (an async caller's first call awaits the question on its own loop). Until then
    ``api_flavor`` reads ``"auto"``; a question that fails fails that call, and the next
    call asks again.
    """

    backend_name = "vllm"

    def __init__(self, api_key: Optional[str] = None, base_url: Optional[str] = None,
                 timeout: Optional[float] = None, max_retries: Optional[int] = None,
                 max_concurrent_requests: Optional[int] = None,
                 failure_threshold: Optional[int] = None, reset_timeout: Optional[float] = None,
                 model: Optional[str] = None, api_flavor: str = "openai",
                 settings: Optional[ClientSettings] = None,
                 adapter: Optional[BackendAdapter] = None, **options: Any) -> None:
        if api_flavor not in ("openai", "legacy", "auto"):
            raise ConfigurationError("must be 'openai', 'legacy' or 'auto'", field="api_flavor")
        # The adapters the plugin manager registered, as for any backend (``adapter``: one
        # the caller got from it, e.g. the unified runner).
        if adapter is None and api_flavor == "legacy":
            adapter = get_backend(VllmLegacyAdapter.name)
        super().__init__(settings, adapter=adapter, api_key=api_key, base_url=base_url,
                         timeout=timeout, max_retries=max_retries,
                         max_concurrent_requests=max_concurrent_requests,
                         failure_threshold=failure_threshold, reset_timeout=reset_timeout,
                         model=model, **options)
        self.api_flavor = api_flavor
        # least-loaded routing reads the server's own queue length (only when it routes)
        self.set_load_probe(vllm_load_probe())

    def detect_api_flavor(self) -> str:
        """"openai" if the server lists models under /v1, else "legacy" (and switch to it);
        ``api_flavor`` says the answer from then on."""
        try:
            self.request_raw(_flavor_question(), timeout=self.settings.timeout)
        except NotFoundError:
            return self._settle_flavor(False)
        return self._settle_flavor(True)

    async def _adetect_api_flavor(self) -> str:
        """``detect_api_flavor`` for coroutines, on the caller's loop."""
        ep = self._default_endpoint()
        try:
            await self._arequest_raw(_flavor_question(), ep, self.settings.timeout)
        except NotFoundError:
            return self._settle_flavor(False)
        return self._settle_flavor(True)

    def _settle_flavor(self, openai: bool) -> str:
        if not openai:
            self._use_adapter(get_backend(VllmLegacyAdapter.name))
        self.api_flavor = "openai" if openai else "legacy"
        return self.api_flavor

    def _settle_backend(self) -> None:
        if self.api_flavor == "auto":
            self.detect_api_flavor()

    async def _asettle_backend(self) -> None:
        if self.api_flavor == "auto":
            await self._adetect_api_flavor()

    def version(self, endpoint_id: Optional[str] = None) -> str:
        """The server's vLLM version (``GET /version``)."""
        data = load_json(self.request_raw(HttpRequest("GET", "/version"), endpoint_id))
        return str(data.get("version", "")) if isinstance(data, dict) else ""

    def health(self, endpoint_id: Optional[str] = None) -> bool:
        """True when ``GET /health`` answers 200 (one try, no retries)."""
        ep = self._endpoint(endpoint_id)
        try:  # through the endpoint's transport, on the client's loop (``Endpoint.fetch``)
            resp = ep.fetch(HttpRequest("GET", "/health"),
                            (ep.settings.connect_timeout, ep.settings.timeout))
        except Exception:  # noqa: BLE001 - any failure means "not healthy"
            return False
        return resp.status == 200

    def default_model(self, endpoint_id: Optional[str] = None) -> Optional[str]:
        """The configured model, else the first model the server lists."""
        if self.settings.model:
            return self.settings.model
        models = self.list_models(endpoint_id)
        return models[0]["id"] if models else None


def _flavor_question() -> HttpRequest:
    """What ``api_flavor="auto"`` asks: an OpenAI-style server lists its models here."""
    return HttpRequest("GET", "/v1/models")


#: The server-side queue length that ``least-loaded`` routing adds to the client's own count.
VLLM_LOAD_METRIC = "vllm:num_requests_waiting"


def vllm_load_probe(min_timeout: float = 2.0) -> Callable[[Any], Optional[float]]:
    """A routing load probe reading ``vllm:num_requests_waiting`` from an endpoint's /metrics:
    ``client.set_load_probe(vllm_load_probe())`` (refreshed at most once a second)."""
    return prometheus_probe(VLLM_LOAD_METRIC, timeout=min_timeout)
