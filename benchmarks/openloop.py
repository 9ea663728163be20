"""W5 (open-loop Poisson arrivals) and W6 (streaming throughput with TTFT) for benchmarks/run.py.

W5 is the usual production shape: independent requests arrive at a rate, whatever the
latency. Each contender gets Poisson arrivals for ``duration`` seconds at a rate stepped up
by ``factor`` until its p99 latency (from each request's scheduled arrival to its answer, so
a client that queues internally pays for it) passes ``bound`` seconds or more than 1 % fail;
its sustained rate is the last step that stayed under. At every step the contenders still
in the race run one after another in a rotated order (interleaved), each on its own arrival
schedule drawn from the same seed.

W6 is W1 streamed: every prompt a completion stream, ``concurrency`` closed-loop callers;
prompts/s and the time to the first text chunk, measured by the caller for every client.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence

import contenders as C
from ipfs_accelerate_py.api_backends.base import build_request

#: Threads the thread-based peers get for open-loop arrivals (one request each in flight).
OPEN_LOOP_THREADS = 256


def arrival_times(rate: float, duration: float, seed: int) -> List[float]:
    """Poisson arrivals: exponential gaps of mean ``1/rate``, within ``duration`` seconds."""
    rng = random.Random(seed)
    out: List[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _pace(t0: float, at: float) -> None:
    delay = t0 + at - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


# --------------------------------------------------------------------------- W5 drivers
class OpenLoopDriver:
    """Sends each prompt at its arrival time; returns each request's latency (inf: failed)."""

    name = ""

    def run(self, prompts: Sequence[str], times: Sequence[float]) -> List[float]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ThreadedDriver(OpenLoopDriver):
    """A thread-based peer: each arrival is handed to a pool thread that calls ``one``."""

    def __init__(self, contender: C.Contender) -> None:
        self.c = contender
        self.name = contender.name
        self._pool = ThreadPoolExecutor(OPEN_LOOP_THREADS, thread_name_prefix="bench-open")

    def run(self, prompts: Sequence[str], times: Sequence[float]) -> List[float]:
        t0 = time.perf_counter()

        def timed(p: str, at: float) -> float:
            try:
                self.c.one(p)
            except Exception:  # noqa: BLE001 - counted as failed
                return math.inf
            return time.perf_counter() - (t0 + at)

        futs = []
        for p, at in zip(prompts, times):
            _pace(t0, at)
            futs.append(self._pool.submit(timed, p, at))
        return [f.result() for f in futs]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.c.close()


class ProjectDriver(OpenLoopDriver):
    """The project as a service would use it: ``submit_inference`` at each arrival (it
    returns at once), the answer timed by the future's callback."""

    def __init__(self, contender: C.Project) -> None:
        self.c = contender
        self.name = contender.name

    def run(self, prompts: Sequence[str], times: Sequence[float]) -> List[float]:
        out: List[float] = [math.inf] * len(prompts)
        done = threading.Semaphore(0)
        t0 = time.perf_counter()
        client, model, params = self.c.client, self.c.model, self.c.params

        def finished(i: int, at: float, fut: "Future[Any]") -> None:
            if fut.exception() is None and fut.result().usage.completion_tokens == params["max_tokens"]:
                out[i] = time.perf_counter() - (t0 + at)
            done.release()

        for i, (p, at) in enumerate(zip(prompts, times)):
            _pace(t0, at)
            fut = client.submit_inference(model, p, params)
            fut.add_done_callback(lambda f, i=i, at=at: finished(i, at, f))
        for _ in prompts:
            done.acquire(timeout=C.TIMEOUT)
        return out

    def close(self) -> None:
        self.c.close()


class AioDriver(OpenLoopDriver):
    """aiohttp: one task per arrival on one event loop."""

    def __init__(self, contender: C.AioHttp) -> None:
        self.c = contender
        self.name = contender.name

    def run(self, prompts: Sequence[str], times: Sequence[float]) -> List[float]:
        async def go() -> List[float]:
            loop = asyncio.get_running_loop()
            t0 = loop.time()

            async def timed(p: str, at: float) -> float:
                try:
                    await self.c._one(p)
                except Exception:  # noqa: BLE001
                    return math.inf
                return loop.time() - (t0 + at)

            tasks = []
            for p, at in zip(prompts, times):
                delay = t0 + at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(timed(p, at)))
            return list(await asyncio.gather(*tasks))
        return self.c._loop.run_until_complete(go())

    def close(self) -> None:
        self.c.close()


def percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return math.nan
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _w5_step(d: OpenLoopDriver, rate: float, k: int, duration: float, bound: float,
             prompts: Callable[[int, str], List[str]], phase: str,
             log: Callable[[str], None]) -> Dict[str, Any]:
    """One driver at one Poisson rate for ``duration`` seconds: its row (``passed`` set)."""
    times = arrival_times(rate, duration, seed=1000 + k)
    lat = d.run(prompts(len(times), f"w5-{k}-{d.name[:8]}"), times)
    ok = [x for x in lat if math.isfinite(x)]
    failed = len(lat) - len(ok)
    p99 = percentile(lat, 0.99)
    row = {"rate": round(rate, 1), "phase": phase, "requests": len(lat), "failed": failed,
           "p50_ms": percentile(lat, 0.5) * 1000, "p99_ms": p99 * 1000,
           "achieved_per_s": len(ok) / (times[-1] + (max(ok) if ok else 0.0)) if times else 0.0,
           "passed": p99 <= bound and failed <= 0.01 * len(lat)}
    log(f"[bench] W5 {d.name}: {rate:.0f}/s ({phase}) p50 {row['p50_ms']:.0f} ms p99 "
        f"{'inf' if not math.isfinite(p99) else f'{p99 * 1000:.0f}'} ms"
        f"{' (failed ' + str(failed) + ')' if failed else ''}{'' if row['passed'] else '  <- over'}")
    return row


def run_w5(drivers: List[OpenLoopDriver], prompts: Callable[[int, str], List[str]],
           start_rate: float, factor: float, duration: float, bound: float, max_steps: int,
           log: Callable[[str], None], budget_left: Callable[[], float],
           refine: int = 2) -> Dict[str, Any]:
    """Step every driver's rate up by ``factor`` until its p99 passes ``bound``, interleaved
    per step; then ``refine`` rounds of geometric bisection between each driver's last
    passing and first failing rate (the drivers still refining interleaved, rotated), so
    the sustained rate is known to ``factor ** (1 / 2 ** refine)`` (x1.057 for the
    defaults), not to a whole step: with x1.25 steps a ratio of two sustained rates could
    only be a power of 1.25 (1.56x or 1.95x, nothing between)."""
    steps: Dict[str, List[Dict[str, Any]]] = {d.name: [] for d in drivers}
    sustained: Dict[str, Optional[float]] = {d.name: None for d in drivers}
    failed_at: Dict[str, float] = {}
    active = list(drivers)
    rate = start_rate
    k = 0
    for k in range(max_steps):
        if not active or budget_left() < duration * len(active) * 1.5:
            break
        order = active[k % len(active):] + active[:k % len(active)]
        for d in order:
            row = _w5_step(d, rate, k, duration, bound, prompts, "step", log)
            steps[d.name].append(row)
            if row["passed"]:
                sustained[d.name] = rate
            else:
                failed_at[d.name] = rate
                active.remove(d)
        rate *= factor
    for r in range(refine):
        racing = [d for d in drivers if sustained[d.name] is not None and d.name in failed_at]
        if not racing or budget_left() < duration * len(racing) * 1.5:
            break
        k += 1
        for d in racing[r % len(racing):] + racing[:r % len(racing)]:
            low, high = sustained[d.name], failed_at[d.name]
            mid = math.sqrt(low * high)  # type: ignore[operator]
            row = _w5_step(d, mid, k, duration, bound, prompts, f"refine {r + 1}", log)
            steps[d.name].append(row)
            if row["passed"]:
                sustained[d.name] = mid
            else:
                failed_at[d.name] = mid
    return {"steps": steps, "sustained_per_s": sustained, "first_failed_per_s": failed_at,
            "bound_s": bound, "duration_s": duration, "factor": factor, "refine": refine}


def w5_table(w5: Dict[str, Any], project: str) -> str:
    sus = w5["sustained_per_s"]
    lines = ["", f"W5 open-loop Poisson arrivals, rate x{w5['factor']} per step "
                 f"(then {w5.get('refine', 0)} bisections), "
                 f"{w5['duration_s']:.1f} s per step: highest rate with p99 <= {w5['bound_s']:.1f} s",
             f"  {'client':42s} {'sustained/s':>11s}  {'p99 ms there':>12s}  {'project x':>9s}"]
    pv = sus.get(project)
    for name, rate in sus.items():
        at = [s for s in w5["steps"][name] if rate is not None and s["rate"] == round(rate, 1)
              and s.get("passed", True)]
        p99 = f"{at[0]['p99_ms']:.0f}" if at else "-"
        ratio = f"{pv / rate:.2f}x" if pv and rate and name != project else ""
        lines.append(f"  {name:42s} {('%.0f' % rate) if rate else '-':>11s}  {p99:>12s}  {ratio:>9s}")
    return "\n".join(lines)


def write_w5_png(path: Any, w5: Dict[str, Any], w1: Dict[str, Dict[str, float]]) -> Optional[str]:
    """Throughput against latency (W5: p99 at each offered rate), and W1 at each
    ``max_concurrent_requests`` beside the ceiling (bars: min-max over the rounds)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    for name, rows in w5["steps"].items():
        style = "-o" if name.startswith("project") else "--s"
        ax.plot([r["achieved_per_s"] for r in rows], [min(r["p99_ms"], 5000) for r in rows], style,
                label=name, markersize=4)
    ax.axhline(w5["bound_s"] * 1000, color="grey", linewidth=0.8)
    ax.set_xlabel("throughput (answers/s) at each offered Poisson rate")
    ax.set_ylabel("p99 latency, ms (capped at 5000)")
    ax.set_yscale("log")
    ax.set_title(f"W5: p99 against throughput (line: the {w5['bound_s']:.0f} s bound)")
    ax.legend(fontsize=7)
    ax = axes[1]
    names = list(w1)
    med = [w1[n]["median"] for n in names]
    err = [[m - w1[n]["min"] for n, m in zip(names, med)], [w1[n]["max"] - m for n, m in zip(names, med)]]
    ax.barh(range(len(names)), med, xerr=err, capsize=3,
            color=["tab:orange" if n.startswith("project") else "tab:blue" for n in names])
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("W1 prompts/s (32 closed-loop callers)")
    ax.set_title("W1 at each max_concurrent_requests vs the 32-prompt-list ceiling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------- W6 contenders
def _stream_params(params: Dict[str, Any]) -> Dict[str, Any]:
    return {**params, "stream": True, "stream_options": {"include_usage": True}}


def closed_loop_streams(loop: asyncio.AbstractEventLoop, n: int, prompts: Sequence[str],
                        one: Callable[[str], Any]) -> Dict[str, Any]:
    """``n`` tasks on ``loop``, each streaming its next prompt as soon as its last one ended
    (``one(prompt)`` -> its TTFT); the wall time and every prompt's TTFT."""
    async def many() -> List[float]:
        out: List[float] = [0.0] * len(prompts)
        work = iter(enumerate(prompts))

        async def worker() -> None:
            for i, p in work:
                out[i] = await one(p)
        await asyncio.gather(*(worker() for _ in range(n)))
        return out
    t0 = time.perf_counter()
    ttft = loop.run_until_complete(many())
    return {"wall_s": time.perf_counter() - t0, "prompts": len(prompts), "ttft": ttft}


class AioHttpStream(C.AioHttp):
    """aiohttp, every prompt its own stream: SSE lines parsed, first text timed."""

    name = "aiohttp streams"
    note = "one ClientSession, N tasks, one SSE stream per prompt"

    async def _stream_one(self, prompt: str) -> float:
        t0 = time.perf_counter()
        ttft: Optional[float] = None
        tokens = None
        body = {"model": self.model, "prompt": prompt, **_stream_params(self.params)}
        async with self._session.post(self._endpoint, json=body) as r:
            r.raise_for_status()
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if ttft is None and any(c.get("text") for c in event.get("choices") or ()):
                    ttft = time.perf_counter() - t0
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        C._check(tokens, self.expect)
        return ttft if ttft is not None else math.inf

    def throughput(self, callers: C.Callers, prompts: Sequence[str]) -> Dict[str, Any]:
        return closed_loop_streams(self._loop, callers.n, prompts, self._stream_one)


class BareListStream(C.AioHttp):
    """The ceiling of batched streaming for N closed-loop callers: the prompts as N-prompt
    list streams (aiohttp), one call at a time, every event parsed and sorted by its
    choice ``index``; TTFT per prompt from its call's start. What a perfect batcher of N
    callers could send; no client-side queueing, threads or callers to hand chunks to."""

    name = "bare prompt-list streams"
    note = "aiohttp, one N-prompt list stream at a time, events sorted by choice index"

    def __init__(self, url: str, model: str, params: Dict[str, Any], per_request: int) -> None:
        super().__init__(url, model, params, 1)
        self.per_request = per_request

    async def _stream_list(self, prompts: Sequence[str]) -> List[float]:
        t0 = time.perf_counter()
        first: List[Optional[float]] = [None] * len(prompts)
        texts: List[List[str]] = [[] for _ in prompts]
        body = {"model": self.model, "prompt": list(prompts), **_stream_params(self.params)}
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        async with self._session.post(self._endpoint, json=body) as r:
            r.raise_for_status()
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                for c in json.loads(line[6:]).get("choices") or ():
                    i = c["index"]
                    if c.get("text"):
                        texts[i].append(c["text"])
                        if first[i] is None:
                            first[i] = time.perf_counter() - t0
        return [math.inf if f is None else f for f in first]

    def throughput(self, callers: C.Callers, prompts: Sequence[str]) -> Dict[str, Any]:
        async def many() -> List[float]:
            out: List[float] = []
            for k in range(0, len(prompts), self.per_request):
                out += await self._stream_list(prompts[k:k + self.per_request])
            return out
        t0 = time.perf_counter()
        ttft = self._loop.run_until_complete(many())
        return {"wall_s": time.perf_counter() - t0, "prompts": len(prompts), "ttft": ttft}


class ProjectStream(C.Project):
    """The project's ``stream()``: compatible concurrent streams share prompt-list calls."""

    def one_stream(self, prompt: str) -> float:
        t0 = time.perf_counter()
        ttft: Optional[float] = None
        s = self.client.stream(build_request(prompt, self.model, _stream_params(self.params),
                                             adapter=self.client.adapter))
        for chunk in s:
            if ttft is None and chunk.text:
                ttft = time.perf_counter() - t0
        C._check(s.usage.completion_tokens if s.usage else None, self.expect)
        return ttft if ttft is not None else math.inf

    def throughput(self, callers: C.Callers, prompts: Sequence[str]) -> Dict[str, Any]:
        t0 = time.perf_counter()
        ttft = callers.run(self.one_stream, prompts)
        return {"wall_s": time.perf_counter() - t0, "prompts": len(prompts), "ttft": ttft}


class ProjectAsyncStream(C.Project):
    """The project's ``astream()`` on one event loop: N tasks, each streaming its prompts one
    after another; compatible streams share prompt-list calls as the sync face's do."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop = asyncio.new_event_loop()

    async def _stream_one(self, prompt: str) -> float:
        t0 = time.perf_counter()
        ttft: Optional[float] = None
        request = build_request(prompt, self.model, _stream_params(self.params),
                                adapter=self.client.adapter)
        async with self.client.astream(request) as s:
            async for chunk in s:
                if ttft is None and chunk.text:
                    ttft = time.perf_counter() - t0
            usage = s.usage
        C._check(usage.completion_tokens if usage else None, self.expect)
        return ttft if ttft is not None else math.inf

    def throughput(self, callers: C.Callers, prompts: Sequence[str]) -> Dict[str, Any]:
        return closed_loop_streams(self._loop, callers.n, prompts, self._stream_one)

    def close(self) -> None:
        self._loop.run_until_complete(self.client.aclose())
        self._loop.close()


def ttft_p50_ms(ttft: Sequence[float]) -> float:
    return statistics.median(ttft) * 1000.0
