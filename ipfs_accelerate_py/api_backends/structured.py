"""Typed structured outputs: ``response_model=SomePydanticModel`` -> ``result.parsed``.

Why: a JSON-schema answer otherwise comes back as text the caller must parse and check.
Given a pydantic model, the client sends its JSON schema the way the server constrains
decoding with it (chat: ``response_format`` ``json_schema``; completions:
``structured_outputs.json``, vLLM's field), then validates the answer into an instance:
``result.parsed`` (``ParsedResult``, a ``CompletionResult`` with one more field). An answer
that does not validate (a grammar cut short by ``max_tokens``, say) raises
``StructuredOutputError`` carrying the raw text and the whole result. openai-python's
``chat.completions.parse()`` is the model for this.

Streams take ``response_model`` too (``stream`` / ``astream``): the request asks for the
schema (``with_schema``), and once the stream has ended its ``parsed`` is the instance, or
the last step of the iteration raises ``StructuredOutputError``.

``StructuredOutputsMixin`` adds the ``response_model`` keyword to ``run_inference``,
``chat_completion`` and their async twins by wrapping them (it comes before
``BaseApiBackend`` in a client's bases), so the request path itself is unchanged.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

import pydantic

from .errors import StructuredOutputError, ValidationError
from .models import ChatRequest, CompletionResult, Request, validate_request

__all__ = ["ParsedResult", "StructuredOutputsMixin", "schema_parameters", "parse_result",
           "parse_answer", "with_schema"]


class ParsedResult(CompletionResult):
    """A ``CompletionResult`` whose first choice's text validated as the ``response_model``."""

    parsed: Any = None


def _check_model(response_model: Any) -> Type[pydantic.BaseModel]:
    if not (isinstance(response_model, type) and issubclass(response_model, pydantic.BaseModel)):
        raise ValidationError(f"must be a pydantic model class, not {response_model!r}",
                              field="response_model")
    return response_model


def schema_parameters(response_model: Any, parameters: Optional[Dict[str, Any]],
                      chat: bool) -> Dict[str, Any]:
    """``parameters`` plus the constraint that makes the server answer ``response_model``'s
    JSON schema; a constraint the caller set already is a conflict, refused."""
    model = _check_model(response_model)
    params = dict(parameters or {})
    for key in ("response_format", "structured_outputs"):
        if params.get(key) is not None:
            raise ValidationError(f"response_model sets {key}; give one or the other", field=key)
    schema = model.model_json_schema()
    if chat:
        params["response_format"] = {"type": "json_schema", "json_schema": {
            "name": model.__name__, "schema": schema}}
    else:
        params["structured_outputs"] = {"json": schema}
    return params


def parse_answer(text: str, finish_reason: Optional[str],
                 response_model: Type[pydantic.BaseModel], result: Any = None) -> Any:
    """``text`` validated as ``response_model``: an instance, or ``StructuredOutputError``
    carrying the text (and ``result``, the whole reply, when there is one)."""
    try:
        return response_model.model_validate_json(text)
    except pydantic.ValidationError as exc:
        why = "the output was cut short by max_tokens; " if finish_reason == "length" else ""
        raise StructuredOutputError(
            f"the answer is not a valid {response_model.__name__} ({why}"
            f"{exc.error_count()} problem(s): {exc.errors(include_url=False)[0].get('msg')})",
            raw_text=text, result=result, errors=exc.errors(include_url=False)) from None


def parse_result(result: CompletionResult, response_model: Type[pydantic.BaseModel]) -> ParsedResult:
    """``result`` with ``parsed``, the first choice's text validated as ``response_model``."""
    parsed = parse_answer(result.text, result.finish_reason, response_model, result)
    return ParsedResult.model_construct(**dict(result), parsed=parsed)


def with_schema(request: Request, response_model: Any) -> Request:
    """A streamed ``request`` that asks for ``response_model``'s JSON schema (as
    ``schema_parameters`` does for the complete calls), validated again as its class."""
    chat = isinstance(request, ChatRequest)
    fields = request.model_dump(exclude_unset=True)
    return validate_request(type(request), schema_parameters(response_model, fields, chat))


def _is_chat(inputs: Any) -> bool:
    return isinstance(inputs, (list, tuple)) and bool(inputs) and all(
        isinstance(m, dict) and "role" in m for m in inputs)


class StructuredOutputsMixin:
    """``response_model=`` on ``run_inference``, ``chat_completion`` and the async twins."""

    def run_inference(self, model_id: Optional[str], inputs: Any,
                      parameters: Optional[Dict[str, Any]] = None, priority: int = 1,
                      endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
                      timeout: Optional[float] = None,
                      response_model: Optional[Type[pydantic.BaseModel]] = None) -> CompletionResult:
        """``BaseApiBackend.run_inference``; with ``response_model`` the result is a
        ``ParsedResult`` (``.parsed``) or ``StructuredOutputError`` is raised."""
        if response_model is None:
            return super().run_inference(model_id, inputs, parameters, priority,  # type: ignore[misc]
                                         endpoint_id, fail_fast, timeout)
        params = schema_parameters(response_model, parameters, _is_chat(inputs))
        result = super().run_inference(model_id, inputs, params, priority,  # type: ignore[misc]
                                       endpoint_id, fail_fast, timeout)
        return parse_result(result, response_model)

    async def arun_inference(self, model_id: Optional[str], inputs: Any,
                             parameters: Optional[Dict[str, Any]] = None, priority: int = 1,
                             endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
                             timeout: Optional[float] = None,
                             response_model: Optional[Type[pydantic.BaseModel]] = None
                             ) -> CompletionResult:
        """``run_inference`` for coroutines."""
        if response_model is None:
            return await super().arun_inference(  # type: ignore[misc]
                model_id, inputs, parameters, priority, endpoint_id, fail_fast, timeout)
        params = schema_parameters(response_model, parameters, _is_chat(inputs))
        result = await super().arun_inference(  # type: ignore[misc]
            model_id, inputs, params, priority, endpoint_id, fail_fast, timeout)
        return parse_result(result, response_model)

    def chat_completion(self, messages: Any, model: Optional[str] = None, priority: int = 1,
                        response_model: Optional[Type[pydantic.BaseModel]] = None, *,
                        endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
                        timeout: Optional[float] = None, **parameters: Any) -> CompletionResult:
        """``BaseApiBackend.chat_completion``; with ``response_model`` (sent as
        ``response_format`` json_schema) the result is a ``ParsedResult``."""
        options = {"endpoint_id": endpoint_id, "fail_fast": fail_fast, "timeout": timeout}
        if response_model is None:
            return super().chat_completion(messages, model, priority,  # type: ignore[misc]
                                           **options, **parameters)
        params = schema_parameters(response_model, parameters, chat=True)
        result = super().chat_completion(messages, model, priority,  # type: ignore[misc]
                                         **options, **params)
        return parse_result(result, response_model)

    async def achat_completion(self, messages: Any, model: Optional[str] = None,
                               priority: int = 1,
                               response_model: Optional[Type[pydantic.BaseModel]] = None, *,
                               endpoint_id: Optional[str] = None, fail_fast: Optional[bool] = None,
                               timeout: Optional[float] = None,
                               **parameters: Any) -> CompletionResult:
        """``chat_completion`` for coroutines."""
        options = {"endpoint_id": endpoint_id, "fail_fast": fail_fast, "timeout": timeout}
        if response_model is None:
            return await super().achat_completion(  # type: ignore[misc]
                messages, model, priority, **options, **parameters)
        params = schema_parameters(response_model, parameters, chat=True)
        result = await super().achat_completion(  # type: ignore[misc]
            messages, model, priority, **options, **params)
        return parse_result(result, response_model)
