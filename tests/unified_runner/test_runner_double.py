"""The runner end to end against the vLLM test double (fast), and without any server."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from ipfs_accelerate_py.servers import free_port
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer
from ipfs_accelerate_py.unified_runner import parse_config, run

RUNNER = Path(__file__).resolve().parents[2] / "generators" / "models" / "test_vllm_unified.py"


def run_runner(argv: List[str], results: Path) -> Tuple[int, str, str]:
    """Run the vllm runner in this process; (exit code, stdout, stderr)."""
    cfg = parse_config("vllm", argv + ["--results-dir", str(results), "--no-progress"])
    out, err = io.StringIO(), io.StringIO()
    code = run(cfg, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def load(results: Path) -> Dict[str, dict]:
    """The run's files by kind (one run per folder)."""
    kinds = {"test_results": "standard", "performance": "performance",
             "connection": "real", "embeddings": "embeddings", "summary": "summary"}
    out: Dict[str, dict] = {}
    for path in results.glob("vllm_*.json"):
        for key, kind in kinds.items():
            if path.name.startswith(f"vllm_{key}"):
                out[kind] = json.loads(path.read_text())
    return out


def test_all_writes_four_files_with_typed_figures(fake_server: FakeVllmServer,
                                                  tmp_path: Path) -> None:
    code, out, _ = run_runner(["--all", "--quick", "--api-url", fake_server.base_url], tmp_path)
    assert code == 0, out
    files = load(tmp_path)
    assert set(files) == {"standard", "performance", "real", "summary"}
    for data in files.values():
        assert data["backend"] == "vllm" and data["model"] == "tiny-llama"
        assert data["server_version"] == "0.32.0" and data["server_kind"] == "external"
        assert data["client_version"]
    perf = files["performance"]
    assert perf["status"] == "passed"
    assert isinstance(perf["batch_inference"]["batch_speedup_factor"], float)
    assert [p["concurrency"] for p in perf["concurrency_scaling"]] == [1, 2, 4, 8, 16, 32]
    tokens = perf["token_accounting"]
    assert tokens["available"] and tokens["within_tolerance"]
    assert tokens["client_output_tokens"] == tokens["server_generation_tokens"] > 0
    assert perf["comparison"]["kind"] == "sampling_parameters"
    assert "NOT a precision-mode comparison" in perf["comparison"]["note"]
    assert perf["plot_file"] and (tmp_path / perf["plot_file"]).stat().st_size > 1000
    assert files["standard"]["passed"] == 8 and files["standard"]["failed"] == 0
    assert files["real"]["health_status_code"] == 200 and files["real"]["passed"] == 5
    summary = files["summary"]
    assert summary["exit_code"] == 0 and summary["status"] == "passed"
    assert set(summary["suites"]) == {"standard", "performance", "real"}
    assert summary["key_figures"]["batch_speedup_factor"] > 0
    assert "figure" in out and "suite" in out  # the tables


def test_no_key_and_no_prompts_unless_asked(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-unified-runner-secret-42"
    monkeypatch.setenv("VLLM_API_KEY", secret)
    with FakeVllmServer(api_key=secret) as server:
        code, out, err = run_runner(["--standard", "--real", "--api-url", server.base_url],
                                    tmp_path / "plain")
        assert code == 0, out + err
        code, out, err = run_runner(["--standard", "--store-prompts", "--api-url",
                                     server.base_url], tmp_path / "stored")
        assert code == 0, out + err
    for path in (tmp_path / "plain").iterdir():
        text = path.read_text()
        assert secret not in text
        assert "What is machine learning?" not in text, f"a prompt leaked into {path.name}"
    assert json.loads((tmp_path / "plain" / "vllm_test_results.json").read_text())["api_key_set"]
    stored = json.loads((tmp_path / "stored" / "vllm_test_results.json").read_text())
    assert any(s["prompt"] == "What is machine learning?" for s in stored["samples"])
    assert secret not in (tmp_path / "stored" / "vllm_test_results.json").read_text()


def test_a_model_id_with_a_slash_is_recorded_not_used_as_a_path(fake_server: FakeVllmServer,
                                                                 tmp_path: Path) -> None:
    code, out, _ = run_runner(["--standard", "--model", "meta-llama/Llama-2-7b-chat-hf",
                               "--api-url", fake_server.base_url], tmp_path)
    assert code == 0, out
    assert all(p.is_file() for p in tmp_path.iterdir())
    data = json.loads((tmp_path / "vllm_test_results.json").read_text())
    assert data["model"] == "meta-llama/Llama-2-7b-chat-hf"


def test_a_failing_check_fails_the_run(fake_server: FakeVllmServer, tmp_path: Path) -> None:
    code, out, _ = run_runner(["--standard", "--model", "not-served", "--api-url",
                               fake_server.base_url, "--timeout", "5"], tmp_path)
    assert code == 1
    data = json.loads((tmp_path / "vllm_test_results.json").read_text())
    assert data["status"] == "failed" and data["failed"] >= 1
    failed = [c for c in data["checks"] if c["status"] == "failed"]
    assert all(c["message"] for c in failed)


def test_skip_variables_are_recorded_not_failed(fake_server: FakeVllmServer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKIP_PERFORMANCE_TESTS", "true")
    monkeypatch.setenv("SKIP_REAL_TESTS", "true")
    code, out, _ = run_runner(["--all", "--api-url", fake_server.base_url], tmp_path)
    assert code == 0
    files = load(tmp_path)
    assert files["performance"]["status"] == "skipped"
    assert files["performance"]["skip_reason"] == "SKIP_PERFORMANCE_TESTS=true"
    assert files["real"]["status"] == "skipped"
    assert "SKIP performance" in out


def test_nothing_listening_starts_the_embedded_server_and_says_so(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, _ = run_runner(["--standard", "--real", "--api-url", url, "--embedded", "fake"],
                              tmp_path)
    assert code == 0, out
    assert "embedded vLLM test double" in out
    files = load(tmp_path)
    assert files["standard"]["server_kind"] == "embedded-fake"
    assert files["real"]["status"] == "skipped"
    assert "real connection tests skipped" in files["real"]["skip_reason"]
    used = files["standard"]["server_url"]
    port = int(used.rsplit(":", 1)[1])
    with socket.socket() as s:  # the embedded server was stopped
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_embedded_none_fails_in_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run_runner(["--standard", "--api-url", url, "--embedded", "none"], tmp_path)
    assert code == 3 and out == ""
    assert len(err.strip().splitlines()) == 1 and url in err


def test_precision_comparison_across_endpoints(fake_server: FakeVllmServer, tmp_path: Path) -> None:
    with FakeVllmServer() as other:
        code, out, _ = run_runner(["--performance", "--quick", "--api-url", fake_server.base_url,
                                   "--endpoint", f"fp32={fake_server.base_url}",
                                   "--endpoint", f"int8={other.base_url}"], tmp_path)
    assert code == 0, out
    comparison = load(tmp_path)["performance"]["comparison"]
    assert comparison["kind"] == "precision_mode" and comparison["reference"] == "fp32"
    arms = {v["name"]: v for v in comparison["variants"]}
    assert set(arms) == {"fp32", "int8"}
    assert arms["int8"]["same_output_as_reference_ratio"] == 1.0  # same double, same text
    assert arms["int8"]["endpoint_url"] == other.base_url


def test_real_alone_with_nothing_listening_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(RUNNER), "--real", "--api-url",
                           f"http://127.0.0.1:{port}", "--timeout", "10",
                           "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert done.returncode == 3
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{port}" in lines[0] and "refused" in lines[0]
    assert elapsed < 10
    connection = json.loads(next(tmp_path.glob("vllm_connection_*.json")).read_text())
    assert connection["status"] == "failed" and not connection["reachable"]


def test_help_documents_the_options() -> None:
    done = subprocess.run([sys.executable, str(RUNNER), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    for option in ("--standard", "--performance", "--real", "--all", "--model", "--api-url",
                   "--timeout", "--endpoint", "--embeddings", "SKIP_PERFORMANCE_TESTS",
                   "VLLM_API_KEY"):
        assert option in done.stdout


EMBEDDINGS_CHECKS = {"embed", "score", "rerank", "pool", "tokenize_round_trip",
                     "shared_embed_calls", "generation_refused", "invalid_input_refused"}


def test_a_pooling_model_gets_the_embeddings_suite_instead(tmp_path: Path) -> None:
    """--all against an embedding server: the probe finds a pooling model, the generation
    suites are recorded as skipped (why), the embeddings suite runs and passes."""
    with FakeVllmServer(models=("tiny-embed",), runner="pooling") as server:
        code, out, err = run_runner(["--all", "--quick", "--api-url", server.base_url], tmp_path)
    assert code == 0, out + err
    files = load(tmp_path)
    assert set(files) == {"standard", "performance", "real", "embeddings", "summary"}
    for kind in ("standard", "performance", "real"):
        assert files[kind]["status"] == "skipped"
        assert "pooling model" in files[kind]["skip_reason"]
    emb = files["embeddings"]
    assert emb["suite"] == "embeddings" and emb["status"] == "passed" and emb["failed"] == 0
    assert emb["model"] == "tiny-embed" and emb["pooling_model"] and emb["dimensions"] > 0
    assert "/v1/completions is 404" in emb["detection"]
    checks = {c["name"]: c for c in emb["checks"]}
    assert set(checks) == EMBEDDINGS_CHECKS
    assert all(c["status"] == "passed" for c in checks.values()), checks
    assert checks["embed"]["details"]["max_abs_diff_base64_float"] <= 1e-5
    assert checks["shared_embed_calls"]["details"]["batches"] >= 1
    assert checks["generation_refused"]["details"]["status_code"] == 404
    assert len(checks["invalid_input_refused"]["details"]["refused_before_sending"]) == 6
    summary = files["summary"]
    assert summary["exit_code"] == 0 and summary["suites"]["embeddings"]["status"] == "passed"
    assert summary["suites"]["embeddings"]["file"].startswith("vllm_embeddings_")


def test_the_embeddings_flag_alone(tmp_path: Path) -> None:
    with FakeVllmServer(models=("tiny-embed",), runner="pooling") as server:
        code, out, err = run_runner(["--embeddings", "--api-url", server.base_url], tmp_path)
    assert code == 0, out + err
    files = load(tmp_path)
    assert set(files) == {"embeddings", "summary"}
    assert files["summary"]["modes_requested"] == ["embeddings"]
    assert files["embeddings"]["passed"] == len(EMBEDDINGS_CHECKS)


def test_the_embeddings_flag_on_a_generative_model_is_a_skip(fake_server: FakeVllmServer,
                                                              tmp_path: Path) -> None:
    code, out, err = run_runner(["--standard", "--embeddings", "--api-url",
                                 fake_server.base_url], tmp_path)
    assert code == 0, out + err
    files = load(tmp_path)
    assert files["standard"]["status"] == "passed" and files["standard"]["passed"] == 8
    emb = files["embeddings"]
    assert emb["status"] == "skipped" and not emb["pooling_model"]
    assert "not an embedding model" in emb["skip_reason"] and "404" in emb["skip_reason"]


def test_an_unserved_model_is_not_an_embedding_model(tmp_path: Path) -> None:
    """The embed probe answers 404 for a name the server does not serve: a skip that says so."""
    with FakeVllmServer(models=("tiny-embed",), runner="pooling") as server:
        code, out, err = run_runner(["--embeddings", "--model", "not-served", "--api-url",
                                     server.base_url], tmp_path)
    files = load(tmp_path)
    assert files["embeddings"]["status"] == "skipped", out
    assert "/v1/embeddings answered 404" in files["embeddings"]["skip_reason"]
    assert code == 0
