"""Typed validation of a parsed YAML mapping against the config's frozen dataclasses: `build` checks every key
(unknown keys get a "did you mean"), coerces values to the field's type (Literal choices, unions, tuples, paths,
numbers written as strings) and raises ConfigError naming the dotted key; `resolve_paths` makes path fields
absolute against the config's folder. No torch here."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError


def build(cls: type, raw: Any, where: str) -> Any:
    """Validate `raw` against dataclass `cls`; `where` is the dotted path for messages."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {show(raw)}")
    hints = get_type_hints(cls)
    known = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    names = [f.name for f in known]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {join_key(where, close[0])}?" if close else f"known keys: {', '.join(names)}"
            raise ConfigError(f"{join_key(where, str(key))}: unknown key", hint=hint)
    kwargs = {}
    for f in known:
        dotted = join_key(where, f.name)
        if f.name in raw:
            kwargs[f.name] = coerce(hints[f.name], raw[f.name], dotted)
        elif f.metadata.get("required"):
            raise ConfigError(f"{dotted}: required key is missing", hint="see configs/ for examples")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(join_key(where, e.message), hint=e.hint) from None


def coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        sections = [o for o in options if dataclasses.is_dataclass(o)]
        if isinstance(value, dict) and sections:  # a mapping can only be the section: its own message
            return coerce(sections[0], value, key)
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(option, value, key)
            except ConfigError as e:
                errors.append(e.message.removeprefix(f"{key}: "))
        raise ConfigError(f"{key}: {' or '.join(dict.fromkeys(errors))}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"did you mean {close[0]}?" if close else None
        raise ConfigError(f"{key}: expected one of {' | '.join(map(str, choices))}, got {show(value)}", hint=hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single value where a list is expected: `carry: source`
        item_tp = get_args(tp)[0]
        return tuple(coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {show(value)}")
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: keys must be strings")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, {} if value is None else value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {show(value)}")
    if tp is int:
        number = as_number(value, key, "a whole number")
        if number != int(number):
            raise ConfigError(f"{key}: expected a whole number, got {show(value)}")
        return int(number)
    if tp is float:
        return float(as_number(value, key, "a number"))
    if tp is str:
        if isinstance(value, str) and value:
            return value
        raise ConfigError(f"{key}: expected text, got {show(value)}", hint="quote it if it is meant as text")
    if tp is Path:
        if isinstance(value, str) and value:
            return Path(value).expanduser()
        raise ConfigError(f"{key}: expected a path, got {show(value)}")
    raise TypeError(f"config type {tp} of {key} is not handled")  # a bug in this module


def as_number(value: Any, key: str, what: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected {what}, got {show(value)}")
    if isinstance(value, str):  # PyYAML reads 1e-3 as a string
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"{key}: expected {what}, got {show(value)}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected {what}, got {show(value)}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value}")
    return value


def positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{name}: must be > 0, got {value}")


def resolve_paths(obj: Any, base: Path) -> Any:
    """Make every path field absolute; inputs missing next to the config are looked for in cwd."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = resolve_paths(value, base)
        elif isinstance(value, Path) and f.metadata.get("path"):
            if not value.is_absolute():
                candidate = base / value
                if f.metadata["path"] == "input" and not candidate.exists() and value.exists():
                    candidate = value.resolve()
                value = candidate
            changes[f.name] = Path(value).resolve() if value.exists() else Path(os.path.normpath(value))
    return dataclasses.replace(obj, **changes)


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def join_key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}"
