"""Request checks in the real server's words: field types, ranges and vLLM's own rules.

Why so exact: clients are tested on the 400s they get (message, ``type`` and ``param``), and
``tests/api_backends/data/vllm_request_corpus.json`` holds the real server's verdicts, so each
check follows pydantic/FastAPI (type "Bad Request", param ``body.X``) or vLLM's protocol
classes and SamplingParams, in their order.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from ._generation import VOCAB_SIZE
from ._wire import _ApiError, _bad_request

MAX_LOGPROBS = 20
DEFAULT_COMPLETION_MAX_TOKENS = 16

_MISSING = object()


def _input_repr(value: Any) -> str:
    if value is _MISSING or value is None:
        return "None"
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    return str(value)


def _verr(kind: str, loc: str, msg: str, value: Any, ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": _input_repr(value)}
    if ctx is not None:
        err["ctx"] = ctx
    return err


def _validation_error(errors: list[dict[str, Any]]) -> _ApiError:
    shown = errors[:10]  # FastAPI/vLLM print at most ten
    lines = "\n  ".join(repr(e) for e in shown)
    more = f"\n  ...and {len(errors) - 10} more errors" if len(errors) > 10 else ""
    plural = "s" if len(errors) > 1 else ""
    return _ApiError(400, f"{len(errors)} validation error{plural}:\n  {lines}{more}", "Bad Request", errors[0]["loc"])


_TRUE_WORDS = frozenset({"true", "t", "yes", "y", "on", "1"})
_FALSE_WORDS = frozenset({"false", "f", "no", "n", "off", "0"})


def _coerce_int(name: str, v: Any, errors: list[dict[str, Any]]) -> Any:
    if v is None or isinstance(v, int):  # bool is an int, and pydantic's lax mode takes it
        return int(v) if isinstance(v, bool) else v
    loc = f"body.{name}"
    if isinstance(v, float):
        if v.is_integer():
            return int(v)
        errors.append(_verr("int_from_float", loc, "Input should be a valid integer, got a number with a fractional part", v))
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            errors.append(_verr("int_parsing", loc, "Input should be a valid integer, unable to parse string as an integer", v))
            return v
    errors.append(_verr("int_type", loc, "Input should be a valid integer", v))
    return v


def _coerce_float(name: str, v: Any, errors: list[dict[str, Any]]) -> Any:
    if v is None or isinstance(v, float):
        return v
    if isinstance(v, int):
        return float(v)
    loc = f"body.{name}"
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            errors.append(_verr("float_parsing", loc, "Input should be a valid number, unable to parse string as a number", v))
            return v
    errors.append(_verr("float_type", loc, "Input should be a valid number", v))
    return v


def _coerce_bool(name: str, v: Any, errors: list[dict[str, Any]]) -> Any:
    if v is None or isinstance(v, bool):
        return v
    loc = f"body.{name}"
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        low = v.strip().lower()
        if low in _TRUE_WORDS:
            return True
        if low in _FALSE_WORDS:
            return False
        errors.append(_verr("bool_parsing", loc, "Input should be a valid boolean, unable to interpret input", v))
        return v
    errors.append(_verr("bool_type", loc, "Input should be a valid boolean", v))
    return v


def _coerce_str(name: str, v: Any, errors: list[dict[str, Any]]) -> Any:
    if v is None or isinstance(v, str):
        return v
    errors.append(_verr("string_type", f"body.{name}", "Input should be a valid string", v))
    return v


def _coerce_stop(name: str, v: Any, errors: list[dict[str, Any]]) -> Any:
    if v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)):
        return v
    loc = f"body.{name}"
    errors.append(_verr("string_type", loc, "Input should be a valid string", v))
    errors.append(_verr("list_type", loc, "Input should be a valid list", v))
    return v


def _coerce_dict(name: str, v: Any, errors: list[dict[str, Any]]) -> Any:
    if v is None or isinstance(v, dict):
        return v
    errors.append(_verr("model_attributes_type", f"body.{name}", "Input should be a valid dictionary or object to extract fields from", v))
    return v


_Coercer = Callable[[str, Any, list], Any]
_COMMON_FIELDS: dict[str, _Coercer] = {
    "model": _coerce_str,
    "n": _coerce_int,
    "max_tokens": _coerce_int,
    "seed": _coerce_int,
    "top_k": _coerce_int,
    "min_tokens": _coerce_int,
    "priority": _coerce_int,
    "truncate_prompt_tokens": _coerce_int,
    "temperature": _coerce_float,
    "top_p": _coerce_float,
    "min_p": _coerce_float,
    "presence_penalty": _coerce_float,
    "frequency_penalty": _coerce_float,
    "repetition_penalty": _coerce_float,
    "stream": _coerce_bool,
    "ignore_eos": _coerce_bool,
    "include_stop_str_in_output": _coerce_bool,
    "return_token_ids": _coerce_bool,
    "stop": _coerce_stop,
    "stream_options": _coerce_dict,
}
_COMPLETION_FIELDS = {**_COMMON_FIELDS, "logprobs": _coerce_int, "echo": _coerce_bool}
_CHAT_FIELDS = {
    **_COMMON_FIELDS,
    "logprobs": _coerce_bool,
    "top_logprobs": _coerce_int,
    "max_completion_tokens": _coerce_int,
    "add_generation_prompt": _coerce_bool,
}

# The message-param union vLLM validates each chat message against, in its order.
_MESSAGE_VARIANTS = (
    "ChatCompletionDeveloperMessageParam",
    "ChatCompletionSystemMessageParam",
    "ChatCompletionUserMessageParam",
    "ChatCompletionAssistantMessageParam",
    "ChatCompletionToolMessageParam",
    "ChatCompletionFunctionMessageParam",
    "CustomChatCompletionMessageParam",
)


def _message_errors(loc: str, messages: list[Any]) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        at = f"{loc}.{i}"
        if not isinstance(m, dict):
            errors += [_verr("dict_type", f"{at}.{v}", "Input should be a valid dictionary", m) for v in _MESSAGE_VARIANTS]
            errors.append(_verr("model_attributes_type", f"{at}.Message", "Input should be a valid dictionary or object to extract fields from", m))
        elif "role" not in m:
            for v in _MESSAGE_VARIANTS:
                errors.append(_verr("missing", f"{at}.{v}.role", "Field required", m))
                if v == "ChatCompletionToolMessageParam" and "tool_call_id" not in m:
                    errors.append(_verr("missing", f"{at}.{v}.tool_call_id", "Field required", m))
                if v == "ChatCompletionFunctionMessageParam" and "name" not in m:
                    errors.insert(len(errors) - 1, _verr("missing", f"{at}.{v}.name", "Field required", m))
            errors.append(_verr("missing", f"{at}.Message.author", "Field required", m))
            errors.append(_verr("missing", f"{at}.Message.role", "Field required", m))
    return errors


def _check_fields(body: dict[str, Any], spec: dict[str, _Coercer]) -> dict[str, Any]:
    """Lax-mode type checks and coercion of the known fields; raises the FastAPI-style 400."""
    errors: list[dict[str, Any]] = []
    out = dict(body)
    for name, coerce in spec.items():
        if name in body:
            out[name] = coerce(name, body[name], errors)
    if errors:
        raise _validation_error(errors)
    return out


def _prompt_type_errors(prompt: Any) -> list[dict[str, Any]]:
    # The union vLLM accepts: list[int] | list[list[int]] | str | list[str].
    msg_list = "Input should be a valid list"
    return [
        _verr("list_type", "body.prompt", msg_list, prompt),
        _verr("list_type", "body.prompt", msg_list, prompt),
        _verr("string_type", "body.prompt", "Input should be a valid string", prompt),
        _verr("list_type", "body.prompt", msg_list, prompt),
    ]


_INT64 = 2**63
_BOUNDS: tuple[tuple[str, float, float, bool, bool], ...] = (
    # (field, low, high, low inclusive, high inclusive): SamplingParams._verify_args
    ("temperature", float("-inf"), 2.0, False, True),  # negatives: _sampling's own message
    ("top_p", 0.0, 1.0, False, True),
    ("min_p", 0.0, 1.0, True, True),
    ("presence_penalty", -2.0, 2.0, True, True),
    ("frequency_penalty", -2.0, 2.0, True, True),
    ("repetition_penalty", 0.0, float("inf"), False, False),
    ("top_k", -1, float("inf"), True, False),
    ("min_tokens", 0, float("inf"), True, False),
    ("seed", -_INT64, _INT64 - 1, True, True),
    ("priority", -_INT64, _INT64 - 1, True, True),
    ("truncate_prompt_tokens", -1, _INT64 - 1, True, True),
    ("stream_interval", 1, float("inf"), True, False),
)
_SO_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _in_bounds(v: float, lo: float, hi: float, lo_in: bool, hi_in: bool) -> bool:
    return (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)


def _count_fields(chat: bool) -> tuple[str, ...]:
    return ("prompt_logprobs",) + (("top_logprobs",) if chat else ("logprobs",))


_BOUND_MESSAGES = {"temperature": "temperature must be in [0, 2], got {v}."}


def _check_counts(body: dict[str, Any], chat: bool) -> None:
    """vLLM checks logprob counts on the raw body, before coercion: ``"2"`` is refused."""
    for name in _count_fields(chat):
        v = body.get(name)
        if v is not None and not isinstance(v, (int, float)):
            raise _bad_request(f"`{name}` must be an integer.", name)


def _check_rules(body: dict[str, Any], chat: bool, max_model_len: int) -> None:
    """The protocol classes' and SamplingParams' rules the corpus exercises
    (``tests/api_backends/data/vllm_request_corpus.json`` holds the real verdicts)."""
    for name, lo, hi, lo_in, hi_in in _BOUNDS:
        v = body.get(name)
        if isinstance(v, (int, float)) and not _in_bounds(v, lo, hi, lo_in, hi_in):
            raise _bad_request(_BOUND_MESSAGES.get(name, "{name} must be in range, got {v}.").format(name=name, v=float(v)), name)
    if isinstance(body.get("top_k"), float) and not float(body["top_k"]).is_integer():
        raise _validation_error([_verr("int_from_float", "body.top_k", "Input should be a valid integer", body["top_k"])])
    v = body.get("prompt_logprobs")  # logprobs / top_logprobs: _sampling checks them
    if isinstance(v, (int, float)) and (v > MAX_LOGPROBS or v < 0):
        raise _bad_request(f"Requested prompt logprobs of {v}, which is greater than max allowed: {MAX_LOGPROBS}", "prompt_logprobs")
    if body.get("stream_options") and not body.get("stream"):
        raise _bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
    prompt = body.get("prompt")
    if not chat and isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt) and any(t < 0 for t in prompt):
            raise _validation_error([_verr("greater_than_equal", "body.prompt.0", "Input should be greater than or equal to 0", prompt)])
        if not all(isinstance(t, int) for t in prompt) and len(prompt) > 1024:
            raise _bad_request(f"prompt list length {len(prompt)} exceeds the maximum allowed count of 1024.", "prompt")
    if body.get("prompt_logprobs") and body.get("stream"):
        raise _bad_request("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
    if body.get("logprob_token_ids") and (not body.get("logprobs") if chat else body.get("logprobs") is None):
        raise _bad_request("when using `logprob_token_ids`, `logprobs` must be set.", "logprob_token_ids")
    limit = body.get("max_completion_tokens") if chat else None
    limit = limit if limit is not None else body.get("max_tokens")
    if limit is None and not chat:
        limit = DEFAULT_COMPLETION_MAX_TOKENS
    if body.get("min_tokens") and limit is not None and body["min_tokens"] > limit:
        raise _bad_request(f"min_tokens must be less than or equal to max_tokens={limit}, got {body['min_tokens']}.")
    if isinstance(body.get("n"), int) and body["n"] > 16384:
        raise _bad_request(f"n must be at most 16384, got {body['n']}.")
    tpt = body.get("truncate_prompt_tokens")
    if isinstance(tpt, int) and tpt > max_model_len:
        raise _bad_request(f"truncate_prompt_tokens value ({tpt}) is greater than max_model_len ({max_model_len}).", "truncate_prompt_tokens")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > 4:
        raise _validation_error([_verr("too_long", "body.stop", "List should have at most 4 items after validation", stop)])
    if stop == "" or (isinstance(stop, list) and any(not s for s in stop)):
        raise _bad_request("stop cannot contain an empty string.")
    for name in ("stop_token_ids", "allowed_token_ids", "logit_bias", "bad_words"):
        v = body.get(name)
        if v is None:
            continue
        if not isinstance(v, dict if name == "logit_bias" else list):
            raise _validation_error([_verr("list_type", f"body.{name}", "Input should be a valid list", v)])
        if name == "bad_words" and any(not w for w in v):
            raise _bad_request("bad_words cannot contain an empty string.", name)
        if name == "allowed_token_ids" and not v:
            raise _bad_request("allowed_token_ids is not None and empty!", name)
        if name == "logit_bias":
            if not all(k.lstrip("-").isdigit() for k in v):
                raise _bad_request("logit_bias contains key(s) that cannot be converted to integer token IDs", name)
            v = [int(k) for k in v]
        if name != "bad_words" and any(not isinstance(t, int) or t < 0 or t >= VOCAB_SIZE for t in v):
            raise _bad_request(f"token_id(s) in {name} contain out-of-vocab token ids.", name)
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > 128 or any(c in "@/\\\x00" for c in salt)):
        raise _bad_request("Parameter 'cache_salt' must be a non-empty string of at most 128 characters.", "cache_salt")
    if body.get("truncation_side") not in (None, "left", "right"):
        raise _validation_error([_verr("literal_error", "body.truncation_side", "Input should be 'left' or 'right'", body["truncation_side"])])
    for name in ("kv_transfer_params", "vllm_xargs", "chat_template_kwargs"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise _validation_error([_verr("dict_type", f"body.{name}", "Input should be a valid dictionary", body[name])])
    budget = body.get("thinking_token_budget")
    if budget is not None and budget != -1:  # -1 means unlimited, i.e. unset
        raise _bad_request("thinking_token_budget is set but reasoning_config is not configured.")
    if not chat and body.get("suffix") is not None:
        raise _bad_request("suffix is not currently supported", "suffix")
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise _ApiError(500, f"'{type(so).__name__}' object has no attribute 'get'", "InternalServerError", None)
        given = [k for k in _SO_CONSTRAINTS if so.get(k) is not None]
        if len(given) != 1 or so.get("choice") == [] or not isinstance(so.get("choice", []), list):
            raise _bad_request("You must use one kind of structured outputs constraint.", "structured_outputs")
        if so.get("regex") is not None and not _regex_ok(so["regex"]):
            raise _bad_request("Grammar error: invalid regex")
        if chat and isinstance(body.get("tool_choice"), dict) and given[0] in ("json", "regex", "choice"):
            raise _bad_request("You can only either use constraints for structured outputs or tools, not both.")
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema", "structural_tag"):
            raise _validation_error([_verr("literal_error", "body.response_format.type", "Input should be 'text', 'json_object' or 'json_schema'", rf)])
        if rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if js is None:
                raise _bad_request("When response_format type is 'json_schema', the 'json_schema' field must be provided.", "response_format")
            if not isinstance(js, dict) or not isinstance(js.get("name"), str):
                raise _validation_error([_verr("missing", "body.response_format.json_schema.name", "Field required", js)])
    if chat:
        _check_chat_rules(body)


def _regex_ok(pattern: Any) -> bool:
    try:
        re.compile(pattern)
    except (re.error, TypeError):
        return False
    return True


def _check_chat_rules(body: dict[str, Any]) -> None:
    if body.get("top_logprobs") and not body.get("logprobs"):
        raise _bad_request("when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)", "top_logprobs")
    if body.get("continue_final_message") and body.get("add_generation_prompt"):
        raise _bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    if body.get("reasoning_effort") not in (None, "none", "minimal", "low", "medium", "high", "xhigh", "max"):
        raise _validation_error([_verr("literal_error", "body.reasoning_effort", "Input should be a reasoning effort", body["reasoning_effort"])])
    for name in ("chat_template", "mm_processor_kwargs"):
        if body.get(name):
            raise _bad_request(f"{name} is passed with the request, but the server does not trust it.", name)
    tools, choice = body.get("tools"), body.get("tool_choice", "auto" if body.get("tools") else "none")
    if tools == []:
        raise _bad_request("`tools` must not be an empty array.", "tools")
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, dict) or not isinstance((tool.get("function") or {}).get("name"), str):
            raise _validation_error([_verr("missing", f"body.tools.{i}.function.name", "Field required", tool)])
    if choice in (None, "none"):
        return
    if not tools:
        raise _bad_request("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise _bad_request("Expected field `name` in `function` in `tool_choice`!", "tool_choice.function.name")
        if name not in [t["function"]["name"] for t in tools]:
            raise _bad_request("The tool specified in `tool_choice` does not match any of the specified `tools`", "tool_choice")
        raise _bad_request(f'tool_choice=function "{name}" requires --tool-call-parser to be set')
    if choice not in ("auto", "required"):
        raise _bad_request(f"Invalid value for `tool_choice`: {choice}!", "tool_choice")
    # this double runs like the test server: no tool-call parser, no auto tool choice
    raise _bad_request(f'"{choice}" tool choice requires --tool-call-parser to be set')
