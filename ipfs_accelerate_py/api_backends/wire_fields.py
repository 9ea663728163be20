"""Reading a reply's JSON fields with their types checked, and typed results built from them.

Why a module of its own: a reply is never trusted, so every field the client keeps is
checked here, and a wrong type is a ``ResponseError`` that names the field
(``choices[0].text``), never pydantic's untyped ``ValidationError`` from deep inside a
parse. Once each field is checked, running pydantic's validation over the same values
again is most of what parsing a reply costs (three validations of a small completion took
about as long as the rest of the client's work on it), so ``checked_model`` builds the
result without it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type, TypeVar

from pydantic import BaseModel

from .errors import ResponseError

__all__ = ["checked_model", "opt_str", "opt_int", "opt_str_or_int", "opt_dict", "opt_list",
           "opt_int_list", "opt_dict_list", "count", "field_name", "choice_at"]

M = TypeVar("M", bound=BaseModel)
_set = object.__setattr__
_DEFAULTS: Dict[type, Dict[str, Any]] = {}
_FACTORIES: Dict[type, Dict[str, Any]] = {}


def checked_model(cls: Type[M], values: Dict[str, Any]) -> M:
    """An instance of ``cls`` holding ``values`` (each already checked against its field's
    type by the functions below), its other fields at their defaults, without validating
    again. Fields given count as set (``model_fields_set``), as with ``cls(**values)``;
    ``tests/api_backends/test_wire_fields.py`` holds that it equals ``cls(**values)``."""
    defaults = _DEFAULTS.get(cls)
    if defaults is None:  # in the fields' order (a dump keeps it); factories made per model
        defaults = _DEFAULTS[cls] = {name: f.default for name, f in cls.model_fields.items()}
        _FACTORIES[cls] = {name: f.default_factory for name, f in cls.model_fields.items()
                           if f.default_factory is not None}
    fields = {**defaults, **values}
    for name, factory in _FACTORIES[cls].items():
        if name not in values:
            fields[name] = factory()  # type: ignore[call-arg]
    model = cls.__new__(cls)
    _set(model, "__dict__", fields)
    _set(model, "__pydantic_fields_set__", set(values))
    _set(model, "__pydantic_extra__", None)
    _set(model, "__pydantic_private__", None)
    return model


def _wrong(name: str, want: str, value: Any, status: Optional[int]) -> ResponseError:
    return ResponseError(f"reply field {name!r} must be {want}, got {type(value).__name__}",
                         status_code=status, field=name)


def field_name(at: str, key: str) -> str:
    """A field's name in messages: ``key`` inside the object at ``at`` (``choices[0]``,
    ``""`` for the reply itself). Made only for an error: a reply's parse reads dozens of
    fields, and naming each on the way would cost more than checking it."""
    return f"{at}.{key}" if at else key


_AT_CHOICE = tuple(f"choices[{i}]" for i in range(64))


def choice_at(position: int) -> str:
    """``choices[i]``, the place of a reply's ``i``-th choice (made once for the first 64)."""
    return _AT_CHOICE[position] if position < 64 else f"choices[{position}]"


Reader = Callable[..., Any]


def _optional(kinds: Tuple[type, ...], want: str) -> Reader:
    """A reader of ``data[key]``: the value when it is None or of one of ``kinds`` exactly
    (``bool`` is not an ``int`` here), else a ``ResponseError`` naming the field (``key``
    in the object at ``at``). Made once per kind of field, so a reply's parse pays one call
    per field."""
    def read(data: Mapping[str, Any], key: str, at: str = "",
             status: Optional[int] = None) -> Any:
        value = data.get(key)
        if value is None or type(value) in kinds:
            return value
        raise _wrong(field_name(at, key), want, value, status)
    return read


opt_str = _optional((str,), "a string or null")
opt_int = _optional((int,), "an integer or null")
opt_str_or_int = _optional((str, int), "a string, an integer or null")
opt_dict = _optional((dict,), "an object or null")


def count(data: Any, key: str, at: str = "", status: Optional[int] = None) -> int:
    """A token count: an integer, 0 when absent or null."""
    value = data.get(key)
    if type(value) is int:
        return value
    if value is None:
        return 0
    raise _wrong(field_name(at, key), "an integer", value, status)


def opt_list(value: Any, at: str, key: str,
             status: Optional[int] = None) -> Optional[List[Any]]:
    """``value`` (field ``key`` of the object at ``at``): a list or None."""
    if value is None or type(value) is list:
        return value
    raise _wrong(field_name(at, key), "a list or null", value, status)


def opt_int_list(value: Any, at: str, key: str,
                 status: Optional[int] = None) -> Optional[List[int]]:
    """A list of token ids (every element an integer), or None."""
    return _list_of(value, int, at, key, "an integer", "a list of integers or null", status)


def opt_dict_list(value: Any, at: str, key: str,
                  status: Optional[int] = None) -> Optional[List[Dict[str, Any]]]:
    """A list of objects (tool calls), or None."""
    return _list_of(value, dict, at, key, "an object", "a list of objects or null", status)


def _list_of(value: Any, kind: type, at: str, key: str, item: str, whole: str,
             status: Optional[int]) -> Optional[List[Any]]:
    if value is None:
        return None
    if type(value) is list:
        for element in value:
            if type(element) is not kind:
                raise _wrong(f"{field_name(at, key)}[]", item, element, status)
        return value
    raise _wrong(field_name(at, key), whole, value, status)
