"""``--performance``: measured figures, each phase also a pass/fail check.

Phases (sizes from ``config.perf_sizes``; ``--quick`` for tests):

* single inference: sequential requests -> latency distribution, output tokens/s;
* batch: ``batch_size`` prompts as ONE prompt-list request vs the same prompts one by one
  (backends without prompt lists: concurrent requests vs one by one) -> speedup factor;
* concurrency scaling at 1, 2, 4, 8, 16, 32 closed-loop workers (client batching off, so
  every request is its own HTTP call) -> requests/s, output tokens/s, latency;
* streaming: time to first token and time per output token;
* comparison: precision modes across ``--endpoint NAME=URL`` servers, or, with none given,
  sampling parameters on one server (labelled as such);
* token accounting: output tokens counted from ``usage`` vs the delta of the server's own
  ``vllm:generation_tokens_total`` counter, in a closed-loop window of its own started when
  the counter stands still (within 10 %; both recorded, per concurrency level too).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from ..api_backends.base import BaseApiBackend, build_request
from .checks import CheckRecorder, SkipCheck
from .config import PerfSizes, prompts
from .context import SuiteContext
from .probe import scrape, scrape_counter
from .results import (BatchInference, Comparison, ComparisonVariant, ConcurrencyPoint,
                      LatencyStats, PerformanceSettings, SingleInference, StreamingStats,
                      TokenAccounting, TokenAccountingAttempt)

__all__ = ["PerformanceRun", "latency_stats", "DEFAULT_TOKEN_METRIC", "TOKEN_TOLERANCE"]

#: the server counter that token accounting compares with (adapters may name another one
#: with a ``generation_tokens_metric`` class attribute)
DEFAULT_TOKEN_METRIC = "vllm:generation_tokens_total"
TOKEN_TOLERANCE = 0.10
#: how long to wait for the server's counter to catch up with the last replies
COUNTER_SETTLE_SECONDS = 3.0
#: windows measured at most before token accounting gives its verdict
ACCOUNTING_ATTEMPTS = 3
#: server histograms (``_sum``/``_count``) behind the streaming figures' server-side means
SERVER_TTFT_HISTOGRAM = "vllm:time_to_first_token_seconds"
SERVER_ITL_HISTOGRAM = "vllm:inter_token_latency_seconds"
SAMPLING_VARIANTS: Tuple[Tuple[str, Dict[str, Any]], ...] = (
    ("greedy", {"temperature": 0.0}),
    ("temperature_0.8", {"temperature": 0.8}),
    ("top_p_0.9", {"temperature": 1.0, "top_p": 0.9}),
)


def latency_stats(values: List[float]) -> LatencyStats:
    """Count, mean, p50/p90/p99, min and max of ``values`` (seconds)."""
    if not values:
        return LatencyStats(count=0)
    arr = np.asarray(values, dtype=float)
    p50, p90, p99 = (float(x) for x in np.percentile(arr, [50, 90, 99]))
    return LatencyStats(count=len(values), mean_seconds=float(arr.mean()), p50_seconds=p50,
                        p90_seconds=p90, p99_seconds=p99, min_seconds=float(arr.min()),
                        max_seconds=float(arr.max()))


def _rate(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else 0.0


class _Progress:
    """A thread-safe tqdm bar (or nothing, when tqdm is off)."""

    def __init__(self, total: int, desc: str, enabled: Optional[bool]) -> None:
        disable = None if enabled is None else not enabled  # None: only on a terminal
        self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=disable,
                         leave=False, dynamic_ncols=True)
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self._bar.update(n)

    def grow(self, n: int) -> None:
        with self._lock:
            self._bar.total += n
            self._bar.refresh()

    def phase(self, name: str) -> None:
        with self._lock:
            self._bar.set_postfix_str(name)

    def close(self) -> None:
        self._bar.close()


class PerformanceRun:
    """One performance run; each phase is a check and fills one field of the result."""

    def __init__(self, ctx: SuiteContext, sizes: PerfSizes) -> None:
        self.ctx = ctx
        self.sizes = sizes
        self.model = ctx.model
        self.metric = getattr(ctx.adapter, "generation_tokens_metric", DEFAULT_TOKEN_METRIC)
        self.single: Optional[SingleInference] = None
        self.batch: Optional[BatchInference] = None
        self.concurrency: List[ConcurrencyPoint] = []
        self.level_latencies: Dict[int, List[float]] = {}
        self.streaming: Optional[StreamingStats] = None
        self.comparison: Optional[Comparison] = None
        self.tokens: Optional[TokenAccounting] = None
        self.client_metrics: Dict[str, Any] = {}
        self._params = {"max_tokens": sizes.max_tokens, "temperature": 0.0}
        self.client: Optional[BaseApiBackend] = None
        self.progress: Optional[_Progress] = None

    # ------------------------------------------------------------------ public
    def settings(self) -> PerformanceSettings:
        s = self.sizes
        return PerformanceSettings(
            quick=s.quick, max_tokens=s.max_tokens, single_requests=s.single_requests,
            batch_size=s.batch_size, concurrency_levels=list(s.concurrency_levels),
            requests_per_level={str(c): s.requests_at(c) for c in s.concurrency_levels},
            streams=s.streams, comparison_requests=s.comparison_requests,
            accounting_requests=s.accounting_requests,
            accounting_concurrency=s.accounting_concurrency)

    def total_requests(self) -> int:
        s = self.sizes
        arms = len(self.ctx.config.endpoints) or len(SAMPLING_VARIANTS)
        return (s.warmup_requests + s.single_requests + 2 * s.batch_size
                + sum(s.requests_at(c) for c in s.concurrency_levels) + s.streams
                + arms * s.comparison_requests + s.accounting_requests)

    def run(self) -> CheckRecorder:
        recorder = CheckRecorder(self.ctx.out)
        top = max(self.sizes.concurrency_levels)
        self.progress = _Progress(self.total_requests(), f"{self.ctx.backend} performance",
                                  self.ctx.config.progress)
        try:
            with self.ctx.client(max_concurrent_requests=top, batch_enabled=False) as client:
                self.client = client
                self._warmup()
                recorder.run("single_inference", self._single)
                recorder.run("batch_inference", self._batch)
                recorder.run("concurrency_scaling", self._concurrency)
                recorder.run("token_accounting", self._token_accounting)
                recorder.run("streaming", self._streaming)
                recorder.run("comparison", self._comparison)
                self.client_metrics = _trim_metrics(client.get_metrics())
        finally:
            self.progress.close()
        return recorder

    # ------------------------------------------------------------------ phases
    def _infer(self, prompt: Any, params: Optional[Dict[str, Any]] = None,
               endpoint_id: Optional[str] = None, model: Optional[str] = None) -> Any:
        return self.client.run_inference(model or self.model, prompt, params or self._params,
                                         endpoint_id=endpoint_id)

    def _warmup(self) -> None:
        self.progress.phase("warm-up")
        for p in prompts(self.sizes.warmup_requests, "warmup-"):
            self._infer(p)
            self.progress.update()

    def _single(self, d: Dict[str, Any]) -> None:
        self.progress.phase("single")
        latencies: List[float] = []
        tokens = 0
        for p in prompts(self.sizes.single_requests, "single-"):
            start = time.perf_counter()
            result = self._infer(p)
            latencies.append(time.perf_counter() - start)
            tokens += result.usage.completion_tokens
            self.progress.update()
        total = sum(latencies)
        self.single = SingleInference(
            requests=len(latencies), max_tokens=self.sizes.max_tokens,
            latency=latency_stats(latencies), output_tokens=tokens,
            output_tokens_per_second=_rate(tokens, total), latencies_seconds=latencies)
        assert tokens > 0, "no output tokens in sequential requests"
        d.update(mean_seconds=self.single.latency.mean_seconds,
                 output_tokens_per_second=self.single.output_tokens_per_second)

    def _batch(self, d: Dict[str, Any]) -> None:
        self.progress.phase("batch")
        size = self.sizes.batch_size
        batch = prompts(size, "batch-")
        start = time.perf_counter()
        for p in batch:
            self._infer(p)
            self.progress.update()
        one_by_one = time.perf_counter() - start
        prompt_list = self.ctx.adapter.supports_prompt_list
        start = time.perf_counter()
        if prompt_list:
            result = self._infer(batch)
            tokens, http_requests = result.usage.completion_tokens, 1
            groups = len(result.texts_by_prompt())
            assert groups == size, f"{groups} results for {size} prompts"
        else:
            futures = [self.client.submit_inference(self.model, p, self._params) for p in batch]
            results = [f.result() for f in futures]
            tokens, http_requests = sum(r.usage.completion_tokens for r in results), size
        batch_time = time.perf_counter() - start
        self.progress.update(size)
        self.batch = BatchInference(
            mode="prompt_list" if prompt_list else "concurrent_requests", batch_size=size,
            max_tokens=self.sizes.max_tokens, http_requests=http_requests,
            batch_time_seconds=batch_time, one_by_one_time_seconds=one_by_one,
            batch_inputs_per_second=_rate(size, batch_time),
            one_by_one_inputs_per_second=_rate(size, one_by_one),
            batch_speedup_factor=_rate(one_by_one, batch_time), output_tokens=tokens)
        d.update(mode=self.batch.mode, batch_speedup_factor=self.batch.batch_speedup_factor)
        assert tokens > 0, "the batch produced no tokens"

    def _counter(self) -> Optional[float]:
        return scrape_counter(self.ctx.base_url, self.metric, self.ctx.timeout)

    def _settled_delta(self, before: Optional[float], expected: int) -> Optional[float]:
        """Counter delta since ``before``, waiting briefly for the server to count the last
        replies (its counter is updated as the engine reports, not per HTTP reply)."""
        if before is None:
            return None
        deadline = time.monotonic() + COUNTER_SETTLE_SECONDS
        while True:
            now = self._counter()
            if now is None:
                return None
            delta = now - before
            if delta >= expected or time.monotonic() >= deadline:
                return delta
            time.sleep(0.1)

    def _wait_idle(self) -> Tuple[Optional[float], bool]:
        """(counter value, True if it stood still for 0.3 s) - waits up to the settle time."""
        deadline = time.monotonic() + COUNTER_SETTLE_SECONDS
        last = self._counter()
        while last is not None:
            time.sleep(0.3)
            now = self._counter()
            if now == last:
                return now, True
            last = now
            if time.monotonic() >= deadline:
                break
        return last, False

    def _closed_loop(self, level: int, total: int, tag: str,
                     before: Optional[float]) -> Tuple[ConcurrencyPoint, List[float]]:
        """``total`` requests by ``level`` workers, each sending its next request as soon as
        the previous one returns; the server counter delta from ``before``."""
        work = iter(prompts(total, tag))
        lock = threading.Lock()
        latencies: List[float] = []
        tokens = [0]
        errors = [0]

        def worker() -> None:
            while True:
                with lock:
                    prompt = next(work, None)
                if prompt is None:
                    return
                start = time.perf_counter()
                try:
                    result = self._infer(prompt)
                except Exception:  # noqa: BLE001 - counted; the phase check fails on it
                    with lock:
                        errors[0] += 1
                else:
                    with lock:
                        latencies.append(time.perf_counter() - start)
                        tokens[0] += result.usage.completion_tokens
                finally:
                    self.progress.update()

        threads = [threading.Thread(target=worker, name=f"perf-{tag}{i}", daemon=True)
                   for i in range(level)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        server = self._settled_delta(before, tokens[0])
        point = ConcurrencyPoint(
            concurrency=level, requests=total, errors=errors[0], wall_time_seconds=wall,
            requests_per_second=_rate(len(latencies), wall), client_output_tokens=tokens[0],
            client_output_tokens_per_second=_rate(tokens[0], wall),
            server_generation_tokens=server,
            server_generation_tokens_per_second=None if server is None else _rate(server, wall),
            latency=latency_stats(latencies))
        return point, latencies

    def _concurrency(self, d: Dict[str, Any]) -> None:
        for level in self.sizes.concurrency_levels:
            self.progress.phase(f"concurrency {level}")
            point, latencies = self._closed_loop(level, self.sizes.requests_at(level),
                                                 f"c{level}-", self._counter())
            self.concurrency.append(point)
            self.level_latencies[level] = latencies
        errors = sum(p.errors for p in self.concurrency)
        d["requests_per_second"] = {str(p.concurrency): p.requests_per_second
                                    for p in self.concurrency}
        assert errors == 0, f"{errors} requests failed under load"

    def _token_accounting(self, d: Dict[str, Any]) -> None:
        s = self.sizes
        sweep_server = [p.server_generation_tokens for p in self.concurrency]
        acct = TokenAccounting(
            metric=self.metric, available=self._counter() is not None,
            requests=s.accounting_requests, concurrency=s.accounting_concurrency,
            tolerance=TOKEN_TOLERANCE, max_attempts=ACCOUNTING_ATTEMPTS,
            sweep_client_output_tokens=sum(p.client_output_tokens for p in self.concurrency),
            sweep_server_generation_tokens=(sum(sweep_server) if sweep_server and None not in
                                            sweep_server else None))  # type: ignore[arg-type]
        self.tokens = acct
        if not acct.available:
            self.progress.update(s.accounting_requests)
            raise SkipCheck(f"the server exports no {self.metric} on /metrics")
        self.progress.phase("token accounting")
        for attempt in range(ACCOUNTING_ATTEMPTS):
            if attempt:
                self.progress.grow(s.accounting_requests)
            before, idle = self._wait_idle()
            point, _ = self._closed_loop(s.accounting_concurrency, s.accounting_requests,
                                         f"tokens{attempt}-", before)
            server = point.server_generation_tokens
            diff = (None if server is None else
                    abs(point.client_output_tokens - server) / max(server, 1.0))
            acct.attempts.append(TokenAccountingAttempt(
                client_output_tokens=point.client_output_tokens, server_generation_tokens=server,
                wall_time_seconds=point.wall_time_seconds, relative_difference=diff,
                server_idle_before=idle))
            acct.client_output_tokens = point.client_output_tokens
            acct.server_generation_tokens = server
            acct.wall_time_seconds = point.wall_time_seconds
            acct.client_output_tokens_per_second = point.client_output_tokens_per_second
            acct.server_generation_tokens_per_second = point.server_generation_tokens_per_second
            acct.relative_difference = diff
            acct.within_tolerance = diff is not None and diff <= TOKEN_TOLERANCE
            # only other traffic (server counted MORE) justifies measuring again
            if acct.within_tolerance or server is None or server < point.client_output_tokens:
                break
        d.update(client_output_tokens=acct.client_output_tokens,
                 server_generation_tokens=acct.server_generation_tokens,
                 relative_difference=acct.relative_difference, attempts=len(acct.attempts))
        assert acct.server_generation_tokens is not None, f"{self.metric} disappeared"
        assert acct.within_tolerance, (
            f"client counted {acct.client_output_tokens} output tokens, the server's "
            f"{self.metric} rose by {acct.server_generation_tokens:g} "
            f"({acct.relative_difference:.1%} apart after {len(acct.attempts)} attempt(s); "
            f"other traffic on the server?)")

    def _streaming(self, d: Dict[str, Any]) -> None:
        if not self.ctx.adapter.supports_streaming:
            self.progress.update(self.sizes.streams)
            raise SkipCheck(f"backend {self.ctx.backend!r} does not stream")
        self.progress.phase("streaming")
        before = scrape(self.ctx.base_url, self.ctx.timeout)
        ttfts: List[float] = []
        tpots: List[float] = []
        totals: List[float] = []
        tokens = 0
        for p in prompts(self.sizes.streams, "stream-"):
            request = build_request(p, self.model, {**self._params,
                                                    "stream_options": {"include_usage": True}},
                                    stream=True)
            start = time.perf_counter()
            first = last = None
            pieces = 0
            with self.client.stream(request) as stream:
                for chunk in stream:
                    if chunk.text:
                        last = time.perf_counter()
                        first = first or last
                        pieces += 1
                usage = stream.usage
            end = time.perf_counter()
            assert first is not None and last is not None, "a stream carried no text"
            n = usage.completion_tokens if usage is not None else pieces
            tokens += n
            ttfts.append(first - start)
            totals.append(end - start)
            if n > 1:
                tpots.append((last - first) / (n - 1))
            self.progress.update()
        server_ttft, server_itl = self._server_stream_means(before, len(totals))
        self.streaming = StreamingStats(
            streams=len(totals), max_tokens=self.sizes.max_tokens,
            time_to_first_token=latency_stats(ttfts), time_per_output_token=latency_stats(tpots),
            total_time=latency_stats(totals), output_tokens=tokens,
            server_time_to_first_token_mean_seconds=server_ttft,
            server_inter_token_latency_mean_seconds=server_itl)
        d.update(ttft_p50_seconds=self.streaming.time_to_first_token.p50_seconds,
                 tpot_p50_seconds=self.streaming.time_per_output_token.p50_seconds)

    def _server_stream_means(self, before: Any, streams: int
                             ) -> Tuple[Optional[float], Optional[float]]:
        """Mean TTFT and inter-token latency the server recorded for the last ``streams``
        requests (None when it exports no such histograms)."""
        if before is None:
            return None, None
        deadline = time.monotonic() + COUNTER_SETTLE_SECONDS
        while True:
            after = scrape(self.ctx.base_url, self.ctx.timeout)
            if after is None:
                return None, None

            def delta(name: str) -> Optional[float]:
                a, b = after.value(name), before.value(name)
                return None if a is None or b is None else a - b

            count = delta(SERVER_TTFT_HISTOGRAM + "_count")
            if count is None or count >= streams or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        means = []
        for name in (SERVER_TTFT_HISTOGRAM, SERVER_ITL_HISTOGRAM):
            total, n = delta(name + "_sum"), delta(name + "_count")
            means.append(total / n if total is not None and n else None)
        return means[0], means[1]

    def _comparison(self, d: Dict[str, Any]) -> None:
        self.progress.phase("comparison")
        endpoints = self.ctx.config.endpoints
        if endpoints:
            arms = [(name, url, {"temperature": 0.0}) for name, url in endpoints.items()]
            kind, note = "precision_mode", (
                "the same greedy requests sent to each --endpoint server (e.g. one per "
                "precision or quantization mode); outputs compared with the first")
        else:
            arms = [(name, None, params) for name, params in SAMPLING_VARIANTS]
            kind, note = "sampling_parameters", (
                "no --endpoint NAME=URL given, so this is NOT a precision-mode comparison: it "
                "compares sampling parameters on one server (the same prompt, seed = request "
                "number); outputs compared with greedy")
        reference: Optional[List[str]] = None
        variants: List[ComparisonVariant] = []
        for name, url, params in arms:
            variant, outputs = self._arm(name, url, params)
            if reference is None:
                reference = outputs
            elif outputs and reference:
                same = sum(a == b for a, b in zip(outputs, reference))
                variant.same_output_as_reference_ratio = same / min(len(outputs), len(reference))
            variants.append(variant)
        self.comparison = Comparison(kind=kind, note=note, reference=arms[0][0],
                                     variants=variants)
        d.update(kind=kind, arms=[v.name for v in variants])
        broken = [f"{v.name}: {v.error}" for v in variants if v.errors]
        assert not broken, f"comparison arms failed: {broken}"

    def _arm(self, name: str, url: Optional[str],
             params: Dict[str, Any]) -> Tuple[ComparisonVariant, List[str]]:
        count = self.sizes.comparison_requests
        endpoint_id = None
        model = self.model
        error: Optional[str] = None
        latencies: List[float] = []
        outputs: List[str] = []
        tokens = 0
        try:
            if url is not None:
                endpoint_id = self.client.add_endpoint(f"compare-{name}", base_url=url)
                if self.ctx.config.model == "default":
                    listed = self.client.list_models(endpoint_id)
                    model = str(listed[0]["id"]) if listed else self.model
        except Exception as exc:  # noqa: BLE001 - this arm fails, the others still run
            error = f"{type(exc).__name__}: {exc}"
        for i in range(count if error is None else 0):
            # one prompt for every request of an arm: differences come from the arm alone
            request_params = {"max_tokens": self.sizes.max_tokens, **params}
            if params.get("temperature", 0.0) > 0:
                request_params["seed"] = i
            prompt = "Describe the ocean in one sentence." if url is None else prompts(count)[i]
            start = time.perf_counter()
            try:
                result = self._infer(prompt, request_params, endpoint_id, model)
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
                break
            finally:
                self.progress.update()
            latencies.append(time.perf_counter() - start)
            outputs.append(result.text)
            tokens += result.usage.completion_tokens
        variant = ComparisonVariant(
            name=name, endpoint_url=url, parameters=params, requests=len(latencies),
            errors=0 if error is None else 1, latency=latency_stats(latencies),
            output_tokens_per_second=_rate(tokens, sum(latencies)) if latencies else None,
            distinct_outputs=len(set(outputs)), error=error)
        return variant, outputs


def _trim_metrics(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """The client's own totals (not per model/endpoint: those repeat the same numbers)."""
    keep = ("requests", "successes", "failures", "failures_by_type", "retries", "streams",
            "gen_ai.client.token.usage", "gen_ai.client.operation.duration",
            "queue_wait_seconds", "gen_ai.server.time_to_first_token", "circuit_state")
    return {k: metrics[k] for k in keep if k in metrics}

