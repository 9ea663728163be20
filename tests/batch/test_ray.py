"""The job on a local Ray (two CPUs, two actors): the same lines, exactly once, resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from batch_support import ids_once, mixed_lines, read_output, write_input

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
pytest.importorskip("ray.data", reason="ray[data] is not installed (pip install -e '.[ray]')")


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _prompts_served(server) -> int:
    """Requests the double answered, counting each prompt of a prompt list."""
    total = 0
    for r in server.requests:
        if r.path == "/v1/completions":
            prompt = r.json.get("prompt")
            total += len(prompt) if isinstance(prompt, list) else 1
        elif r.path == "/v1/chat/completions":
            total += 1
    return total


def test_ray_job_merges_parts_exactly_once_and_resumes(tmp_path: Path, fake_server, local_ray):
    from ipfs_accelerate_py.batch import JobOptions
    from ipfs_accelerate_py.batch._ray import parts_dir, run_ray

    lines = mixed_lines(300)
    src, out = write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    # a previous run: r0..r4 merged, r5..r9 still in a part file (r4 in both), a torn tail
    done = [json.dumps({"id": f"x{i}", "custom_id": f"r{i}", "error": None,
                        "response": {"status_code": 200, "request_id": "q", "body": {}}})
            for i in range(10)]
    out.write_text("\n".join(done[:5]) + "\n" + done[5][:20])
    os.makedirs(parts_dir(str(out)))
    Path(parts_dir(str(out)), "part-0001.jsonl").write_text("\n".join(done[4:10]) + "\n")
    opts = JobOptions(str(src), str(out), [fake_server.base_url], progress=False,
                      summary_dir=str(tmp_path / "results"))
    summary = run_ray(opts, actors=2, block_lines=64)
    rows = read_output(out)
    ids_once(rows, [line["custom_id"] for line in lines])
    assert [r["id"] for r in rows[:10]] == [f"x{i}" for i in range(10)]  # kept, not redone
    fresh = rows[10:]
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in fresh)
    assert {r["response"]["body"]["object"] for r in fresh} == {"text_completion",
                                                                "chat.completion"}
    sent = sum(fake_server.request_count.values())
    assert summary.ok == 290 and summary.already_answered == 10 and summary.complete
    assert _prompts_served(fake_server) == 290  # the answered ten were not sent again
    assert not os.listdir(parts_dir(str(out)))
    # the file answers every id now: a rerun sends nothing and writes nothing
    again = run_ray(opts, actors=2, block_lines=64)
    assert again.sent == 0 and sum(fake_server.request_count.values()) == sent
    assert len(read_output(out)) == 300
