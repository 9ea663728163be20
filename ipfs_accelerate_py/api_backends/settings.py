"""Client settings: defaults in one place, environment variables read once, arguments win.

Every backend reads the same settings under its own prefix (``VLLM_`` for vLLM), so the
README's variables (``VLLM_API_URL``, ``VLLM_MAX_RETRIES``, ...) mean the same thing for
any backend built on ``BaseApiBackend``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Literal, Mapping, Optional
from urllib.parse import urlsplit

import pydantic
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from .errors import ConfigurationError, register_secret

__all__ = ["ClientSettings", "ENV_FIELDS", "MAX_RESPONSE_BYTES", "normalize_base_url"]

#: Default cap on one reply body (``max_response_bytes``): twice the SSE event cap (32 MiB),
#: far above any real reply (a long completion with logprobs is a few MiB), and low enough
#: that a hostile server cannot make the client allocate without bound.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024

#: Environment variable suffix -> settings field (the README's list, plus a few extras).
ENV_FIELDS: Dict[str, str] = {
    "API_URL": "base_url",
    "API_KEY": "api_key",
    "MODEL": "model",
    "TIMEOUT": "timeout",
    "MAX_RETRIES": "max_retries",
    "RETRY_DELAY": "retry_delay",
    "BACKOFF_FACTOR": "backoff_factor",
    "MAX_CONCURRENT": "max_concurrent_requests",
    "FAILURE_THRESHOLD": "failure_threshold",
    "RESET_TIMEOUT": "reset_timeout",
    "FAIL_FAST": "fail_fast",
    "BATCH_SIZE": "max_batch_size",
    "BATCH_TIMEOUT": "batch_timeout",
    "BATCH_CHAT": "batch_chat",
    "BATCH_PROMPT_LISTS": "batch_prompt_lists",
    "QUEUE_SIZE": "queue_size",
    "DEADLINE": "deadline",
    "CA_BUNDLE": "ca_bundle",
    "ROUTING": "routing",
    "MAX_RESPONSE_BYTES": "max_response_bytes",
    "MAX_MEDIA_BYTES": "max_media_bytes",
}


def normalize_base_url(url: str, field: str = "base_url") -> str:
    """Validate an http(s) URL and strip a trailing ``/`` and ``/v1`` (both forms work)."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError("must be a non-empty http(s) URL", field=field)
    if any(c in url for c in "\r\n\t ") or any(ord(c) < 32 for c in url):
        raise ConfigurationError("must not contain whitespace or control characters", field=field)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigurationError(f"invalid URL ({exc})", field=field) from None
    if parts.scheme not in ("http", "https"):
        raise ConfigurationError(f"scheme must be http or https, got {parts.scheme or 'none'!r}",
                                 field=field)
    if not parts.hostname:
        raise ConfigurationError("has no host", field=field)
    if port is not None and not 0 < port < 65536:
        raise ConfigurationError(f"port {port} is out of range", field=field)
    if parts.username or parts.password:
        raise ConfigurationError("must not carry credentials; use api_key", field=field)
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return f"{parts.scheme}://{parts.netloc}{path}"


class ClientSettings(BaseModel):
    """Everything a backend client can be tuned with. Times are seconds."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)

    base_url: str = "http://localhost:8000"
    api_key: Optional[SecretStr] = None
    model: Optional[str] = None
    # timeouts: connect, each read (also the idle limit between stream chunks), whole call
    timeout: float = Field(30.0, gt=0, le=86_400)
    connect_timeout: float = Field(10.0, gt=0, le=3600)
    deadline: Optional[float] = Field(None, gt=0, le=86_400)
    stream_idle_timeout: Optional[float] = Field(None, gt=0, le=86_400)
    # retry
    max_retries: int = Field(3, ge=0, le=100)
    retry_delay: float = Field(0.5, ge=0, le=600)
    backoff_factor: float = Field(2.0, ge=1.0, le=100)
    max_retry_delay: float = Field(8.0, ge=0, le=3600)
    max_retry_after: float = Field(60.0, ge=0, le=3600)
    # queue
    queue_enabled: bool = True
    max_concurrent_requests: int = Field(10, ge=1, le=1024)
    queue_size: int = Field(1000, ge=1, le=10_000_000)
    aging_interval: float = Field(2.0, gt=0, le=3600)
    forward_priority: bool = False
    # circuit breaker
    circuit_breaker_enabled: bool = True
    # The breaker opens on an outage, not on noise: see _core/breaker.py for why
    # these defaults (the arithmetic is there). failure_threshold is the least number of
    # failures in the window, alongside the rate.
    failure_threshold: int = Field(5, ge=1, le=10_000)
    reset_timeout: float = Field(30.0, gt=0, le=86_400)
    failure_rate_threshold: float = Field(0.8, gt=0, le=1.0)
    sliding_window_seconds: float = Field(10.0, gt=0, le=3600)
    sliding_window_size: int = Field(10_000, ge=1, le=1_000_000)
    minimum_calls: int = Field(30, ge=1, le=10_000)
    half_open_max_calls: int = Field(1, ge=1, le=1000)
    # OPEN waits for the circuit (within the call's deadline) unless fail_fast; the breaker
    # probes the adapter's health request on its own schedule, first after probe_interval,
    # doubling up to probe_max_interval (capped by reset_timeout)
    fail_fast: bool = False
    probe_interval: float = Field(0.5, gt=0, le=3600)
    probe_max_interval: float = Field(1.0, gt=0, le=3600)
    # batching
    batch_enabled: bool = True
    max_batch_size: int = Field(32, ge=1, le=4096)
    batch_timeout: float = Field(0.1, ge=0, le=60)
    batch_linger: float = Field(0.002, ge=0, le=1)
    # concurrent compatible completion streams share one prompt-list stream (_streaming/stream_batching.py)
    batch_streams: bool = True
    # chat conversations share a call too (where the server has a chat batch route); off by
    # default because such a server reports prompt tokens only for the whole call
    batch_chat: bool = False
    # share calls with an endpoint whose replies to shared calls have matched so far (None:
    # learned; a mismatched reply turns sharing off for that endpoint), always (True: a
    # mismatched call's members are still re-sent alone) or never (False)
    batch_prompt_lists: Optional[bool] = None
    # metrics and history
    metrics_enabled: bool = True
    latency_window: int = Field(10_000, ge=10, le=10_000_000)
    recent_requests_size: int = Field(100, ge=0, le=100_000)
    store_prompts: bool = False
    # transport
    verify_tls: bool = True
    ca_bundle: Optional[str] = None
    trust_env: bool = False
    proxies: Optional[Dict[str, str]] = None
    extra_headers: Dict[str, str] = Field(default_factory=dict)
    # largest reply body read (bytes); more is refused while reading (ResponseTooLargeError)
    max_response_bytes: int = Field(MAX_RESPONSE_BYTES, ge=1, le=1 << 40)
    # routing: every call that names no endpoint is routed over the endpoints (mixins/routing.py)
    routing: Optional[Literal["round-robin", "least-loaded", "fastest", "cache-aware"]] = None
    # LoRA adapters the client may load where a request for one needs it: name -> path on
    # the servers' machines (mixins/lora_routing.py)
    lora_paths: Dict[str, str] = Field(default_factory=dict)
    # largest media item (decoded bytes) a chat content part may carry inline (media.py)
    max_media_bytes: int = Field(20 * 1024 * 1024, ge=1, le=1 << 34)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return normalize_base_url(v)

    @field_validator("extra_headers")
    @classmethod
    def _headers(cls, v: Dict[str, str]) -> Dict[str, str]:
        for name, value in v.items():
            if not isinstance(name, str) or not name or any(c in name for c in "\r\n: \t"):
                raise ValueError(f"invalid header name {name!r}")
            if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
                raise ValueError(f"header {name!r} value must be a string without newlines")
        return v

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: Optional[SecretStr]) -> Optional[SecretStr]:
        if v is not None:
            raw = v.get_secret_value()
            if any(c in raw for c in "\r\n\0") or raw != raw.strip():
                raise ValueError("API key must not contain whitespace or newlines")
            register_secret(raw)
        return v

    @property
    def api_key_value(self) -> Optional[str]:
        return self.api_key.get_secret_value() if self.api_key else None

    @property
    def effective_deadline(self) -> float:
        """Whole-call limit: given, or room for every retry of a full read."""
        if self.deadline is not None:
            return self.deadline
        return min(86_400.0, self.timeout * (self.max_retries + 1) + self.max_retry_delay * self.max_retries)

    @property
    def idle_timeout(self) -> float:
        return self.stream_idle_timeout or self.timeout

    @classmethod
    def from_env(cls, prefix: str, overrides: Optional[Mapping[str, Any]] = None,
                 environ: Optional[Mapping[str, str]] = None) -> "ClientSettings":
        """Defaults, then ``{prefix}*`` environment variables, then explicit ``overrides``.

        ``None`` in ``overrides`` means "not given", so the environment still applies.
        """
        env = os.environ if environ is None else environ
        data: Dict[str, Any] = {}
        for suffix, field in ENV_FIELDS.items():
            raw = env.get(prefix + suffix)
            if raw not in (None, ""):
                data[field] = (prefix + suffix, raw)
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(given) - set(cls.model_fields)
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigurationError(f"unknown setting {name!r}", field=name)
        merged: Dict[str, Any] = {field: raw for field, (_, raw) in data.items()}
        merged.update(given)
        sources = {field: name for field, (name, _) in data.items() if field not in given}
        return cls._validated(merged, sources)

    @classmethod
    def _validated(cls, data: Dict[str, Any], sources: Mapping[str, str]) -> "ClientSettings":
        """Validate, turning pydantic's error into one ConfigurationError naming the source."""
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in first.get("loc", ())) or "settings"
            msg = first.get("msg", "invalid").replace("Value error, ", "")
            raise ConfigurationError(msg, field=sources.get(field.split(".")[0], field)) from None

    def replace(self, **changes: Any) -> "ClientSettings":
        """A copy with ``changes`` validated (used by per-endpoint and profile settings)."""
        data = self.model_dump()
        if self.api_key is not None:
            data["api_key"] = self.api_key
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise ConfigurationError(f"unknown setting {unknown[0]!r}", field=unknown[0])
        data.update({k: v for k, v in changes.items() if v is not None})
        return type(self)._validated(data, {})

    def __repr__(self) -> str:  # SecretStr already hides the key; keep repr short
        return (f"ClientSettings(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key={'***' if self.api_key else None}, timeout={self.timeout})")

