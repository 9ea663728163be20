"""The shapes of the runner's result files, as pydantic models, and how they are written.

Every file the runner writes is one of the models below, dumped as JSON: numbers stay
numbers, units are in the key names (``_seconds``, ``_per_second``), times are ISO 8601
in UTC. No model holds an API key; prompts and generated texts appear only in
``samples`` and only when the run asked for ``--store-prompts``.

Files (``<backend>`` is the backend name, ``<ts>`` the run's UTC timestamp such as
``20261125T031227Z``; all files of one run share the same ``<ts>``):

    <backend>_test_results.json     StandardResults     (overwritten by each run)
    <backend>_performance_<ts>.json PerformanceResults  (+ <backend>_performance_<ts>.png)
    <backend>_connection_<ts>.json  ConnectionResults
    <backend>_embeddings_<ts>.json  EmbeddingsResults   (a pooling model, or --embeddings)
    <backend>_summary_<ts>.json     SummaryResults
"""

from __future__ import annotations

import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Status", "ServerKind", "CheckResult", "RunInfo", "SuiteResult", "StandardResults",
    "ConnectionResults", "EmbeddingsResults", "LatencyStats", "SingleInference", "BatchInference",
    "ConcurrencyPoint", "StreamingStats", "ComparisonVariant", "Comparison",
    "TokenAccounting", "TokenAccountingAttempt", "PerformanceSettings", "PerformanceResults",
    "SuiteSummary",
    "SummaryResults", "utc_now", "file_timestamp", "safe_name", "result_path", "write_result",
]

Status = Literal["passed", "failed", "skipped"]
ServerKind = Literal["external", "embedded-vllm-cpu", "embedded-fake", "none"]


def utc_now() -> datetime:
    """Timezone-aware now, so every timestamp in a file carries its ``+00:00``."""
    return datetime.now(timezone.utc)


def file_timestamp(when: datetime) -> str:
    """A timestamp that sorts and is safe in any file name: ``20261125T031227Z``."""
    return when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """``text`` usable as one path component: ``/``, spaces and the like become ``_``.

    Backend names (and anything else that ends up in a file name, such as a model id
    like ``meta-llama/Llama-2-7b-chat-hf``) must never create folders or escape the
    results directory.
    """
    cleaned = _UNSAFE.sub("_", text).strip("._")
    return cleaned or "unnamed"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckResult(_Model):
    """One named check: passed, failed (with the reason) or skipped (with the reason)."""

    name: str
    status: Status
    duration_seconds: float
    message: str = ""
    details: Dict[str, Any] = Field(default_factory=dict)


class RunInfo(_Model):
    """Who ran against what: repeated in every file so each one stands alone."""

    backend: str
    run_timestamp: datetime
    client_version: str
    server_version: Optional[str] = None
    server_url: Optional[str] = None
    server_kind: ServerKind = "none"
    model: Optional[str] = None
    api_key_set: bool = False


class SuiteResult(RunInfo):
    """A suite's outcome and its checks."""

    suite: str
    status: Status
    skip_reason: Optional[str] = None
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    checks: List[CheckResult] = Field(default_factory=list)
    samples: Optional[List[Dict[str, Any]]] = None  # only with --store-prompts


class StandardResults(SuiteResult):
    """``--standard``: the client's API against a server (``<backend>_test_results.json``)."""

    suite: Literal["standard"] = "standard"


class ConnectionResults(SuiteResult):
    """``--real``: the live server at ``--api-url`` (``<backend>_connection_<ts>.json``)."""

    suite: Literal["real"] = "real"
    reachable: bool = False
    health_status_code: Optional[int] = None
    models_listed: List[str] = Field(default_factory=list)


class EmbeddingsResults(SuiteResult):
    """``--embeddings`` (run by itself for a pooling model): embed, score, rerank, pool,
    tokenize/detokenize, shared embed calls (``<backend>_embeddings_<ts>.json``)."""

    suite: Literal["embeddings"] = "embeddings"
    pooling_model: bool = False
    detection: str = ""  # how the server showed it (the probe's statuses, in words)
    dimensions: Optional[int] = None


class LatencyStats(_Model):
    """Latency figures over ``count`` requests."""

    count: int
    mean_seconds: Optional[float] = None
    p50_seconds: Optional[float] = None
    p90_seconds: Optional[float] = None
    p99_seconds: Optional[float] = None
    min_seconds: Optional[float] = None
    max_seconds: Optional[float] = None


class SingleInference(_Model):
    """One request at a time, sequentially."""

    requests: int
    max_tokens: int
    latency: LatencyStats
    output_tokens: int
    output_tokens_per_second: Optional[float] = None
    latencies_seconds: List[float] = Field(default_factory=list)


class BatchInference(_Model):
    """``batch_size`` inputs sent together vs the same inputs one by one."""

    mode: Literal["prompt_list", "concurrent_requests"]
    batch_size: int
    max_tokens: int
    http_requests: int
    batch_time_seconds: float
    one_by_one_time_seconds: float
    batch_inputs_per_second: float
    one_by_one_inputs_per_second: float
    batch_speedup_factor: float
    output_tokens: int


class ConcurrencyPoint(_Model):
    """Closed-loop load at one concurrency level (client-side batching off)."""

    concurrency: int
    requests: int
    errors: int
    wall_time_seconds: float
    requests_per_second: float
    client_output_tokens: int
    client_output_tokens_per_second: float
    server_generation_tokens: Optional[float] = None
    server_generation_tokens_per_second: Optional[float] = None
    latency: LatencyStats


class StreamingStats(_Model):
    """Server-sent-event streams: time to first token and time per output token."""

    streams: int
    max_tokens: int
    time_to_first_token: LatencyStats
    time_per_output_token: LatencyStats
    total_time: LatencyStats
    output_tokens: int
    #: the server's own view over the same streams (histogram sum/count deltas on
    #: /metrics), when it exports them: the client's clock includes its own scheduling
    server_time_to_first_token_mean_seconds: Optional[float] = None
    server_inter_token_latency_mean_seconds: Optional[float] = None


class ComparisonVariant(_Model):
    """One arm of the comparison (an endpoint, or a set of sampling parameters)."""

    name: str
    endpoint_url: Optional[str] = None
    parameters: Dict[str, Any] = Field(default_factory=dict)
    requests: int
    errors: int
    latency: LatencyStats
    output_tokens_per_second: Optional[float] = None
    distinct_outputs: int = 0
    same_output_as_reference_ratio: Optional[float] = None
    error: Optional[str] = None


class Comparison(_Model):
    """Precision modes across ``--endpoint`` servers, or sampling parameters on one."""

    kind: Literal["precision_mode", "sampling_parameters"]
    note: str
    reference: str
    variants: List[ComparisonVariant] = Field(default_factory=list)


class TokenAccountingAttempt(_Model):
    """One measured window: a fixed closed-loop load, counted by the client and the server."""

    client_output_tokens: int
    server_generation_tokens: Optional[float] = None
    wall_time_seconds: float
    relative_difference: Optional[float] = None
    server_idle_before: bool


class TokenAccounting(_Model):
    """Output tokens the client counted (``usage``) vs the server's own /metrics counter.

    Measured in a window of its own, started once the counter stands still. Other clients
    of the same server can only *add* to the server's count, so a window that disagrees is
    measured again (up to ``max_attempts``); the top-level figures are those of the first
    agreeing window, or of the last one. The concurrency sweep's totals are kept as well.
    """

    metric: str
    available: bool
    requests: int = 0
    concurrency: int = 0
    client_output_tokens: int = 0
    server_generation_tokens: Optional[float] = None
    wall_time_seconds: float = 0.0
    client_output_tokens_per_second: Optional[float] = None
    server_generation_tokens_per_second: Optional[float] = None
    relative_difference: Optional[float] = None
    tolerance: float = 0.10
    within_tolerance: Optional[bool] = None
    max_attempts: int = 3
    attempts: List[TokenAccountingAttempt] = Field(default_factory=list)
    sweep_client_output_tokens: int = 0
    sweep_server_generation_tokens: Optional[float] = None


class PerformanceSettings(_Model):
    """The sizes a performance run used (``--quick`` picks smaller ones)."""

    quick: bool
    max_tokens: int
    single_requests: int
    batch_size: int
    concurrency_levels: List[int]
    requests_per_level: Dict[str, int]
    streams: int
    comparison_requests: int
    accounting_requests: int
    accounting_concurrency: int
    client_batching_during_concurrency: bool = False


class PerformanceResults(SuiteResult):
    """``--performance`` (``<backend>_performance_<ts>.json``)."""

    suite: Literal["performance"] = "performance"
    settings: Optional[PerformanceSettings] = None
    single_inference: Optional[SingleInference] = None
    batch_inference: Optional[BatchInference] = None
    concurrency_scaling: List[ConcurrencyPoint] = Field(default_factory=list)
    streaming: Optional[StreamingStats] = None
    comparison: Optional[Comparison] = None
    token_accounting: Optional[TokenAccounting] = None
    plot_file: Optional[str] = None
    client_metrics: Dict[str, Any] = Field(default_factory=dict)


class SuiteSummary(_Model):
    """One suite's line in the summary."""

    status: Status
    passed: int
    failed: int
    skipped: int
    duration_seconds: float
    skip_reason: Optional[str] = None
    file: Optional[str] = None


class SummaryResults(RunInfo):
    """The whole run (``<backend>_summary_<ts>.json``)."""

    status: Status
    exit_code: int
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    modes_requested: List[str]
    server_note: str = ""
    suites: Dict[str, SuiteSummary] = Field(default_factory=dict)
    key_figures: Dict[str, Optional[float]] = Field(default_factory=dict)
    files: List[str] = Field(default_factory=list)


_FILE_PATTERNS = {
    "standard": "{backend}_test_results.json",
    "performance": "{backend}_performance_{ts}.json",
    "real": "{backend}_connection_{ts}.json",
    "embeddings": "{backend}_embeddings_{ts}.json",
    "summary": "{backend}_summary_{ts}.json",
    "plot": "{backend}_performance_{ts}.png",
}


def result_path(results_dir: Path, kind: str, backend: str, when: datetime) -> Path:
    """Where a result of ``kind`` goes; the name never contains a path separator."""
    name = _FILE_PATTERNS[kind].format(backend=safe_name(backend), ts=file_timestamp(when))
    return Path(results_dir) / name


def write_result(path: Path, result: BaseModel) -> Path:
    """Write ``result`` as indented JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(result.model_dump_json(indent=2))
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
