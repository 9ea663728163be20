"""Result files: safe names, typed shapes, atomic writes."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from ipfs_accelerate_py.unified_runner.results import (CheckResult, StandardResults,
                                                       file_timestamp, result_path, safe_name,
                                                       write_result)

WHEN = datetime(2026, 11, 25, 3, 12, 27, tzinfo=timezone.utc)


def test_names_never_contain_separators() -> None:
    assert safe_name("meta-llama/Llama-2-7b-chat-hf") == "meta-llama_Llama-2-7b-chat-hf"
    assert safe_name("../../etc") == "etc"
    assert safe_name("///") == "unnamed"
    path = result_path(Path("/r"), "performance", "a/b", WHEN)
    assert path == Path("/r/a_b_performance_20261125T031227Z.json")
    assert file_timestamp(WHEN) == "20261125T031227Z"


def test_the_four_names_follow_the_readme() -> None:
    names = {k: result_path(Path("."), k, "vllm", WHEN).name
             for k in ("standard", "performance", "real", "embeddings", "summary")}
    assert names == {"standard": "vllm_test_results.json",
                     "performance": "vllm_performance_20261125T031227Z.json",
                     "real": "vllm_connection_20261125T031227Z.json",
                     "embeddings": "vllm_embeddings_20261125T031227Z.json",
                     "summary": "vllm_summary_20261125T031227Z.json"}


def test_written_json_has_numbers_and_iso_times(tmp_path: Path) -> None:
    result = StandardResults(backend="vllm", run_timestamp=WHEN, client_version="1",
                             model="meta-llama/Llama-2-7b-chat-hf", status="passed",
                             started_at=WHEN, finished_at=WHEN, duration_seconds=0.5, passed=1,
                             checks=[CheckResult(name="x", status="passed",
                                                 duration_seconds=0.25)])
    path = write_result(tmp_path / "vllm_test_results.json", result)
    data = json.loads(path.read_text())
    assert data["duration_seconds"] == 0.5 and data["checks"][0]["duration_seconds"] == 0.25
    assert data["started_at"].startswith("2026-11-25T03:12:27")
    assert datetime.fromisoformat(data["started_at"].replace("Z", "+00:00")).tzinfo is not None
    assert [p.name for p in tmp_path.iterdir()] == ["vllm_test_results.json"]
