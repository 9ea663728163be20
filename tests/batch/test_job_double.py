"""The job against the test double: exactly once, across a crash, errors, and a stop."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from batch_support import (chat_line, completion_line, ids_once, mixed_lines, read_output,
                           run_job, whole_lines, write_input)
from ipfs_accelerate_py.batch import JobOptions, run_with_client
from ipfs_accelerate_py.servers.fake_vllm import Fault
from support import wait_until


def _run(client, src: Path, out: Path, **opts) -> "object":
    options = JobOptions(str(src), str(out), progress=False, summary_dir=None, **opts)
    return asyncio.run(run_with_client(options, client))


def test_every_line_is_answered_once_in_runbatch_format(tmp_path, fake_server, make_client):
    lines = mixed_lines(60) + [
        {"custom_id": "emb", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "tiny-llama", "input": "x"}},
        completion_line("too-long", "x", max_tokens=100_000),  # the server says 400
        completion_line("extras", "hello", return_token_ids=True),  # a vLLM-only field
    ]
    src, out = write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    summary = _run(make_client(fake_server), src, out)
    rows = read_output(out)
    ids_once(rows, [line["custom_id"] for line in lines])
    by_id = {r["custom_id"]: r for r in rows}
    chat, comp = by_id["r0"], by_id["r1"]
    assert set(chat) == {"id", "custom_id", "response", "error"} and chat["error"] is None
    assert chat["response"]["status_code"] == 200 and chat["response"]["request_id"]
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny-llama"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == 2
    assert comp["response"]["body"]["object"] == "text_completion"
    assert comp["response"]["body"]["choices"][0]["text"]
    assert comp["response"]["body"]["choices"][0]["finish_reason"] == "length"
    assert len(by_id["extras"]["response"]["body"]["choices"][0]["token_ids"]) == 2
    emb = by_id["emb"]  # a generation server has no embeddings route: its 404, as a line
    assert emb["response"]["status_code"] == 404 and emb["error"]["code"] == 404
    bad = by_id["too-long"]
    assert bad["response"]["status_code"] == 400 and bad["response"]["body"] is None
    assert bad["error"]["code"] == 400 and "max_model_len" in bad["error"]["message"]
    assert summary.ok == 61 and summary.errors == 2 and summary.complete
    assert summary.completion_tokens == 61 * 2
    # a rerun sends nothing: the output file answers every id
    sent = sum(fake_server.request_count.values())
    again = _run(make_client(fake_server), src, out)
    assert again.sent == 0 and again.already_answered == len(lines)
    assert sum(fake_server.request_count.values()) == sent
    assert len(read_output(out)) == len(lines)


def test_retry_errors_redoes_only_the_error_lines(tmp_path, fake_server):
    lines = [completion_line(f"ok{i}", f"fine {i}") for i in range(10)]
    lines += [completion_line(f"bad{i}", f"FAIL {i}") for i in range(3)]
    src, out = write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    fake_server.add_fault(Fault("status", status=422, prompt="FAIL", count=-1))
    args = [str(src), str(out), "--endpoint", fake_server.base_url]
    assert run_job(args, tmp_path, VLLM_BATCH_SIZE="1")[0] == 0
    rows = read_output(out)
    assert sorted(r["custom_id"] for r in rows if r["error"]) == ["bad0", "bad1", "bad2"]
    fake_server.clear_faults()
    before = fake_server.request_count["/v1/completions"]
    assert run_job(args, tmp_path, VLLM_BATCH_SIZE="1")[0] == 0  # errors are answered
    assert fake_server.request_count["/v1/completions"] == before
    assert run_job(args + ["--retry-errors"], tmp_path, VLLM_BATCH_SIZE="1")[0] == 0
    assert fake_server.request_count["/v1/completions"] == before + 3
    rows = read_output(out)
    ids_once(rows, [line["custom_id"] for line in lines])
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in rows)


def test_sigkill_mid_job_then_resume_gives_each_id_once(tmp_path, fake_server, start_job):
    """The job is killed (its whole process group, SIGKILL) while requests are held at the
    double; a torn last line is added as a crash mid-write leaves one; the rerun repairs the
    file and sends only what has no line."""
    free = [completion_line(f"free{i}", f"free {i}") for i in range(20)]
    gated = [completion_line(f"gated{i}", f"GATE {i}") for i in range(20)]
    src, out = write_input(tmp_path / "in.jsonl", free + gated), tmp_path / "out.jsonl"
    fake_server.add_fault(Fault("gate", prompt="GATE", count=-1))
    job = start_job([str(src), str(out), "--endpoint", fake_server.base_url,
                     "--max-in-flight", "4"], VLLM_BATCH_SIZE="1")
    fake_server.wait_held(4, timeout=30)
    wait_until(lambda: whole_lines(out) == 20, timeout=30, what="the free lines committed")
    job.kill_group()
    with open(out, "ab") as f:
        f.write(b'{"id":"iap-torn","custom_id":"gated0","response":{"status_co')
    fake_server.clear_faults()
    fake_server.release_stalls()
    sent_before = fake_server.request_count["/v1/completions"]
    rc, err = run_job([str(src), str(out), "--endpoint", fake_server.base_url], tmp_path,
                      VLLM_BATCH_SIZE="1")
    assert rc == 0, err
    rows = read_output(out)
    ids_once(rows, [line["custom_id"] for line in free + gated])
    assert all(r["response"]["status_code"] == 200 for r in rows)
    assert fake_server.request_count["/v1/completions"] - sent_before == 20  # the gated only
    summaries = list((tmp_path / "results").glob("*.json"))  # the killed run wrote none
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["already_answered"] == 20 and summary["sent"] == 20
    assert summary["torn_bytes_repaired"] > 0 and summary["complete"] is True


def test_sigterm_lets_the_requests_in_flight_finish(tmp_path, fake_server, start_job):
    lines = [completion_line(f"g{i}", f"GATE {i}") for i in range(4)]
    lines += [chat_line(f"later{i}", f"later {i}") for i in range(30)]
    src, out = write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    fake_server.add_fault(Fault("gate", prompt="GATE", count=-1))
    job = start_job([str(src), str(out), "--endpoint", fake_server.base_url,
                     "--max-in-flight", "4", "--grace", "60"], VLLM_BATCH_SIZE="1")
    fake_server.wait_held(4, timeout=30)
    job.signal(signal.SIGTERM)
    job.wait_said("SIGTERM: reading stopped")  # then what it holds may finish
    fake_server.release_stalls()
    assert job.wait(60) == 128 + signal.SIGTERM
    rows = read_output(out)
    assert sorted(r["custom_id"] for r in rows) == [f"g{i}" for i in range(4)]
    assert fake_server.request_count["/v1/chat/completions"] == 0
    summary = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["complete"] is False
    rc, err = run_job([str(src), str(out), "--endpoint", fake_server.base_url], tmp_path)
    assert rc == 0, err
    ids_once(read_output(out), [line["custom_id"] for line in lines])


def test_sigterm_grace_ends_and_the_held_requests_run_again(tmp_path, fake_server, start_job):
    lines = [completion_line(f"g{i}", f"GATE {i}") for i in range(3)]
    src, out = write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    fake_server.add_fault(Fault("gate", prompt="GATE", count=-1))
    job = start_job([str(src), str(out), "--endpoint", fake_server.base_url,
                     "--grace", "0.2"], VLLM_BATCH_SIZE="1")
    fake_server.wait_held(3, timeout=30)
    job.signal(signal.SIGTERM)
    assert job.wait(30) == 128 + signal.SIGTERM  # the gate is never released
    assert read_output(out) == []  # nothing half-answered was written
    fake_server.clear_faults()
    fake_server.release_stalls()
    rc, err = run_job([str(src), str(out), "--endpoint", fake_server.base_url], tmp_path)
    assert rc == 0, err
    ids_once(read_output(out), ["g0", "g1", "g2"])


def test_no_endpoint_uses_vllm_api_url_when_it_answers(tmp_path, fake_server):
    lines = mixed_lines(6)
    src, out = write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    rc, err = run_job([str(src), str(out)], tmp_path, VLLM_API_URL=fake_server.base_url)
    assert rc == 0, err
    ids_once(read_output(out), [line["custom_id"] for line in lines])
    assert sum(fake_server.request_count.values()) >= 1


def test_embedding_lines_are_answered_through_embed_in_the_format_asked(
        tmp_path, start_fake, make_client) -> None:
    """/v1/embeddings lines go through the client's embed (shared calls where they can):
    each line's vectors equal the server's for that input alone, as floats or base64."""
    import base64

    import numpy as np
    import requests

    from ipfs_accelerate_py.servers.vllm_cpu import EMBED_MODEL

    server = start_fake(models=(EMBED_MODEL,), runner="pooling")
    texts = [f"embed me {i}" for i in range(12)]
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": EMBED_MODEL, "input": t,
                       **({"encoding_format": "base64"} if i % 2 else {})}}
             for i, t in enumerate(texts)]
    src, out = write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    summary = _run(make_client(server, model=EMBED_MODEL), src, out)
    by_id = {r["custom_id"]: r for r in read_output(out)}
    assert summary.ok == len(lines) and summary.errors == 0
    for i, t in enumerate(texts):
        raw = requests.post(server.base_url + "/v1/embeddings", json={"input": t}, timeout=5).json()
        body = by_id[f"e{i}"]["response"]["body"]
        assert body["object"] == "list" and body["usage"] == raw["usage"]
        got = body["data"][0]["embedding"]
        if i % 2:
            got = np.frombuffer(base64.b64decode(got), dtype="<f4")
        np.testing.assert_allclose(got, raw["data"][0]["embedding"], atol=1e-6)
