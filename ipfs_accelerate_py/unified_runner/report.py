"""Plain-text tables printed at the end of a run."""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

from .results import PerformanceResults, SummaryResults

__all__ = ["table", "summary_table", "performance_table"]


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A left-aligned text table with a rule under the header."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _num(value: Optional[float], fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _clip(text: str, limit: int = 60) -> str:
    """Long reasons stay in the JSON; the table shows their start."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary_table(summary: SummaryResults) -> str:
    rows = [[name, s.status.upper(), str(s.passed), str(s.failed), str(s.skipped),
             f"{s.duration_seconds:.1f}", _clip(s.skip_reason or "")]
            for name, s in summary.suites.items()]
    return table(["suite", "status", "passed", "failed", "skipped", "seconds", "note"], rows)


def performance_table(perf: PerformanceResults) -> str:
    rows: List[List[str]] = []
    if perf.single_inference:
        s = perf.single_inference
        rows.append(["single inference latency, mean / p90", f"{_num(s.latency.mean_seconds)} / "
                     f"{_num(s.latency.p90_seconds)} s"])
        rows.append(["single inference output tokens/s",
                     _num(s.output_tokens_per_second, "{:.1f}")])
    if perf.batch_inference:
        b = perf.batch_inference
        rows.append([f"batch of {b.batch_size} ({b.mode}) time", f"{b.batch_time_seconds:.3f} s"])
        rows.append([f"same {b.batch_size} one by one", f"{b.one_by_one_time_seconds:.3f} s"])
        rows.append(["batch inputs/s", f"{b.batch_inputs_per_second:.1f}"])
        rows.append(["batch speedup factor", f"{b.batch_speedup_factor:.2f}x"])
    for p in perf.concurrency_scaling:
        rows.append([f"concurrency {p.concurrency}: req/s, tok/s, p50",
                     f"{p.requests_per_second:.1f}, {p.client_output_tokens_per_second:.0f}, "
                     f"{_num(p.latency.p50_seconds)} s"])
    if perf.token_accounting and perf.token_accounting.available:
        t = perf.token_accounting
        rows.append(["output tokens client / server /metrics",
                     f"{t.client_output_tokens} / {_num(t.server_generation_tokens, '{:.0f}')} "
                     f"({_num(t.relative_difference, '{:.1%}')} apart)"])
    if perf.streaming:
        st = perf.streaming
        rows.append(["time to first token p50",
                     f"{_num(st.time_to_first_token.p50_seconds, '{:.4f}')} s"])
        rows.append(["time per output token p50",
                     f"{_num(st.time_per_output_token.p50_seconds, '{:.4f}')} s"])
        if st.server_time_to_first_token_mean_seconds is not None:
            rows.append(["server /metrics: TTFT mean, inter-token mean",
                         f"{_num(st.server_time_to_first_token_mean_seconds, '{:.4f}')} s, "
                         f"{_num(st.server_inter_token_latency_mean_seconds, '{:.4f}')} s"])
    if perf.comparison:
        for v in perf.comparison.variants:
            rows.append([f"{perf.comparison.kind}: {v.name} mean / tok/s",
                         f"{_num(v.latency.mean_seconds)} s / "
                         f"{_num(v.output_tokens_per_second, '{:.1f}')}"])
    return table(["figure", "value"], rows)
