#!/usr/bin/env python3
"""Figures for the batch job (issue 25), each a command; loopback only; every server and job
this starts is stopped by its PID.

    python benchmarks/batch_jobs.py crash-resume [--n 10000] [--kill-at 0.4] [--url URL]
        mixed completions/chats (max_tokens 2) against the real server (started here unless
        --url), the job's process group SIGKILLed once kill-at of the lines are written,
        then rerun: every custom id once, every line a 200.
    python benchmarks/batch_jobs.py server-restart [--n 3000] [--kill-at 0.3]
        the real server SIGKILLed once kill-at of the lines are written, restarted on the
        same port; the job runs on: every id once, 0 error lines.
    python benchmarks/batch_jobs.py million [--n 1000000]
        an N-line input against benchmarks/noop_server.py; the job's peak RSS.
    python benchmarks/batch_jobs.py vs-ray-http [--n 5000]
        one real server, the same completions file: Ray Data's HttpRequestProcessorConfig
        (defaults; max_retries=3) against this job (local; --ray), without a fault, then with
        the server SIGKILLed at 30 % of the contender's clean wall time and restarted.
    python benchmarks/batch_jobs.py ray [--n 10000] [--servers 2]
        the same file on a local Ray, two actors over two real servers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))


def write_input(path: Path, n: int, noop: bool = False) -> None:
    with open(path, "w") as f:
        for i in range(n):
            if noop or i % 2:
                body = {"model": "tiny-llama", "prompt": f"hello number {i}", "max_tokens": 2}
                url = "/v1/completions"
            else:
                body = {"model": "tiny-llama", "max_tokens": 2,
                        "messages": [{"role": "user", "content": f"hi number {i}"}]}
                url = "/v1/chat/completions"
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url,
                                "body": body}) + "\n")


def env(**extra: str) -> Dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra)
    return e


def job(args: List[str], cwd: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ipfs_accelerate_py.batch", "run", *args,
                             "--no-progress", "--summary-dir", str(cwd / "results")],
                            cwd=str(cwd), env=env(**extra), start_new_session=True)


def lines_in(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def check(out: Path, n: int) -> Dict[str, int]:
    counts: Counter = Counter()
    status: Counter = Counter()
    with open(out, "rb") as f:
        data = f.read()
    for raw in data.splitlines():
        row = json.loads(raw)
        counts[row["custom_id"]] += 1
        status[(row.get("response") or {}).get("status_code")] += 1
    return {"lines": sum(counts.values()), "distinct_ids": len(counts),
            "ids_twice": sum(1 for v in counts.values() if v > 1),
            "missing": n - len(counts), "status_200": status[200],
            "not_200": sum(v for k, v in status.items() if k != 200),
            "ends_whole": int(data.endswith(b"\n"))}


def start_real(n: int = 1) -> list:
    from ipfs_accelerate_py.servers.vllm_cpu import VllmCpuServer
    servers = []
    for _ in range(n):
        s = VllmCpuServer()
        s.start()
        servers.append(s)
    return servers


def crash_resume(a: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="batch-crash-"))
    src, out = tmp / "in.jsonl", tmp / "out.jsonl"
    write_input(src, a.n)
    servers = [] if a.url else start_real()
    url = a.url or servers[0].base_url
    try:
        t0 = time.monotonic()
        p = job([str(src), str(out), "--endpoint", url], tmp)
        target = int(a.n * a.kill_at)
        while lines_in(out) < target and p.poll() is None:
            time.sleep(0.05)  # a measurement's poll, not a test's synchronisation
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        t_kill = time.monotonic() - t0
        with open(out, "rb") as f:
            data = f.read()
        torn = not data.endswith(b"\n")
        before = lines_in(out)
        t1 = time.monotonic()
        p = job([str(src), str(out), "--endpoint", url], tmp)
        rc = p.wait()
        t_resume = time.monotonic() - t1
        result = {"n": a.n, "killed_after_s": round(t_kill, 1), "lines_at_kill": before,
                  "torn_tail_at_kill": torn, "resume_rc": rc, "resume_s": round(t_resume, 1),
                  **check(out, a.n)}
        summ = sorted((tmp / "results").glob("*.json"))[-1]
        s = json.loads(summ.read_text())
        result.update(resume_sent=s["sent"], resume_torn_bytes=s["torn_bytes_repaired"],
                      resume_rate=s["requests_per_s"])
        print(json.dumps(result))
    finally:
        for s in servers:
            s.stop()


def server_restart(a: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="batch-restart-"))
    src, out = tmp / "in.jsonl", tmp / "out.jsonl"
    write_input(src, a.n)
    server = start_real()[0]
    try:
        t0 = time.monotonic()
        p = job([str(src), str(out), "--endpoint", server.base_url], tmp)
        while lines_in(out) < int(a.n * a.kill_at) and p.poll() is None:
            time.sleep(0.05)
        at_kill = lines_in(out)
        server.kill()
        t_kill = time.monotonic()
        server.start()  # the same port
        down_s = time.monotonic() - t_kill
        rc = p.wait()
        s = json.loads(sorted((tmp / "results").glob("*.json"))[-1].read_text())
        print(json.dumps({"n": a.n, "lines_at_kill": at_kill, "server_down_s": round(down_s, 1),
                          "rc": rc, "wall_s": round(time.monotonic() - t0, 1),
                          "errors_by_type": s["errors_by_type"], **check(out, a.n)}))
    finally:
        server.stop()


def million(a: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="batch-million-"))
    src, out = tmp / "in.jsonl", tmp / "out.jsonl"
    write_input(src, a.n, noop=True)
    noop = subprocess.Popen([sys.executable, str(HERE / "noop_server.py"), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(noop.stdout.readline().split()[1])
        t0 = time.monotonic()
        # the no-op server answers one choice to any call: no prompt lists on the wire
        p = job([str(src), str(out), "--endpoint", f"http://127.0.0.1:{port}"], tmp,
                VLLM_BATCH_SIZE="1")
        peak = 0
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peak = max(peak, int(line.split()[1]))
            except FileNotFoundError:
                pass
            time.sleep(0.5)
        wall = time.monotonic() - t0
        children_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(json.dumps({"n": a.n, "rc": p.returncode, "wall_s": round(wall, 1),
                          "rate": round(a.n / wall), "peak_rss_mb": round(peak / 1024, 1),
                          "children_maxrss_mb": round(children_max / 1024, 1),
                          "input_mb": round(src.stat().st_size / 2**20),
                          **check(out, a.n)}))
        out.unlink()
        src.unlink()
    finally:
        noop.send_signal(signal.SIGTERM)
        noop.wait(10)


def ray_run(a: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="batch-ray-"))
    src, out = tmp / "in.jsonl", tmp / "out.jsonl"
    write_input(src, a.n)
    servers = start_real(a.servers)
    try:
        args = [str(src), str(out), "--ray", "--actors", "2"]
        for s in servers:
            args += ["--endpoint", s.base_url]
        t0 = time.monotonic()
        rc = job(args, tmp).wait()
        print(json.dumps({"n": a.n, "rc": rc, "wall_s": round(time.monotonic() - t0, 1),
                          **check(out, a.n)}))
    finally:
        for s in servers:
            s.stop()


def _ray_http(a: argparse.Namespace) -> None:
    """One Ray Data HttpRequestProcessorConfig run (a process of its own): prints a JSON line."""
    import ray
    from ray.data.llm import HttpRequestProcessorConfig, build_processor
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.monotonic()
    ok = err = 0
    failure = None
    try:
        cfg = HttpRequestProcessorConfig(url=a.url + "/v1/completions", max_retries=a.retries)
        proc = build_processor(cfg, preprocess=lambda row: dict(
            payload=json.loads(row["text"])["body"]),
            postprocess=lambda row: dict(ok="choices" in (row.get("http_response") or {})))
        for batch in proc(ray.data.read_text(a.file)).iter_batches(batch_size=None):
            got = batch["ok"]
            ok += int(sum(bool(x) for x in got))
            err += int(sum(not bool(x) for x in got))
    except Exception as exc:  # noqa: BLE001 - the job's fate is the figure
        failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    finally:
        ray.shutdown()
    print("RESULT " + json.dumps({"ok_rows": ok, "error_rows": err, "failed": failure,
                                  "wall_s": round(time.monotonic() - t0, 1)}), flush=True)


def vs_ray_http(a: argparse.Namespace) -> None:
    import threading
    tmp = Path(tempfile.mkdtemp(prefix="batch-vs-"))
    src = tmp / "in.jsonl"
    write_input(src, a.n, noop=True)  # completions only: the processor posts to one route
    server = start_real()[0]
    url = server.base_url
    results = []

    def contender(name: str, kill_after: Optional[float]) -> Dict[str, object]:
        out = tmp / f"{name}-{'kill' if kill_after else 'clean'}.jsonl"
        timer = None
        if kill_after:
            def crash() -> None:
                server.kill()
                server.start()
            timer = threading.Thread(target=lambda: (time.sleep(kill_after), crash()))
        t0 = time.monotonic()
        if name.startswith("ray-http"):
            retries = "3" if name.endswith("retries") else "0"
            p = subprocess.Popen([sys.executable, __file__, "_ray_http", "--url", url,
                                  "--file", str(src), "--retries", retries],
                                 env=env(), stdout=subprocess.PIPE, text=True,
                                 start_new_session=True)
            if timer:
                timer.start()
            line = [x for x in p.communicate()[0].splitlines() if x.startswith("RESULT ")]
            r = json.loads(line[-1][7:]) if line else {"failed": f"rc {p.returncode}"}
        else:
            args = [str(src), str(out), "--endpoint", url] + (["--ray"] if name == "job-ray"
                                                             else [])
            p = job(args, tmp)
            if timer:
                timer.start()
            rc = p.wait()
            c = check(out, a.n)
            r = {"ok_rows": c["status_200"], "error_rows": c["not_200"], "rc": rc,
                 "ids_twice": c["ids_twice"], "missing": c["missing"]}
        if timer:
            timer.join()
        r["wall_s"] = round(time.monotonic() - t0, 1)
        r["req_per_s"] = round(r.get("ok_rows", 0) / r["wall_s"], 1)
        return {"contender": name, "fault": bool(kill_after), **r}

    try:
        names = ["ray-http-defaults", "ray-http-retries", "job-local", "job-ray"]
        clean = {}
        for name in names:
            res = contender(name, None)
            clean[name] = res["wall_s"]
            results.append(res)
            print(json.dumps(res), flush=True)
        for name in names:
            res = contender(name, max(3.0, 0.3 * clean[name]))
            results.append(res)
            print(json.dumps(res), flush=True)
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("crash-resume")
    c.add_argument("--n", type=int, default=10_000)
    c.add_argument("--kill-at", type=float, default=0.4)
    c.add_argument("--url")
    sr = sub.add_parser("server-restart")
    sr.add_argument("--n", type=int, default=3000)
    sr.add_argument("--kill-at", type=float, default=0.3)
    m = sub.add_parser("million")
    m.add_argument("--n", type=int, default=1_000_000)
    v = sub.add_parser("vs-ray-http")
    v.add_argument("--n", type=int, default=5000)
    h = sub.add_parser("_ray_http")
    h.add_argument("--url")
    h.add_argument("--file")
    h.add_argument("--retries", type=int, default=0)
    r = sub.add_parser("ray")
    r.add_argument("--n", type=int, default=10_000)
    r.add_argument("--servers", type=int, default=2)
    a = ap.parse_args()
    {"crash-resume": crash_resume, "server-restart": server_restart, "million": million,
     "ray": ray_run, "vs-ray-http": vs_ray_http, "_ray_http": _ray_http}[a.cmd](a)


if __name__ == "__main__":
    main()
