"""The input is refused before anything is sent; the output file is a sound checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batch_support import completion_line, read_output, run_job, write_input
from ipfs_accelerate_py.batch import CheckpointError, InputError, check_input, open_checkpoint
from ipfs_accelerate_py.batch._checkpoint import Writer


def test_bad_lines_are_refused_naming_them_and_nothing_is_sent(tmp_path: Path,
                                                              fake_server) -> None:
    src = write_input(tmp_path / "in.jsonl", [
        completion_line("a", "one"),
        "{not json",
        {**completion_line("b", "two"), "method": "GET"},
        {**completion_line("c", "three"), "url": "/v1/responses"},
        completion_line("a", "four"),  # the id of line 1 again
        ["a list"],
        completion_line("d", "five"),
    ])
    with pytest.raises(InputError) as info:
        check_input(str(src))
    text = str(info.value)
    assert info.value.count == 5
    for fragment in ("line 2: not JSON", "line 3: method", "line 4: url",
                     "line 5: custom_id 'a' is also on line(s) 1", "line 6: not a JSON object"):
        assert fragment in text
    rc, err = run_job([str(src), str(tmp_path / "out.jsonl"), "--endpoint", fake_server.base_url],
                      tmp_path)
    assert rc == 1, err
    assert "line 5: custom_id 'a'" in err
    assert sum(fake_server.request_count.values()) == 0
    assert not (tmp_path / "out.jsonl").exists()


def test_duplicates_across_many_lines_are_all_named(tmp_path: Path) -> None:
    lines = [completion_line(f"id{i}", "x") for i in range(5000)]
    lines += [completion_line("id7", "x"), completion_line("id4999", "x")]
    with pytest.raises(InputError) as info:
        check_input(str(write_input(tmp_path / "in.jsonl", lines)))
    assert info.value.problems == [(5001, "custom_id 'id7' is also on line(s) 8"),
                                   (5002, "custom_id 'id4999' is also on line(s) 5000")]


def _out_line(cid: str, error: bool = False) -> bytes:
    row = {"id": "x", "custom_id": cid, "response": None if error else {"status_code": 200},
           "error": {"message": "m"} if error else None}
    return (json.dumps(row) + "\n").encode()


def test_a_torn_tail_is_truncated_and_its_request_is_not_answered(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    whole = _out_line("a") + _out_line("b")
    out.write_bytes(whole + _out_line("c")[:17])  # "c" was being written at the crash
    ckpt = open_checkpoint(str(out))
    assert out.read_bytes() == whole
    assert ckpt.torn_bytes == 17 and ckpt.lines_kept == 2
    assert "a" in ckpt.answered and "b" in ckpt.answered and "c" not in ckpt.answered
    # a whole JSON object without its newline is torn too: the newline is part of the line
    out.write_bytes(whole + _out_line("c")[:-1])
    assert "c" not in open_checkpoint(str(out)).answered
    assert out.read_bytes() == whole


def test_a_bad_line_inside_the_file_is_refused_not_truncated(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    content = _out_line("a") + b"garbage\n" + _out_line("b")
    out.write_bytes(content)
    with pytest.raises(CheckpointError, match="line 2"):
        open_checkpoint(str(out))
    assert out.read_bytes() == content


def test_retry_errors_drops_the_error_lines_and_only_them(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(_out_line("a") + _out_line("b", error=True) + _out_line("c"))
    kept = open_checkpoint(str(out))
    assert "b" in kept.answered and out.read_bytes().count(b"\n") == 3
    ckpt = open_checkpoint(str(out), retry_errors=True)
    assert ckpt.errors_dropped == 1 and "b" not in ckpt.answered
    assert [r["custom_id"] for r in read_output(out)] == ["a", "c"]


def test_the_writer_commits_whole_groups(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    w = Writer(str(out), group=3, interval=3600.0)
    for cid in "ab":
        w.write(_out_line(cid))
    assert out.read_bytes() == b""  # a group is written whole, or not yet
    w.write(_out_line("c"))
    assert out.read_bytes().count(b"\n") == 3
    w.write(_out_line("d"))
    w.commit_if_due()  # not due: the group is young
    assert out.read_bytes().count(b"\n") == 3
    w.close()
    assert [r["custom_id"] for r in read_output(out)] == list("abcd")


def test_merging_parts_keeps_one_line_per_id(tmp_path: Path) -> None:
    """A block Ray ran twice leaves two parts with the same ids; an id may be in OUTPUT
    already; a part an actor never finished is only a temporary file."""
    from ipfs_accelerate_py.batch._ray import merge_parts

    out, parts = tmp_path / "out.jsonl", tmp_path / "out.jsonl.parts"
    parts.mkdir()
    out.write_bytes(_out_line("a"))
    (parts / "part-1.jsonl").write_bytes(_out_line("a") + _out_line("b") + _out_line("c"))
    (parts / "part-2.jsonl").write_bytes(_out_line("b") + _out_line("c") + _out_line("d"))
    (parts / "part-3.jsonl.tmp").write_bytes(_out_line("e")[:9])
    answered, appended = merge_parts(str(out), str(parts), open_checkpoint(str(out)).answered)
    assert appended == 3 and [r["custom_id"] for r in read_output(out)] == list("abcd")
    assert all(cid in answered for cid in "abcd") and "e" not in answered
    assert list(parts.iterdir()) == []
