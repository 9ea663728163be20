"""The unified test generator: committed runners are current, and they follow the plugins."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from ipfs_accelerate_py.api_backends import plugins
from ipfs_accelerate_py.api_backends.adapter import BackendAdapter
from ipfs_accelerate_py.api_backends.default_plugins.vllm_plugin import VllmAdapter
from ipfs_accelerate_py.api_backends.hookspecs import hookimpl
from ipfs_accelerate_py.unified_runner.generate import (MARKER, generate, is_generated, plan,
                                                        runner_filename)

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "generators" / "templates" / "unified_runner.py.tmpl"
MODELS = ROOT / "generators" / "models"
PLUGIN_SRC = ROOT / "plugins" / "openai_compat"


class DemoAdapter(VllmAdapter):
    """A stand-in third-party backend (the vLLM wire format under another name)."""

    name = "demo_backend"
    description = "demo backend registered by a test"


class HiddenAdapter(VllmAdapter):
    name = "hidden_backend"
    description = "opts out of a runner"
    unified_runner = False


class DemoPlugin:
    """A plugin object, registered with the plugin manager for one test."""

    @hookimpl
    def iap_register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
        register(DemoAdapter())
        register(HiddenAdapter())


def repo_backends(monkeypatch: pytest.MonkeyPatch) -> Dict[str, BackendAdapter]:
    """The backends of this repository: the registered ones plus the in-repo plugins,
    whether or not they are pip-installed here (the committed runners cover both)."""
    backends = dict(plugins.get_backends())
    if "openai_compat" not in backends:
        monkeypatch.syspath_prepend(str(PLUGIN_SRC))
        from iap_openai_compat.plugin import OpenAICompatAdapter

        backends["openai_compat"] = OpenAICompatAdapter()
    return backends


def generated_files(folder: Path) -> Dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("test_*_unified.py"))
            if is_generated(p)}


def test_committed_runners_match_a_fresh_generation(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    backends = repo_backends(monkeypatch)
    generate(tmp_path, TEMPLATE, backends)
    fresh = generated_files(tmp_path)
    committed = generated_files(MODELS)
    assert sorted(committed) == sorted(fresh), (
        "generators/models is out of date; run: python generators/generate_unified_tests.py "
        "(with plugins/openai_compat installed)")
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} differs from a fresh generation"
    assert not generate(MODELS, TEMPLATE, backends, check=True).changed


def test_committed_runners_are_thin_and_marked() -> None:
    for path in MODELS.glob("test_*_unified.py"):
        text = path.read_text(encoding="utf-8")
        assert MARKER in text.splitlines()[:3]
        assert "from ipfs_accelerate_py.unified_runner import main" in text
        assert len(text.splitlines()) < 40, f"{path.name} should only name its backend"
    assert (MODELS / "test_vllm_unified.py").exists()
    assert not (MODELS / "test_vllm_legacy_unified.py").exists()


def test_registering_a_plugin_adds_its_runner_and_removing_it_deletes_it(
        tmp_path: Path, fresh_plugins: None) -> None:
    handmade = tmp_path / "test_handmade_unified.py"
    handmade.write_text("# written by a person\n")
    plugin = DemoPlugin()
    # registered before anyone asks for the backends, which are read once per manager
    plugins.get_plugin_manager().register(plugin, name="demo-test-plugin")
    report = generate(tmp_path, TEMPLATE)
    runner = tmp_path / "test_demo_backend_unified.py"
    assert "test_demo_backend_unified.py" in report.written
    assert runner.exists() and is_generated(runner)
    assert "BACKEND = 'demo_backend'" in runner.read_text()
    assert "hidden_backend" in report.skipped_backends
    assert not (tmp_path / "test_hidden_backend_unified.py").exists()
    assert not generate(tmp_path, TEMPLATE).changed  # a second run changes nothing

    plugins.get_plugin_manager().unregister(plugin)
    plugins.reset_plugin_manager()
    report = generate(tmp_path, TEMPLATE)
    assert report.removed == ["test_demo_backend_unified.py"]
    assert not runner.exists()
    assert handmade.exists(), "a file without the marker must never be deleted"


def test_a_hand_written_file_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / runner_filename("vllm")).write_text("# mine\n")
    with pytest.raises(FileExistsError):
        generate(tmp_path, TEMPLATE, {"vllm": VllmAdapter()})


def test_rendering_is_deterministic_and_names_are_module_safe() -> None:
    template = TEMPLATE.read_text()
    adapter = DemoAdapter()
    first = plan({"demo-backend.v2": adapter}, template)
    assert first == plan({"demo-backend.v2": adapter}, template)
    assert list(first) == ["test_demo_backend_v2_unified.py"]
    compile(first["test_demo_backend_v2_unified.py"], "runner", "exec")


def test_check_mode_reports_missing_runners(tmp_path: Path) -> None:
    script = ROOT / "generators" / "generate_unified_tests.py"
    out = subprocess.run([sys.executable, str(script), "--check", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "would write" in out.stdout and "test_vllm_unified.py" in out.stdout
    assert not list(tmp_path.iterdir()), "--check must not write"
    done = subprocess.run([sys.executable, str(script), "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and (tmp_path / "test_vllm_unified.py").exists()


@pytest.mark.slow
def test_pip_install_and_uninstall_of_the_plugin_adds_and_removes_its_runner(
        tmp_path: Path) -> None:
    """A real ``pip install`` into a throw-away venv (the shared environment is never
    changed). The venv does not see this environment's packages: the plugin may already be
    installed here (CI installs it), and uninstalling it in the venv must really remove it.
    The project goes in with ``--no-deps`` plus its few dependencies; the plugin is copied
    first so the build leaves nothing in the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    env0 = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "-q", "install",
                    "pluggy", "requests", "pydantic>=2.5,<3", "numpy", "tqdm", "aiohttp>=3.8",
                    "setuptools>=64",
                    "wheel"], check=True, timeout=600, env=env0)
    project = tmp_path / "project"
    shutil.copytree(ROOT / "ipfs_accelerate_py", project / "ipfs_accelerate_py",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "-q", "install",
                    "--no-deps", "--no-build-isolation", str(project)],
                   check=True, timeout=300, env=env0)
    source = tmp_path / "openai_compat"
    shutil.copytree(PLUGIN_SRC, source,
                    ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
    # the installed setuptools builds it offline when it can; else pip's isolated build
    for extra in (["--no-build-isolation"], []):
        done = subprocess.run(pip + ["install", "--no-deps", *extra, str(source)], env=env,
                              capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            break
    else:
        pytest.fail(f"pip could not install the plugin:\n{done.stdout}\n{done.stderr}")
    out = tmp_path / "models"
    generator = [python, str(ROOT / "generators" / "generate_unified_tests.py"),
                 "--output-dir", str(out)]
    subprocess.run(generator, check=True, timeout=120, env=env, capture_output=True)
    assert (out / "test_openai_compat_unified.py").exists()
    assert (out / "test_vllm_unified.py").exists()
    assert (out / "test_openai_compat_unified.py").read_text() == \
        (MODELS / "test_openai_compat_unified.py").read_text()

    subprocess.run(pip + ["uninstall", "-y", "iap-openai-compat"], check=True, timeout=120, env=env)
    done = subprocess.run(generator, check=True, timeout=120, env=env, capture_output=True,
                          text=True)
    assert not (out / "test_openai_compat_unified.py").exists()
    assert "removed" in done.stdout
    assert (out / "test_vllm_unified.py").exists()


def test_the_runner_names_the_operations_its_backend_declares() -> None:
    """vllm declares embed & co.: its runner says ``--embeddings`` covers them; a backend
    without embed says the suite records a skip."""
    from ipfs_accelerate_py.unified_runner.generate import operations_note

    note = " ".join(operations_note(VllmAdapter()).split())
    assert "embed, score, rerank, pool, tokenize, detokenize" in note and "--embeddings" in note

    class _NoOps(VllmAdapter):
        operation_requests: dict = {}

    assert "declares no embed operation" in " ".join(operations_note(_NoOps()).split())
