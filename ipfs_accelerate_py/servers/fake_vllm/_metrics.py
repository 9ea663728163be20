"""The ``/metrics`` the double serves: vLLM's series, counting what the double really served.

Why the care over number formatting: clients parse this text as they parse the real server's,
so values render the way the Prometheus Python client (which vLLM uses) renders them.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections import Counter
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from ._generation import _Choice

#: Token slots the real KV cache holds (64 MiB at 1 KiB per token); scales kv_cache_usage_perc.
KV_CACHE_TOKENS = 65_536

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
_FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


def _prom_float(v: float) -> str:
    """Render a sample value the way the Prometheus Python client does ("1.0", "+Inf", "1.2e+09")."""
    if v == float("inf"):
        return "+Inf"
    if v == float("-inf"):
        return "-Inf"
    if v != v:
        return "NaN"
    s = repr(float(v))
    dot = s.find(".")
    if v > 0 and dot > 6 and "e" not in s:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0").rstrip(".")
        return f"{mantissa}e+0{dot - 1}"
    return s


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot: +Inf only
        self.total = 0.0
        self.n = 0

    def observe(self, value: float, weight: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += weight
        self.total += value * weight
        self.n += weight

    def render(self, name: str, labels: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cum = 0
        for bound, c in zip(self.bounds + (float("inf"),), self.counts):
            cum += c
            le = "+Inf" if bound == float("inf") else _prom_float(bound)
            lines.append(f'{name}_bucket{{engine="0",le="{le}",{labels}}} {_prom_float(cum)}')
        lines.append(f"{name}_count{{engine=\"0\",{labels}}} {_prom_float(self.n)}")
        lines.append(f"{name}_sum{{engine=\"0\",{labels}}} {_prom_float(self.total)}")
        return lines


class _Metrics:
    """The vLLM series clients read, counting what the double served (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.kv_tokens = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success: Counter[str] = Counter()
        self.ttft = _Histogram(_TTFT_BUCKETS)
        self.e2e = _Histogram(_E2E_BUCKETS)
        self.itl = _Histogram(_ITL_BUCKETS)

    def finish(self, prompt_tokens: int, choices: Sequence[_Choice], ttft: float, e2e: float) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            for ch in choices:
                n = len(ch.ids)
                self.generation_tokens += n
                self.success[ch.finish_reason] += 1
                self.ttft.observe(ttft)
                self.e2e.observe(e2e)
                if n > 1:
                    self.itl.observe(max(e2e - ttft, 0.0) / (n - 1), n - 1)

    def load_report(self, fmt: str, waiting_override: float | None = None) -> str | None:
        """The ``endpoint-load-metrics`` value vLLM sends for ``fmt`` (JSON or TEXT), else None;
        ``waiting_override`` replaces the double's own waiting count (a scripted queue)."""
        with self.lock:
            waiting = float(self.waiting if waiting_override is None else waiting_override)
            kv = min(self.kv_tokens / KV_CACHE_TOKENS, 1.0)
        fmt = fmt.strip().upper()
        if fmt == "JSON":
            return "JSON " + json.dumps({"named_metrics": {"num_requests_waiting": waiting, "kv_cache_usage_perc": kv}})
        if fmt == "TEXT":
            return f"TEXT named_metrics.num_requests_waiting={waiting!r}, named_metrics.kv_cache_usage_perc={kv!r}"
        return None

    def render(self, model: str) -> bytes:
        labels = f'model_name="{model}"'
        base = f'{{engine="0",{labels}}}'
        with self.lock:
            lines = [
                "# HELP vllm:num_requests_running Number of requests in model execution batches.",
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running{base} {_prom_float(self.running)}",
                "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
                "# TYPE vllm:num_requests_waiting gauge",
                f"vllm:num_requests_waiting{base} {_prom_float(self.waiting)}",
                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f"vllm:kv_cache_usage_perc{base} {_prom_float(min(self.kv_tokens / KV_CACHE_TOKENS, 1.0))}",
                "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
                "# TYPE vllm:prompt_tokens_total counter",
                f"vllm:prompt_tokens_total{base} {_prom_float(self.prompt_tokens)}",
                "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
                "# TYPE vllm:generation_tokens_total counter",
                f"vllm:generation_tokens_total{base} {_prom_float(self.generation_tokens)}",
                "# HELP vllm:request_success_total Count of successfully processed requests.",
                "# TYPE vllm:request_success_total counter",
            ]
            lines += [
                f'vllm:request_success_total{{engine="0",finished_reason="{r}",{labels}}} {_prom_float(self.success[r])}'
                for r in _FINISH_REASONS
            ]
            lines += self.ttft.render("vllm:time_to_first_token_seconds", labels, "Histogram of time to first token in seconds.")
            lines += self.itl.render("vllm:inter_token_latency_seconds", labels, "Histogram of inter-token latency in seconds.")
            lines += self.e2e.render("vllm:e2e_request_latency_seconds", labels, "Histogram of e2e request latency in seconds.")
        return ("\n".join(lines) + "\n").encode("utf-8")
