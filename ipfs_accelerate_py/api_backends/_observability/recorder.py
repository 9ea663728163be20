"""Metrics: cheap to record (counters and fixed-size arrays), computed only when read.

Recording costs a lock and a few additions; percentiles are computed with numpy on
``snapshot()``. Memory is bounded: each latency series is a ring of ``window`` floats.
Names follow the OpenTelemetry GenAI semantic conventions where one exists
(``gen_ai.client.operation.duration`` in seconds, ``gen_ai.client.token.usage``).

Two parts: ``MetricsRecorder`` (the counters, by total, model and endpoint scope), handed to
the endpoints' parts, the batcher and the retry loop; ``RequestLog`` (every request's outcome:
the job resolved, the recorder's counts, the last requests' records), whose ``finish`` the
batcher is handed. Their public face is ``mixins/metrics.py`` (``get_metrics``,
``recent_requests``).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional

import numpy as np

from ..models import CompletionRequest, CompletionResult
from .._core.queue import Job

if TYPE_CHECKING:
    from ..clock import Clock
    from .._core.endpoint import Endpoint

__all__ = ["Series", "MetricsRecorder", "RequestLog", "PERCENTILES"]

PERCENTILES = (50, 90, 95, 99)


class Series:
    """A bounded ring of samples plus exact count/sum/min/max over everything seen. The
    ring is a plain list (a sample is written on every request; numpy only summarises)."""

    __slots__ = ("_buf", "_i", "_window", "count", "total", "min", "max")

    def __init__(self, window: int) -> None:
        self._buf: List[float] = [0.0] * window
        self._window = window
        self._i = 0
        self.count = 0
        self.total = 0.0
        self.min = float("inf")
        self.max = float("-inf")

    def add(self, x: float) -> None:
        i = self._i
        self._buf[i] = x
        i += 1
        self._i = 0 if i == self._window else i
        self.count += 1
        self.total += x
        if x < self.min:
            self.min = x
        if x > self.max:
            self.max = x

    def summary(self) -> Dict[str, Any]:
        if not self.count:
            return {"count": 0}
        data = np.asarray(self._buf[: min(self.count, self._window)], dtype=np.float64)
        pct = np.percentile(data, PERCENTILES)
        mean = self.total / self.count
        out: Dict[str, Any] = {"count": self.count, "min": self.min, "max": self.max,
                               "mean": mean, "avg": mean}  # "avg": the README's word
        out.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)})
        return out


class _Scope:
    """Counters and series for one scope: all, one model, or one endpoint."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.requests = 0
        self.successes = 0
        self.failures = 0
        self.failures_by_type: Counter = Counter()
        self.retries = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.batches = 0
        self.batched_requests = 0
        self.batch_mismatches = 0
        self.streams = 0
        self.duration = Series(window)
        self.queue_wait = Series(window)
        self.ttft = Series(window)
        self.circuit_wait = Series(window)
        self.probes = 0
        self.probe_failures = 0

    def to_dict(self) -> Dict[str, Any]:
        return {
            "requests": self.requests,
            "successes": self.successes,
            "failures": self.failures,
            "failures_by_type": dict(self.failures_by_type),
            "success_rate": (self.successes / self.requests) if self.requests else None,
            "retries": self.retries,
            "streams": self.streams,
            "batches": self.batches,
            "batched_requests": self.batched_requests,
            "batch_mismatches": self.batch_mismatches,
            "mean_batch_size": (self.batched_requests / self.batches) if self.batches else None,
            "gen_ai.client.token.usage": {"input": self.input_tokens, "output": self.output_tokens},
            "gen_ai.client.operation.duration": self.duration.summary(),
            "queue_wait_seconds": self.queue_wait.summary(),
            "gen_ai.server.time_to_first_token": self.ttft.summary(),
            "circuit_wait_seconds": self.circuit_wait.summary(),
            "probes": {"sent": self.probes, "ok": self.probes - self.probe_failures,
                       "failed": self.probe_failures},
        }


class MetricsRecorder:
    """Thread-safe recorder with total, per-model and per-endpoint scopes."""

    def __init__(self, window: int = 10_000, max_models: int = 256) -> None:
        self._window = window
        self._max_models = max_models
        self._lock = threading.Lock()
        self._reset_locked()

    def _reset_locked(self) -> None:
        self._total = _Scope(self._window)
        self._models: Dict[str, _Scope] = {}
        self._endpoints: Dict[str, _Scope] = {}
        self._transitions: Counter = Counter()

    def _endpoint_scope(self, endpoint: str) -> _Scope:
        ep = self._endpoints.get(endpoint)
        if ep is None:
            ep = self._endpoints[endpoint] = _Scope(min(self._window, 2048))
        return ep

    def _scopes(self, endpoint: str, model: Optional[str]) -> "tuple[_Scope, ...]":
        ep = self._endpoint_scope(endpoint)
        key = model or "(default)"
        m = self._models.get(key)
        if m is None:
            if len(self._models) >= self._max_models:  # bound memory under many model names
                key = "(other)"
                m = self._models.get(key)
            if m is None:
                m = self._models[key] = _Scope(min(self._window, 2048))
        return self._total, ep, m

    def record_request(self, endpoint: str, model: Optional[str], ok: bool, duration: float,
                       queue_wait: float = 0.0, error_type: Optional[str] = None,
                       input_tokens: int = 0, output_tokens: int = 0,
                       ttft: Optional[float] = None, stream: bool = False) -> None:
        with self._lock:
            for s in self._scopes(endpoint, model):
                s.requests += 1
                if ok:
                    s.successes += 1
                else:
                    s.failures += 1
                    s.failures_by_type[error_type or "Error"] += 1
                s.input_tokens += input_tokens
                s.output_tokens += output_tokens
                s.duration.add(duration)
                s.queue_wait.add(queue_wait)
                if ttft is not None:
                    s.ttft.add(ttft)
                if stream:
                    s.streams += 1

    def record_retry(self, endpoint: str, model: Optional[str]) -> None:
        with self._lock:
            for s in self._scopes(endpoint, model):
                s.retries += 1

    def record_batch(self, endpoint: str, model: Optional[str], size: int) -> None:
        with self._lock:
            for s in self._scopes(endpoint, model):
                s.batches += 1
                s.batched_requests += size

    def record_batch_mismatch(self, endpoint: str, model: Optional[str]) -> None:
        """A shared call's reply did not match it (its members were re-sent alone)."""
        with self._lock:
            for s in self._scopes(endpoint, model):
                s.batch_mismatches += 1

    def record_unsent(self, endpoint: str, job: Job, now: float) -> None:
        """A request that ended before it was sent (expired, closed, circuit held)."""
        self.record_request(endpoint, job.model, False, now - job.enqueued_at,
                            error_type=_error_type(job.future) or "Cancelled")

    def record_circuit_wait(self, endpoint: str, seconds: float) -> None:
        """A request waited ``seconds`` for an OPEN circuit (endpoint and total scopes)."""
        with self._lock:
            for s in (self._total, self._endpoint_scope(endpoint)):
                s.circuit_wait.add(seconds)

    def record_probe(self, endpoint: str, ok: bool) -> None:
        """A scheduled health probe of an OPEN circuit, and its outcome."""
        with self._lock:
            for s in (self._total, self._endpoint_scope(endpoint)):
                s.probes += 1
                s.probe_failures += 0 if ok else 1

    def record_transition(self, endpoint: str, old: str, new: str) -> None:
        with self._lock:
            self._transitions[f"{endpoint}:{old}->{new}"] += 1

    def snapshot(self, reset: bool = False) -> Dict[str, Any]:
        with self._lock:
            out = self._total.to_dict()
            out["per_model"] = {k: v.to_dict() for k, v in self._models.items()}
            out["per_endpoint"] = {k: v.to_dict() for k, v in self._endpoints.items()}
            out["circuit_breaker_transitions"] = dict(self._transitions)
            if reset:
                self._reset_locked()
        return out

    def endpoint_counts(self, endpoint: str) -> Dict[str, Any]:
        with self._lock:
            s = self._endpoints.get(endpoint)
            return s.to_dict() if s else _Scope(1).to_dict()


class RequestLog:
    """Every request's outcome, once: the job resolved, the recorder's counts, and the
    last requests' records (``recent``, newest last; its size the ``recent_requests_size``
    setting). The batcher calls ``finish`` for each job it serves.

    ``recorder``: the counters and latency rings; ``clock``: when the request ended;
    ``recent_size``: how many records ``recent`` keeps (0: none made)."""

    __slots__ = ("_recorder", "_clock", "recent")

    def __init__(self, recorder: MetricsRecorder, clock: "Clock", recent_size: int) -> None:
        self._recorder = recorder
        self._clock = clock
        #: the last requests' outcomes (id, endpoint, model, latency, error), newest last
        self.recent: Deque[Dict[str, Any]] = deque(maxlen=recent_size)

    def finish(self, ep: "Endpoint", job: Job, start: float,
               result: Optional[CompletionResult] = None,
               error: Optional[BaseException] = None, input_tokens: Optional[int] = None,
               output_tokens: Optional[int] = None) -> None:
        """Resolve ``job`` and record what its caller saw (``start``: when it was sent)."""
        # The caller may have given up first: count what the caller saw.
        if error is None and job.succeed(result):
            error_type = None
        else:
            if error is not None:
                job.fail(error)
            error_type = _error_type(job.future)
        ok = error_type is None
        now = self._clock.monotonic()
        if ok and result is not None:
            if input_tokens is None:
                input_tokens = result.usage.prompt_tokens
            if output_tokens is None:
                output_tokens = result.usage.completion_tokens
        self._recorder.record_request(
            ep.id, job.model, ok, now - job.enqueued_at, start - job.enqueued_at,
            error_type, input_tokens or 0, output_tokens or 0)
        if self.recent.maxlen:
            entry: Dict[str, Any] = {
                "request_id": job.request_id, "endpoint": ep.id, "model": job.model,
                "priority": job.priority, "ok": ok, "error": error_type,
                "latency_seconds": now - job.enqueued_at,
                "queue_wait_seconds": start - job.enqueued_at, "time": self._clock.wall()}
            if ep.settings.store_prompts:
                entry["prompt"] = (job.request.prompt if isinstance(job.request, CompletionRequest)
                                   else "(chat)")
            self.recent.append(entry)


def _error_type(future: Any) -> Optional[str]:
    """What a resolved job's caller saw, as the metrics name it: None for a result, the
    error's class name, or "Cancelled" (the caller left: a cancelled future has no error)."""
    if future.cancelled():
        return "Cancelled"
    if not future.done():
        return None
    exc = future.exception()
    return None if exc is None else type(exc).__name__
