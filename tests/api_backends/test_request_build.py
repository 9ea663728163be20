"""Completion requests built from the same scalar parameters are validated once and copied.

``build_request`` keeps the validated request of each (class, model, parameters) and gives
each later prompt a copy with its own prompt: every such request must equal what a whole
validation builds, share nothing a caller could change, and a bad prompt must be refused
with the same error as without the shortcut."""

from __future__ import annotations

from typing import Any, Dict

import pytest

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.models import MAX_PROMPT_CHARS, updated, validate_request
from ipfs_accelerate_py.api_backends.request_build import build_request
from ipfs_accelerate_py.api_backends.vllm import VllmAdapter

ADAPTER = VllmAdapter()
PARAMS = [
    {},
    {"max_tokens": 16},
    {"max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 3, "echo": False},
    {"max_tokens": 4, "temperature": 0, "stream": True},
    {"max_tokens": 5, "stop": ["\n"], "logit_bias": {"50256": -100.0}},  # not scalars
    {"max_tokens": 1, "min_tokens": 1, "ignore_eos": True, "priority": 2},
]


def _fresh(prompt: Any, model: Any, params: Dict[str, Any]) -> Any:
    return validate_request(ADAPTER.completion_request, {**params, "model": model,
                                                         "prompt": prompt})


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("model", [None, "tiny"])
def test_each_request_equals_a_whole_validation(params: Dict[str, Any], model: Any) -> None:
    for prompt in ["first prompt", "second", "a third, longer prompt " * 20, "é ☃"]:
        got = build_request(prompt, model, params, adapter=ADAPTER)
        want = _fresh(prompt, model, params)
        assert got == want and type(got) is type(want)
        assert got.model_fields_set == want.model_fields_set
        assert got.model_dump_json() == want.model_dump_json()
        assert ADAPTER.format_request(got).json == ADAPTER.format_request(want).json


def test_a_request_changed_by_its_caller_changes_no_later_one() -> None:
    params = {"max_tokens": 7, "temperature": 0.5}
    first = build_request("one", None, params, adapter=ADAPTER)
    first.temperature = 1.5
    first.model_fields_set.add("top_p")
    second = build_request("two", None, params, adapter=ADAPTER)
    assert second.temperature == 0.5 and "top_p" not in second.model_fields_set
    assert second.prompt == "two" and first.prompt == "one"


BAD_PROMPTS = ["", "x" * (MAX_PROMPT_CHARS + 1), "lone \ud800 surrogate"]


@pytest.mark.parametrize("prompt", BAD_PROMPTS, ids=["empty", "too-long", "surrogate"])
def test_a_bad_prompt_is_refused_as_without_the_shortcut(prompt: str) -> None:
    params = {"max_tokens": 3}
    build_request("a good prompt first", None, params, adapter=ADAPTER)  # the template exists
    with pytest.raises(errors.ValidationError) as via_build:
        build_request(prompt, None, params, adapter=ADAPTER)
    with pytest.raises(errors.ValidationError) as whole:
        _fresh(prompt, None, params)
    assert (str(via_build.value), via_build.value.field) == (str(whole.value), whole.value.field)
    assert via_build.value.field == "prompt"


@pytest.mark.parametrize("first,then", [({"max_tokens": 1}, {"max_tokens": True}),
                                        ({"temperature": 1}, {"temperature": 1.0}),
                                        ({"echo": True}, {"echo": 1})])
def test_equal_values_of_other_types_are_validated_on_their_own(
        first: Dict[str, Any], then: Dict[str, Any]) -> None:
    build_request("p", None, first, adapter=ADAPTER)
    try:
        want = _fresh("q", None, then)
    except errors.ValidationError as exc:
        with pytest.raises(errors.ValidationError) as got_error:
            build_request("q", None, then, adapter=ADAPTER)
        assert str(got_error.value) == str(exc)
    else:
        got = build_request("q", None, then, adapter=ADAPTER)
        assert got == want and got.model_dump_json() == want.model_dump_json()


def test_bad_parameters_are_refused_every_time() -> None:
    for _ in range(2):  # an invalid set is never kept
        with pytest.raises(errors.ValidationError) as caught:
            build_request("p", None, {"max_tokens": 4, "temperature": 9.0}, adapter=ADAPTER)
        assert caught.value.field == "temperature"


@pytest.mark.parametrize("request_", [
    build_request("p", None, {"max_tokens": 3, "stop": ["x"]}, adapter=ADAPTER),
    build_request([{"role": "user", "content": "hi"}], None, {"max_tokens": 3}, adapter=ADAPTER),
], ids=["completion", "chat"])
def test_updated_is_model_copy_with_an_update(request_: Any) -> None:
    got = updated(request_, {"model": "tiny"})
    want = request_.model_copy(update={"model": "tiny"})
    assert got == want and got.model_fields_set == want.model_fields_set
    assert got.model_dump_json() == want.model_dump_json()
    assert request_.model is None and "model" in got.model_fields_set
    got.model_fields_set.add("seed")
    assert "seed" not in request_.model_fields_set  # its own set of fields, as model_copy's
