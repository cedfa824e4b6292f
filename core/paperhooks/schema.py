"""Build frozen config dataclasses from recipe mappings, with errors that name the key.

Supported field types: ``int``, ``float``, ``str``, ``bool``, ``Literal[...]``,
``tuple[T, ...]``, ``tuple[T1, T2]``, ``X | None`` and nested dataclasses. That is all a
recipe may hold: plain data.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from paperhooks.errors import ConfigKeyError, ConfigTypeError, did_you_mean


def type_name(tp: Any) -> str:
    """A short human name of a field type, as shown in error messages and docs."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def allowed_keys(cls: type) -> str:
    hints = typing.get_type_hints(cls)
    return ", ".join(
        f"{f.name}: {type_name(hints[f.name])}" for f in dataclasses.fields(cls) if f.init
    )


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _convert(value, arg, where)
            except ConfigTypeError as e:
                errors.append(e)
        raise ConfigTypeError(f"{where} must be {type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigTypeError(f"{where} must be null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigTypeError(
            f"{where} must be one of {type_name(tp)}, got {value!r}{did_you_mean(str(value), map(str, get_args(tp)))}"
        )
    if origin is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigTypeError(f"{where} must be a {type_name(tp)}, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigTypeError(
                f"{where} must have {len(args)} items ({type_name(tp)}), got {value!r}"
            )
        return tuple(
            _convert(v, a, f"{where}[{i}]")
            for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigTypeError(
                f"{where} must be a mapping with keys {allowed_keys(tp)}; got {value!r}"
            )
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigTypeError(
            f"{where}: the config declares an unsupported field type {tp!r}; recipe fields may be "
            "int, float, str, bool, Literal, tuple[...], X | None or nested frozen dataclasses"
        )
    raise ConfigTypeError(f"{where} must be {type_name(tp)}, got {type(value).__name__} {value!r}")


def build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Instantiate the config dataclass ``cls`` from ``values``; ``where`` names the recipe key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigKeyError(
                f"unknown key {where}.{key}{did_you_mean(str(key), fields)}; allowed keys: {allowed_keys(cls)}"
            )
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigTypeError(f"{where}: {e}") from None


def to_plain(config: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML-able data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return plain(config)
