"""YAML → validated dataclasses, and back.

A config is a (possibly nested) dataclass.  :func:`load_config` builds one from a YAML file or a dict and
checks every value against the field's type hint; every error is a one-line :class:`ConfigError` that
names the file and the full dotted key, e.g.::

    lowres_demo.yaml: unknown key 'model.chanel_mult' (did you mean 'channel_mult'?)
    lowres_demo.yaml: key 'train.batch' expects int, got '8' (str)
    lowres_demo.yaml: missing required key 'model.channels'

Supported field types: ``int``, ``float`` (ints are accepted and converted), ``bool`` (0/1 are *not*
accepted), ``str``, ``pathlib.Path`` (from a string), ``Optional[X]`` / ``X | None``, other unions (first
matching member wins), ``list[X]``, ``tuple[X, ...]`` and fixed ``tuple[X, Y]``, ``Literal[...]``,
``dict[str, X]``, nested dataclasses and ``Any``.  YAML 1.1 reads ``1e-3`` (no dot) as a string; a float
field accepts such a string.  Hints are resolved with :func:`typing.get_type_hints`, so modules may use
``from __future__ import annotations`` — the dataclasses must then be defined at module level.

Range checks belong in the dataclass itself: raise ``ValueError`` from ``__post_init__`` and the loader
re-raises it as a :class:`ConfigError` naming the file and the section::

    @dataclass
    class Train:
        lr: float = 1e-3

        def __post_init__(self):
            check_range("lr", self.lr, low=0.0, low_inclusive=False)

:func:`to_dict` / :func:`dump_yaml` turn a config back into plain YAML (``load_config`` of the result gives
an equal config), and :func:`override` applies command-line ``key.path=value`` strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import numpy as np
import yaml

T = TypeVar("T")
# YAML 1.1 (PyYAML) needs a dot in a float; '1e-3' arrives as a string.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A config file or override breaks its dataclass schema; the message names file and key."""


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` is finite and lies in the interval; for use in ``__post_init__``."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        limits = ((">=" if low_inclusive else ">", low), ("<=" if high_inclusive else "<", high))
        bounds = [f"{op} {bound}" for op, bound in limits if bound is not None]
        raise ValueError(f"{name} must be {' and '.join(bounds)}, got {value!r}")


def load_config(source: str | os.PathLike | Mapping[str, Any], cls: type[T], *,
                origin: str | None = None) -> T:
    """Build a ``cls`` instance from a YAML file path or an already-parsed mapping.

    ``origin`` names the source in error messages (default: the path, or ``'config'`` for a mapping).
    """
    if isinstance(source, Mapping):
        data, origin = source, origin or "config"
    else:
        origin = origin or str(source)
        data = _read_yaml(Path(source), origin)
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    return _build(cls, data, "", origin)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-serialisable dict of a config (tuples become lists, paths strings)."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"to_dict needs a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def dump_yaml(cfg: Any) -> str:
    """The config as YAML text, fields in declaration order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def override(cfg: T, items: Sequence[str]) -> T:
    """Return a new config with ``'a.b.c=value'`` overrides applied (value parsed as YAML, then validated)."""
    data, result = to_dict(cfg), cfg
    for item in items:
        key, sep, text = item.partition("=")
        origin = f"override {item!r}"
        if not sep or not key.strip():
            raise ConfigError(f"{origin}: expected KEY.PATH=VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: value is not valid YAML ({_first_line(exc)})") from None
        _set_path(data, key.strip().split("."), value, origin)
        result = load_config(data, type(cfg), origin=origin)  # errors name this very override
    return result


def _read_yaml(path: Path, origin: str) -> Mapping[str, Any]:
    """Parse a YAML file into a mapping (an empty file is an empty mapping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{origin}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{origin}: cannot read config file ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: invalid YAML ({_first_line(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _first_line(exc: Exception) -> str:
    """YAML errors span several lines; keep them one-line, with the position."""
    return " ".join(str(exc).split())


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_key(origin: str, path: str, key: Any, choices: Sequence[str]) -> ConfigError:
    """The 'unknown key' error, with a close-match suggestion when there is one."""
    close = difflib.get_close_matches(str(key), list(choices), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(choices)})"
    return ConfigError(f"{origin}: unknown key '{_join(path, str(key))}'{hint}")


def _build(cls: type[T], data: Any, path: str, origin: str) -> T:
    """Instantiate dataclass ``cls`` from mapping ``data``; ``path`` is the dotted key of this section."""
    if not isinstance(data, Mapping):
        where = f"key '{path}'" if path else "config"
        raise ConfigError(f"{origin}: {where} expects a mapping ({cls.__name__}), got {_shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise _unknown_key(origin, path, key, list(fields))
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(path, name), origin)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{origin}: missing required key '{_join(path, name)}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{origin}: {path or cls.__name__}: {exc}") from None


def _convert(tp: Any, value: Any, key: str, origin: str) -> Any:
    """Check ``value`` against type hint ``tp`` and return it in that type."""
    origin_tp, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (list, tuple, dict):  # bare containers: members unchecked
        origin_tp = tp
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, origin)
    if origin_tp in (Union, types.UnionType):
        return _convert_union(tp, args, value, key, origin)
    if origin_tp is Literal:
        return _convert_literal(args, value, key, origin)
    if origin_tp in (list, tuple):
        return _convert_sequence(tp, origin_tp, args, value, key, origin)
    if origin_tp is dict:
        return _convert_dict(tp, args, value, key, origin)
    return _convert_scalar(tp, value, key, origin)


def _convert_scalar(tp: Any, value: Any, key: str, origin: str) -> Any:
    """bool, int, float, str, Path."""
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip()):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    if tp is Path and isinstance(value, (str, Path)):
        return Path(value)
    if tp not in (bool, int, float, str, Path):
        raise TypeError(f"config field '{key}' has unsupported type {_type_name(tp)}")
    raise _wrong_type(tp, value, key, origin)


def _convert_union(tp: Any, args: tuple, value: Any, key: str, origin: str) -> Any:
    """Optional[X] and X | Y: None if allowed, else the first member that accepts the value."""
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    nested = dataclasses.is_dataclass(members[0]) or typing.get_origin(members[0]) in (list, tuple, dict)
    if len(members) == 1 and nested:  # Optional[section]: keep the inner key's precise message
        return _convert(members[0], value, key, origin)
    for member in members:
        try:
            return _convert(member, value, key, origin)
        except ConfigError:
            continue
    raise _wrong_type(tp, value, key, origin)


def _convert_literal(choices: tuple, value: Any, key: str, origin: str) -> Any:
    """Literal['a', 'b']: the value must equal one choice, with the same type (True is not 1)."""
    for choice in choices:
        if type(choice) is type(value) and choice == value:
            return choice
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    shown = ", ".join(repr(c) for c in choices)
    raise ConfigError(f"{origin}: key '{key}' expects one of {shown}; got {_shown(value)}{hint}")


def _convert_sequence(tp: Any, kind: type, args: tuple, value: Any, key: str, origin: str) -> Any:
    """list[X], tuple[X, ...] and tuple[X, Y, Z] from a YAML list."""
    if not isinstance(value, (list, tuple)):
        raise _wrong_type(tp, value, key, origin)
    if kind is list or not args or (len(args) == 2 and args[1] is Ellipsis):
        member_types = [args[0] if args else Any] * len(value)
    else:
        member_types = list(args)
        if len(value) != len(member_types):
            raise ConfigError(f"{origin}: key '{key}' expects {len(member_types)} items "
                              f"({_type_name(tp)}), got {len(value)}: {value!r}")
    pairs = enumerate(zip(member_types, value, strict=True))
    items = [_convert(t, v, f"{key}[{i}]", origin) for i, (t, v) in pairs]
    return items if kind is list else tuple(items)


def _convert_dict(tp: Any, args: tuple, value: Any, key: str, origin: str) -> dict:
    """dict[str, X] from a YAML mapping."""
    if not isinstance(value, Mapping):
        raise _wrong_type(tp, value, key, origin)
    key_type, value_type = args if args else (Any, Any)
    return {_convert(key_type, k, f"{key} (a key)", origin): _convert(value_type, v, f"{key}.{k}", origin)
            for k, v in value.items()}


def _wrong_type(tp: Any, value: Any, key: str, origin: str) -> ConfigError:
    return ConfigError(f"{origin}: key '{key}' expects {_type_name(tp)}, got {_shown(value)}")


def _shown(value: Any) -> str:
    """A value and its YAML-level type for messages, e.g. ``'8' (str)``."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    """Readable type-hint name: ``int``, ``list[float]``, ``str | None``."""
    origin_tp, args = typing.get_origin(tp), typing.get_args(tp)
    if origin_tp in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin_tp is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin_tp is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin_tp.__name__}[{inner}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", repr(tp))


def _plain(value: Any) -> Any:
    """Recursively turn dataclasses, tuples and paths into dicts, lists and strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _set_path(data: dict[str, Any], parts: list[str], value: Any, origin: str) -> None:
    """Set ``data[p0][p1]...[pn] = value``; intermediate keys must already be sections."""
    node = data
    for depth, part in enumerate(parts[:-1]):
        if part not in node:
            raise _unknown_key(origin, ".".join(parts[:depth]), part, list(node))
        node = node[part]
        if not isinstance(node, dict):
            section = ".".join(parts[:depth + 1])
            raise ConfigError(f"{origin}: '{section}' is a value, not a section")
    node[parts[-1]] = value


def same_value(a, b) -> bool:
    """Equal, with numeric lists compared to a relative 1e-6 (constants that went through text or float32)."""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in a + b):
        return bool(np.allclose(a, b, rtol=1e-6, atol=1e-9))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b
