"""Finding the user's OpenTelemetry providers without importing OpenTelemetry ourselves.

The client never imports ``opentelemetry``: a program that configured a tracer or meter
provider has imported it already, so ``sys.modules`` tells us, for the price of a dict
lookup, whether there can be anything to report to. When it is there, the global providers
(or the ones given to ``tracing.configure``) are used unless they are the API's
placeholders (proxy / no-op), so a program that merely has the package installed pays
nothing. Instruments are made once per provider pair and cached.

Names follow the OpenTelemetry GenAI semantic conventions (client spans and metrics);
histogram buckets are the conventions' advisory ones, which span 10 ms .. 80 s and
1 .. 64 M tokens: LLM calls, not web requests.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Optional, Sequence, Tuple

__all__ = ["Telemetry", "current", "set_providers", "DURATION_BUCKETS", "TOKEN_BUCKETS",
           "TTFT_BUCKETS"]

#: ``gen_ai.client.operation.duration`` (s), the conventions' advisory boundaries
DURATION_BUCKETS: Sequence[float] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
                                     5.12, 10.24, 20.48, 40.96, 81.92)
#: ``gen_ai.client.operation.time_to_first_chunk`` (s): first tokens come sooner
TTFT_BUCKETS: Sequence[float] = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                                 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
#: ``gen_ai.client.token.usage`` ({token}), powers of four
TOKEN_BUCKETS: Sequence[float] = tuple(float(4 ** i) for i in range(14))

_SCOPE = "ipfs_accelerate_py.api_backends"
_PLACEHOLDERS = ("ProxyTracerProvider", "NoOpTracerProvider", "_ProxyMeterProvider",
                 "NoOpMeterProvider")


class Telemetry:
    """The tracer and instruments of one (tracer provider, meter provider) pair; either
    half is None when that provider is absent."""

    def __init__(self, tracer_provider: Any, meter_provider: Any) -> None:
        self.tracer = None
        self.duration = self.tokens = self.ttft = None
        if tracer_provider is not None:
            self.tracer = tracer_provider.get_tracer(_SCOPE)
        if meter_provider is not None:
            meter = meter_provider.get_meter(_SCOPE)
            self.duration = meter.create_histogram(
                "gen_ai.client.operation.duration", unit="s",
                description="GenAI operation duration",
                explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS))
            self.tokens = meter.create_histogram(
                "gen_ai.client.token.usage", unit="{token}",
                description="Measures number of input and output tokens used",
                explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS))
            self.ttft = meter.create_histogram(
                "gen_ai.client.operation.time_to_first_chunk", unit="s",
                description="Time to receive the first chunk of a streaming response",
                explicit_bucket_boundaries_advisory=list(TTFT_BUCKETS))

    def record(self, attributes: dict, duration: float, input_tokens: int,
               output_tokens: int, ttft: Optional[float]) -> None:
        """One finished operation into the histograms (tokens only when known)."""
        if self.duration is None:
            return
        self.duration.record(duration, attributes)
        if "error.type" not in attributes:
            if input_tokens:
                self.tokens.record(input_tokens, {**attributes, "gen_ai.token.type": "input"})
            if output_tokens:
                self.tokens.record(output_tokens, {**attributes, "gen_ai.token.type": "output"})
        if ttft is not None:
            self.ttft.record(ttft, attributes)


_explicit: Tuple[Any, Any] = (None, None)
_cache: Tuple[Any, Any, Optional[Telemetry]] = (None, None, None)
_lock = threading.Lock()


def set_providers(tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Providers for this library only (None: the global one)."""
    global _explicit
    _explicit = (tracer_provider, meter_provider)


def _real(provider: Any) -> Any:
    return None if provider is None or type(provider).__name__ in _PLACEHOLDERS else provider


def current() -> Optional[Telemetry]:
    """The telemetry to report to now, or None (the common case: one dict lookup)."""
    if "opentelemetry" not in sys.modules:
        return None
    tp, mp = _explicit
    if tp is None:
        trace = sys.modules.get("opentelemetry.trace")
        tp = trace.get_tracer_provider() if trace is not None else None
    if mp is None:
        metrics = sys.modules.get("opentelemetry.metrics")
        mp = metrics.get_meter_provider() if metrics is not None else None
    tp, mp = _real(tp), _real(mp)
    if tp is None and mp is None:
        return None
    global _cache
    ctp, cmp_, telemetry = _cache
    if telemetry is not None and ctp is tp and cmp_ is mp:
        return telemetry
    with _lock:
        telemetry = Telemetry(tp, mp)
        _cache = (tp, mp, telemetry)
    return telemetry
