"""The command line: ``python -m ipfs_accelerate_py.batch run INPUT OUTPUT [options]``.

Exit status: 0 the job is complete (every request has its line; error lines included, the
summary counts them); 1 the input or the output file was refused (nothing sent); 3 some
requests have no line (the client closed under them: run the command again); 128 + the
signal's number when SIGINT / SIGTERM stopped it (the output is resumable: run the same
command again). The API key comes from ``VLLM_API_KEY``, never from the command line.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import List, Optional

from ._checkpoint import CheckpointError
from ._endpoints import make_client, resolve_endpoints
from ._input import InputError, check_input
from ._local import JobOptions, run_local
from ._ray import run_ray

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="iap-batch", description=(
        "Run a vLLM run-batch / OpenAI batch file through VllmClient, exactly once and "
        "resumable (the output file is the checkpoint)."))
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a batch file")
    run.add_argument("input", help="JSONL input: {custom_id, method, url, body} per line")
    run.add_argument("output", help="JSONL output, appended to; also the checkpoint")
    run.add_argument("--endpoint", action="append", default=[], metavar="URL",
                     help="a server (repeat for several; requests are routed over all). "
                          "None: VLLM_API_URL if it answers, else an embedded local server")
    run.add_argument("--retry-errors", action="store_true",
                     help="send again the requests whose line in OUTPUT is an error")
    run.add_argument("--max-in-flight", type=int, default=256, metavar="N",
                     help="requests under way at once (default 256; per actor with --ray)")
    run.add_argument("--grace", type=float, default=30.0, metavar="S",
                     help="on SIGINT/SIGTERM, seconds the requests in flight get (default 30)")
    run.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run on Ray Data: no ADDRESS starts a local Ray; 'auto' or "
                          "'ray://HOST:10001' joins a cluster (needs the 'ray' extra)")
    run.add_argument("--actors", type=int, default=2, metavar="N",
                     help="--ray: actors in the pool, each with its own client (default 2)")
    run.add_argument("--block-lines", type=int, default=1024, metavar="N",
                     help="--ray: requests per block, one part file each (default 1024)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--summary-dir", default="collected_results", metavar="DIR",
                     help="where the summary JSON goes (default collected_results)")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_in_flight < 1:
        print("iap-batch: --max-in-flight must be at least 1", file=sys.stderr)
        return 2
    opts = JobOptions(args.input, args.output, list(args.endpoint), args.retry_errors,
                      args.max_in_flight, args.grace, not args.no_progress, args.summary_dir)
    if args.ray is not None:
        try:
            import ray.data  # noqa: F401 - only to say early that the extra is missing
        except ImportError:
            print("iap-batch: --ray needs Ray Data: pip install 'ipfs_accelerate_py[ray]'",
                  file=sys.stderr)
            return 2
    try:
        opts.checked_count = check_input(args.input)  # refuse a bad file before any server is started
    except (InputError, OSError) as exc:
        print(f"iap-batch: {exc}", file=sys.stderr)
        return 1
    endpoints, stop_server = resolve_endpoints(opts.endpoints)
    opts.endpoints = endpoints
    try:
        if args.ray is not None:
            summary = run_ray(opts, None if args.ray == "local" else args.ray,
                              actors=args.actors, block_lines=args.block_lines)
        else:
            client = make_client(endpoints, queue_size=max(1000, 2 * args.max_in_flight))
            try:
                summary = run_local(opts, client)
            finally:
                client.close(timeout=5.0)
    except (InputError, CheckpointError) as exc:
        print(f"iap-batch: {exc}", file=sys.stderr)
        return 1
    finally:
        if stop_server is not None:
            stop_server()
    d = summary.as_dict()
    print(f"iap-batch: {d['answered_this_run']} answered this run ({d['ok']} ok, "
          f"{d['errors']} errors {d['errors_by_type']}), {d['already_answered']} already in "
          f"{args.output}, {d['wall_s']} s" + (f"; stopped by {summary.stopped_by}, "
                                               f"resumable" if summary.stopped_by else ""),
          file=sys.stderr)
    if summary.stopped_by:
        return 128 + int(getattr(signal, summary.stopped_by, signal.SIGTERM))
    return 0 if summary.complete else 3
