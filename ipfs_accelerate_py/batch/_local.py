"""The job on one machine: the file streamed through the client's async face.

One event loop reads the input a line at a time, skips the ids the output already answers,
and keeps at most ``max_in_flight`` requests under way (a semaphore; the client's queue,
shared calls, breaker, retries and routing do the rest). Each answer is one line handed to
the checkpoint ``Writer``; a ticker commits the group every ``commit_interval`` seconds.

On SIGINT / SIGTERM no further line is read; the requests in flight get ``grace`` seconds,
then the rest are abandoned unwritten (they run again on resume), the lines are committed,
and the summary says the run stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Set

from ..api_backends import errors
from ._checkpoint import Writer, open_checkpoint
from ._input import check_input, id_hash, read_lines
from ._progress import Progress, Summary, write_summary
from ._replies import error_line, error_of, ok_line, send
from ._signals import StopSignal

__all__ = ["JobOptions", "run_local", "run_with_client"]


@dataclass
class JobOptions:
    """What a job runs, and how."""

    input: str
    output: str
    endpoints: List[str] = field(default_factory=list)
    retry_errors: bool = False
    max_in_flight: int = 256
    grace: float = 30.0
    progress: bool = True
    summary_dir: Optional[str] = "collected_results"
    commit_lines: int = 512
    commit_interval: float = 0.5
    #: the input's request count when the caller checked it already (else checked here)
    checked_count: Optional[int] = None


async def run_with_client(opts: JobOptions, client: Any, stop: Optional[StopSignal] = None,
                          ) -> Summary:
    """Run the job with ``client`` (not closed here). The input is checked first
    (``InputError``), the output repaired (``CheckpointError`` if it cannot be)."""
    stop = stop or StopSignal()
    summary = Summary("local", opts.input, opts.output, list(opts.endpoints))
    t0 = time.monotonic()
    summary.requests_in_file = (opts.checked_count if opts.checked_count is not None
                                else check_input(opts.input))
    ckpt = open_checkpoint(opts.output, opts.retry_errors)
    summary.torn_bytes_repaired = ckpt.torn_bytes
    summary.error_lines_dropped = ckpt.errors_dropped
    answered = ckpt.answered
    writer = Writer(opts.output, opts.commit_lines, opts.commit_interval)
    progress = Progress(summary.requests_in_file, summary, opts.progress)
    slots = asyncio.Semaphore(opts.max_in_flight)
    in_flight: Set["asyncio.Task[None]"] = set()

    async def one(custom_id: str, url: str, body: Any) -> None:
        try:
            try:
                reply = await send(client, url, body)
            except errors.ClientClosedError:
                summary.unfinished += 1  # not answered: the request runs again on resume
                return
            except Exception as exc:  # noqa: BLE001 - every failure ends as its error line
                writer.write(error_line(custom_id, exc))
                summary.record(False, error_of(exc)[1]["type"])
            else:
                writer.write(ok_line(custom_id, reply))
                summary.record(True, usage=reply.get("usage"))
            progress.advance()
        finally:
            slots.release()

    async def ticker() -> None:
        while True:
            await asyncio.sleep(opts.commit_interval / 2)
            writer.commit_if_due()

    tick = asyncio.ensure_future(ticker())
    stop_wait = asyncio.ensure_future(stop.stopped.wait())
    try:
        for line in read_lines(opts.input):
            if stop.stopped.is_set():
                break
            if answered.has_hash(id_hash(line.custom_id)):
                summary.already_answered += 1
                progress.advance()
                if summary.already_answered % 1024 == 0:
                    await asyncio.sleep(0)  # a long answered stretch: let signals and the ticker in
                continue
            if slots.locked():
                got = asyncio.ensure_future(slots.acquire())
                await asyncio.wait({got, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not got.done():
                    got.cancel()
                    break
            else:
                await slots.acquire()
            if stop.stopped.is_set():
                slots.release()
                break
            summary.sent += 1
            task = asyncio.ensure_future(one(line.custom_id, line.url, line.body))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await _finish(in_flight, stop, opts.grace)
    finally:
        tick.cancel()
        stop_wait.cancel()
        summary.unfinished += len(in_flight)
        for task in list(in_flight):
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*in_flight, tick, return_exceptions=True)
        writer.close()
        progress.close()
        summary.stopped_by = stop.by
        summary.wall_s = time.monotonic() - t0
        if opts.summary_dir:
            write_summary(summary, opts.summary_dir)
    return summary


async def _finish(in_flight: Set["asyncio.Task[None]"], stop: StopSignal, grace: float) -> None:
    """Wait for the requests in flight: all of them, or, once stopped, ``grace`` seconds
    (a second signal ends the grace)."""
    stopped = asyncio.ensure_future(stop.stopped.wait())
    try:
        while in_flight and not stop.stopped.is_set():
            await asyncio.wait(set(in_flight) | {stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    hurry = asyncio.ensure_future(stop.hurry.wait())
    try:
        while in_flight and not stop.hurry.is_set() and loop.time() < deadline:
            await asyncio.wait(set(in_flight) | {hurry}, timeout=deadline - loop.time(),
                               return_when=asyncio.FIRST_COMPLETED)
    finally:
        hurry.cancel()


def run_local(opts: JobOptions, client: Any) -> Summary:
    """Run the job on a fresh event loop in this (main) thread, SIGINT / SIGTERM handled."""
    def said(name: str) -> None:
        print(f"[batch] {name}: reading stopped; the requests in flight get {opts.grace:g} s "
              f"(a second signal ends that); the output stays resumable",
              file=sys.stderr, flush=True)

    async def main() -> Summary:
        stop = StopSignal(said)
        stop.install(asyncio.get_running_loop())
        try:
            return await run_with_client(opts, client, stop)
        finally:
            stop.restore()

    return asyncio.run(main())
