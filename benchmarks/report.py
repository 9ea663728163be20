"""Summaries, the project's ratios to each peer, pass/fail of the targets, JSON and PNG."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

# workload -> (metric key, unit, higher is better)
METRICS = {
    "W1": ("prompts_per_s", "prompts/s", True),
    "W2": ("p50_ms", "ms p50", False),
    "W3": ("cpu_ms_per_request", "ms CPU/request", False),
    "W4": ("chats_per_s", "chats/s", True),
    "W6": ("prompts_per_s", "prompts/s", True),
    "W7": ("embeddings_per_s", "embeddings/s", True),
}
TITLES = {
    "W1": "W1 throughput: {n} completions (max_tokens {max_tokens}), {concurrency} callers, real server",
    "W2": "W2 latency: {n} sequential requests (max_tokens {max_tokens}), real server",
    "W3": "W3 client CPU: {n} requests, {concurrency} callers, no-op server ({server})",
    "W4": "W4 chat throughput: {n} chats (max_tokens {max_tokens}), {concurrency} callers, real server",
    "W6": "W6 streaming throughput: {n} completion streams (max_tokens {max_tokens}), {concurrency} callers, real server",
    "W7": "W7 embeddings throughput: {n} single-text embed calls, {concurrency} callers, real embedding server ({model})",
}


def summarize(values: List[float]) -> Dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": statistics.median(values), "min": min(values),
            "max": max(values), "values": values}


def median_of(results: Dict[str, Any], workload: str, name: str) -> Optional[float]:
    row = results.get(workload, {}).get(name)
    if not row or not row["summary"].get("n"):
        return None
    return row["summary"]["median"]


def paired_difference(results: Dict[str, Any], workload: str, a: Optional[str],
                      b: Optional[str]) -> Optional[float]:
    """Row ``a`` minus row ``b``: W2 sends each prompt through every row in turn, so the
    median of the differences prompt by prompt (``lat_ms``: each pair saw the same server,
    milliseconds apart; a real server's spread, 10-25 ms here, cancels); else the median of
    the rounds' differences when both have every round; else the difference of medians."""
    rows = results.get(workload, {})
    if a not in rows or b not in rows:
        return None
    sa, sb = rows[a]["summary"], rows[b]["summary"]
    if not sa.get("n") or not sb.get("n"):
        return None
    pairs = [x - y for ra, rb in zip(rows[a].get("runs") or [], rows[b].get("runs") or [])
             if len(ra.get("lat_ms") or ()) == len(rb.get("lat_ms") or ())
             for x, y in zip(ra.get("lat_ms") or (), rb.get("lat_ms") or ())]
    if pairs and len(rows[a]["runs"]) == len(rows[b]["runs"]):
        return statistics.median(pairs)  # request by request: the same prompt, ms apart
    if sa["n"] == sb["n"]:
        return statistics.median(x - y for x, y in zip(sa["values"], sb["values"]))
    return sa["median"] - sb["median"]


def targets(results: Dict[str, Any], names: Dict[str, str]) -> List[Dict[str, Any]]:
    """The issue's targets, evaluated on this run's medians (ratio of medians)."""
    m = lambda w, key: median_of(results, w, names[key]) if key in names else None  # noqa: E731
    out: List[Dict[str, Any]] = []

    def ratio(label: str, w: str, a: str, b: str, op: str, limit: float) -> None:
        va, vb = m(w, a), m(w, b)
        if va is None or vb is None:
            out.append({"target": label, "value": None, "ok": None, "why": "not measured"})
            return
        r = va / vb
        ok = r >= limit if op == ">=" else r <= limit
        out.append({"target": label, "value": round(r, 3), "limit": f"{op} {limit}", "ok": ok})

    def within(label: str, w: str, a: str, b: str, ms: float) -> None:
        d = paired_difference(results, w, names.get(a), names.get(b))
        if d is None:
            out.append({"target": label, "value": None, "ok": None, "why": "not measured"})
            return
        out.append({"target": label, "value": round(d, 3), "limit": f"<= {ms} ms slower",
                    "ok": d <= ms})

    for key in ("on_c4", "on_c10", "on", "on_c64"):
        ratio(f"W1 {names[key]} / bare prompt lists", "W1", key, "bare", ">=", 0.95)
    ratio("W6 streams: project / aiohttp streams", "W6", "proj_stream", "aio_stream", ">=", 1.5)
    if "embed_on" in names:
        ratio("W7 embeddings: project embed / openai SDK embeddings.create", "W7", "embed_on",
              "embed_openai", ">=", 2.0)
        ratio("W7 embeddings: project embed (async) / openai SDK", "W7", "embed_async",
              "embed_openai", ">=", 2.0)
        ratio("W7 embeddings: project embed / aiohttp embeddings (not a target)", "W7",
              "embed_on", "embed_aio", ">=", 1.0)
    ratio("W6 streams: project async face / aiohttp streams", "W6", "proj_astream", "aio_stream",
          ">=", 1.5)
    # not a target: how far the ceiling itself is above separate streams, and the project below it
    ratio("W6 ceiling: bare prompt-list streams / aiohttp streams", "W6", "bare_stream",
          "aio_stream", ">=", 1.5)
    ratio("W6 streams: project / bare prompt-list streams", "W6", "proj_stream", "bare_stream",
          ">=", 0.9)
    ttft = [ttft_median(results, names[k]) for k in ("proj_stream", "aio_stream")]
    if None in ttft:
        out.append({"target": "W6 TTFT p50: project / aiohttp streams", "value": None, "ok": None,
                    "why": "not measured"})
    else:
        r = ttft[0] / ttft[1]  # type: ignore[operator]
        out.append({"target": "W6 TTFT p50: project / aiohttp streams", "value": round(r, 3),
                    "limit": "<= 1.2", "ok": r <= 1.2})
    ratio("W1 batching on: project / raw requests", "W1", "on", "requests", ">=", 2.0)
    ratio("W1 batching on: project / bare prompt lists", "W1", "on", "bare", ">=", 0.9)
    ratio("W1 batching off: project / raw requests", "W1", "off", "requests", ">=", 1.0)
    ratio("W1 batching off: project / openai SDK", "W1", "off", "openai", ">=", 1.1)
    within("W2 batching on: project p50 - raw requests p50", "W2", "on", "requests", 1.0)
    within("W2 batching off: project p50 - raw requests p50", "W2", "off", "requests", 1.0)
    ratio("W3 defaults (all on): project CPU / raw requests CPU", "W3", "on", "requests", "<=", 0.8)
    # issue 12: the sync face within 0.25x raw requests' CPU, the async face within 1.5x aiohttp's
    ratio("W3 sync face: project CPU / raw requests CPU", "W3", "on", "requests", "<=", 0.25)
    ratio("W3 async face: project (async) CPU / aiohttp CPU", "W3", "async", "aiohttp", "<=", 1.5)
    ratio("W3 defaults (all on): project CPU / aiohttp CPU", "W3", "on", "aiohttp", "<=", 2.0)
    ratio("W3 batching off, sync face: project CPU / raw requests CPU", "W3", "off", "requests",
          "<=", 0.35)
    ratio("W3 batching off, async face: project (async) CPU / aiohttp CPU", "W3", "async_off",
          "aiohttp", "<=", 1.5)
    ratio("256 submitted at once: batching on / off speed-up", "W1", "submit_on", "submit_off", ">=", 2.0)
    within("lone request p50: batching on - off", "W2", "on", "off", 1.0)
    # Not a target: what the best client with 32 prompts in flight reached in this run. The
    # first W1 target asks the project for more than this unless it is above 2.0.
    ceiling = ratio_of(m("W1", "bare"), m("W1", "requests"))
    out.append({"target": "bare prompt lists (32/request) / raw requests", "ok": None,
                "reference": True,
                "value": None if ceiling is None else round(ceiling, 3),
                "why": "the ceiling for 32 prompts in flight, not a target"})
    return out


def ttft_median(results: Dict[str, Any], name: str) -> Optional[float]:
    """W6: the median over the rounds of each round's TTFT p50 (ms)."""
    runs = results.get("W6", {}).get(name, {}).get("runs") or []
    vals = [r["ttft_p50_ms"] for r in runs if "ttft_p50_ms" in r]
    return statistics.median(vals) if vals else None


def ratio_of(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def table(results: Dict[str, Any], meta: Dict[str, Any], project_rows: Dict[str, List[str]]) -> str:
    """The text table: per workload, each contender's median [min-max] and the project's
    ratio to it (for W2 the difference in ms)."""
    lines: List[str] = []
    for w, rows in results.items():
        key, unit, higher = METRICS[w]
        lines.append("")
        lines.append(TITLES[w].format(**meta["workloads"][w]))
        projects = [p for p in project_rows.get(w, []) if p in rows]
        head = f"  {'client':42s} {'median':>9s} {'min-max':>17s}"
        for p in projects:
            head += f"  {short(p):>12s}"
        lines.append(head + f"   ({unit})")
        for name, row in rows.items():
            s = row["summary"]
            if not s.get("n"):
                lines.append(f"  {name:42s} {'-':>9s}   {row.get('error', 'not run')}")
                continue
            line = f"  {name:42s} {fmt(s['median']):>9s} {fmt(s['min']) + '-' + fmt(s['max']):>17s}"
            for p in projects:
                pm = rows[p]["summary"].get("median")
                if pm is None or name == p:
                    line += f"  {'':>12s}"
                elif w == "W2":
                    line += f"  {paired_difference(results, w, p, name):+11.2f}ms"
                else:
                    line += f"  {pm / s['median']:11.2f}x"
            extra = row.get("extra_summary")
            if extra:
                line += "   " + extra
            lines.append(line)
        if projects:
            lines.append("  (columns on the right: that project row's median over each row's median"
                         + ("; W2: project p50 minus the row's p50, the median of the prompt-by-prompt "
                            "differences" if w == "W2" else "") + ")")
    return "\n".join(lines)


def short(name: str) -> str:
    return (name.replace("project ", "").replace("(", "").replace(")", "")
            .replace("batching ", "b.").replace("batch_chat ", "chat ")
            .replace("submit all", "all")[:12])


def fmt(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}"


def write_json(path: Path, payload: Dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str))


def write_png(path: Path, results: Dict[str, Any], meta: Dict[str, Any]) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 5.5))
    if len(results) == 1:
        axes = [axes]
    for ax, (w, rows) in zip(axes, results.items()):
        key, unit, higher = METRICS[w]
        names = [n for n, r in rows.items() if r["summary"].get("n")]
        med = [rows[n]["summary"]["median"] for n in names]
        lo = [m - rows[n]["summary"]["min"] for n, m in zip(names, med)]
        hi = [rows[n]["summary"]["max"] - m for n, m in zip(names, med)]
        colors = ["tab:orange" if n.startswith("project") else "tab:blue" for n in names]
        ax.barh(range(len(names)), med, xerr=[lo, hi], color=colors, capsize=3)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(unit + (" (higher is better)" if higher else " (lower is better)"))
        ax.set_title(w, fontsize=10)
    fig.suptitle(f"ipfs_accelerate_py client vs peers, medians of {meta['rounds_done']} rounds "
                 "(bars: min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
