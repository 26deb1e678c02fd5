"""Hyperparameters as typed dataclass fields: parse `key=value` strings, validate, describe.

An algorithm's hyperparameters are the init fields of its dataclass, each declared as
`name: type = field(default=..., metadata={"help": "..."})`. The command line passes
them as strings (`-P lr=1e-5 -P alphas=1,2,4`); `parse_params` converts each one to its
field's type, and the class's own `validate()` checks ranges.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union

from muse_bench.core.errors import ConfigError
from muse_bench.core.registry import suggest

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_NONE = frozenset({"none", "null"})


class ParamInfo(NamedTuple):
    """One hyperparameter as `muse list` shows it."""

    name: str
    type: str
    default: Any
    help: str


def hyperparameters(cls: type) -> list[dataclasses.Field]:
    """The public init fields of dataclass `cls`, in declaration order."""
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"{cls!r} is not a dataclass, so it has no hyperparameters.")
    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as exc:  # unresolvable annotation in user code
        raise ConfigError(f"cannot read the hyperparameter types of {cls.__name__}: {exc}") from exc


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def type_name(tp: Any) -> str:
    """A short readable name of a type annotation: 'float', 'int | None', 'tuple[float, ...]'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ", ".join(str(a) for a in args) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (tuple, list):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def describe(cls: type) -> list[ParamInfo]:
    """(name, type, default, help) for every hyperparameter of `cls`, for `muse list`."""
    hints = _field_types(cls)
    return [
        ParamInfo(f.name, type_name(hints[f.name]), _default_of(f), f.metadata.get("help", ""))
        for f in hyperparameters(cls)
    ]


class _BadValue(ValueError):
    """Internal: `text` does not convert to the annotated type."""


def _convert(text: str, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    stripped = text.strip()
    if origin in (Union, types.UnionType):
        if type(None) in args and stripped.lower() in _NONE:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(text, arg)
            except _BadValue:
                continue
        raise _BadValue
    if origin is Literal:
        for choice in args:
            if str(choice) == stripped:
                return choice
        raise _BadValue
    if origin in (tuple, list):
        inner = stripped
        if inner[:1] in "([" and inner[-1:] in ")]":
            inner = inner[1:-1]
        parts = [p for p in (s.strip() for s in inner.split(",")) if p]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(parts)
        elif origin is tuple and args:
            if len(parts) != len(args):
                raise _BadValue
            item_types = list(args)
        else:
            item_types = [args[0] if args else str] * len(parts)
        if not parts:
            raise _BadValue
        values = [_convert(p, t) for p, t in zip(parts, item_types, strict=True)]
        return tuple(values) if origin is tuple else values
    if tp is bool:
        low = stripped.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _BadValue
    if tp is int:
        try:
            return int(stripped)
        except ValueError:
            raise _BadValue from None
    if tp is float:
        try:
            value = float(stripped)
        except ValueError:
            raise _BadValue from None
        if not math.isfinite(value):
            raise _BadValue
        return value
    if tp is str:
        return text
    if tp is Path:
        return Path(stripped)
    raise _BadValue


def parse_value(key: str, text: str, tp: Any) -> Any:
    """Convert the string `text` for hyperparameter `key` to type `tp`, or raise ConfigError."""
    try:
        return _convert(text, tp)
    except _BadValue:
        raise ConfigError(
            f"hyperparameter {key}={text!r} is not a valid value: expected {type_name(tp)}."
        ) from None


def parse_params(cls: type, items: Iterable[str]) -> dict[str, Any]:
    """Turn `["lr=1e-5", "epochs=3"]` into `{"lr": 1e-05, "epochs": 3}` for dataclass `cls`.

    Raises ConfigError for a malformed item, an unknown or repeated key, or a value that
    does not convert to the field's type. Ranges are checked later, by `cls.validate()`.
    """
    hints = _field_types(cls)
    names = [f.name for f in hyperparameters(cls)]
    owner = cls.__dict__.get("registered_name", cls.__name__)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"hyperparameter '{item}' is not of the form key=value.")
        if key not in names:
            raise ConfigError(f"unknown hyperparameter '{key}' for {owner}.{suggest(key, names)}")
        if key in out:
            raise ConfigError(f"hyperparameter '{key}' is given twice.")
        out[key] = parse_value(key, text, hints[key])
    return out


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds; for `validate()` methods."""
    if not condition:
        raise ConfigError(message)


def params_dict(obj: Any) -> dict[str, Any]:
    """The hyperparameter values of dataclass instance `obj`, JSON-ready (tuples -> lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return {f.name: plain(getattr(obj, f.name)) for f in hyperparameters(type(obj))}
