"""The performance PNG: latency distribution and throughput vs concurrency.

matplotlib is optional (the ``plot`` extra); without it no PNG is written and the JSON
says so (``plot_file`` is null).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .results import ConcurrencyPoint

__all__ = ["matplotlib_available", "write_plot"]


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401 - only whether it imports
    except ImportError:
        return False
    return True


def write_plot(path: Path, title: str, single_latencies: Sequence[float],
               level_latencies: Dict[int, List[float]],
               points: Sequence[ConcurrencyPoint]) -> Optional[Path]:
    """Write the two-panel PNG to ``path``; None when matplotlib is not installed."""
    if not matplotlib_available():
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and never a GUI window from a test run
    import matplotlib.pyplot as plt

    fig, (hist, scale) = plt.subplots(1, 2, figsize=(12, 4.5))
    try:
        series = [("sequential (1 at a time)", list(single_latencies))]
        if level_latencies:
            top = max(level_latencies)
            series.append((f"{top} concurrent", level_latencies[top]))
        for label, values in series:
            if values:
                hist.hist([v * 1000.0 for v in values], bins=min(30, max(5, len(values) // 2)),
                          alpha=0.6, label=f"{label}, n={len(values)}")
        hist.set_xlabel("request latency (ms)")
        hist.set_ylabel("requests (count)")
        hist.set_title("Latency distribution")
        hist.legend()

        levels = [p.concurrency for p in points]
        scale.plot(levels, [p.requests_per_second for p in points], "o-", color="tab:blue",
                   label="requests/s")
        scale.set_xscale("log", base=2)
        scale.set_xticks(levels, [str(c) for c in levels])
        scale.set_xlabel("concurrent requests (closed-loop workers)")
        scale.set_ylabel("throughput (requests/s)", color="tab:blue")
        tokens = scale.twinx()
        tokens.plot(levels, [p.client_output_tokens_per_second for p in points], "s--",
                    color="tab:orange", label="output tokens/s (client usage)")
        server = [p.server_generation_tokens_per_second for p in points]
        if all(v is not None for v in server):
            tokens.plot(levels, server, "x:", color="tab:red",
                        label="generation tokens/s (server /metrics)")
        tokens.set_ylabel("throughput (output tokens/s)", color="tab:orange")
        scale.set_title("Throughput vs concurrency")
        handles = scale.get_legend_handles_labels()
        more = tokens.get_legend_handles_labels()
        scale.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left")
        fig.suptitle(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
