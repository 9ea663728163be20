"""Options and environment variables of the runner's command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipfs_accelerate_py.unified_runner import parse_config


def test_defaults_follow_the_readme() -> None:
    cfg = parse_config("vllm", [], environ={})
    assert cfg.requested_modes == ["standard"]
    assert cfg.model == "default"
    assert cfg.api_url == "http://localhost:8000"
    assert cfg.timeout == 30.0
    assert cfg.results_dir == Path("collected_results")
    assert cfg.endpoints == {} and not cfg.quick and not cfg.store_prompts


def test_all_selects_every_suite_and_environment_sets_defaults() -> None:
    env = {"VLLM_API_URL": "http://127.0.0.1:9/v1", "VLLM_MODEL": "m", "VLLM_TIMEOUT": "7.5",
           "VLLM_API_KEY": "sk-abc"}
    cfg = parse_config("vllm", ["--all"], environ=env)
    assert cfg.modes == ["standard", "performance", "real"]  # --all: the generation suites
    assert parse_config("vllm", ["--all", "--embeddings"], environ={}).modes == [
        "standard", "performance", "real", "embeddings"]
    assert parse_config("vllm", ["--embeddings"], environ={}).requested_modes == ["embeddings"]
    assert (cfg.api_url, cfg.model, cfg.timeout) == ("http://127.0.0.1:9", "m", 7.5)
    assert cfg.api_key_set


def test_arguments_win_over_the_environment() -> None:
    env = {"VLLM_API_URL": "http://127.0.0.1:9", "VLLM_MODEL": "m", "VLLM_TIMEOUT": "7"}
    cfg = parse_config("vllm", ["--api-url", "http://127.0.0.1:10", "--model", "x/y",
                                "--timeout", "60"], environ=env)
    assert (cfg.api_url, cfg.model, cfg.timeout) == ("http://127.0.0.1:10", "x/y", 60.0)


@pytest.mark.parametrize("value", ["true", "1", "YES", "on"])
def test_skip_variables_skip_and_say_why(value: str) -> None:
    env = {"SKIP_PERFORMANCE_TESTS": value, "SKIP_REAL_TESTS": value}
    cfg = parse_config("vllm", ["--all"], environ=env)
    assert cfg.modes == ["standard"]
    assert cfg.requested_modes == ["standard", "performance", "real"]
    assert cfg.skipped == {"performance": f"SKIP_PERFORMANCE_TESTS={value}",
                           "real": f"SKIP_REAL_TESTS={value}"}


def test_endpoints_for_the_precision_comparison() -> None:
    cfg = parse_config("vllm", ["--performance", "--endpoint", "fp16=http://127.0.0.1:1",
                                "--endpoint", "awq=http://127.0.0.1:2/v1"], environ={})
    assert cfg.endpoints == {"fp16": "http://127.0.0.1:1", "awq": "http://127.0.0.1:2"}


@pytest.mark.parametrize("argv, env", [
    (["--endpoint", "nameonly"], {}),
    (["--endpoint", "a=http://x:1", "--endpoint", "a=http://x:2"], {}),
    (["--api-url", "ftp://x"], {}),
    (["--timeout", "0"], {}),
    ([], {"VLLM_TIMEOUT": "soon"}),
    (["--embedded", "docker"], {}),
])
def test_bad_usage_exits_2(argv: list, env: dict, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config("vllm", argv, environ=env)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip()


def test_an_unknown_backend_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config("no-such-backend", [], environ={})
    assert info.value.code == 2
    assert "no-such-backend" in capsys.readouterr().err
