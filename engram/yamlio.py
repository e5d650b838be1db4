"""Config files: YAML loading with YAML 1.2 numbers (``1e-3`` is a float; PyYAML's YAML 1.1 rules read it as a
string) and :func:`dataclass_from_dict`, the one way a config mapping becomes a config dataclass.

Malformed YAML raises :class:`engram.errors.ConfigError` naming the source and the line, never a bare
``yaml.YAMLError``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str, source: str = "<text>") -> Any:
    """Parse YAML text (safe loader, YAML 1.2 floats); ``source`` names the text in error messages."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark, context, context_mark = (getattr(e, k, None) for k in ("problem_mark", "context", "context_mark"))
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e)
        if context and context_mark is not None:
            problem += f" ({context} started at line {context_mark.line + 1})"
        raise ConfigError(f"{where}: invalid YAML: {problem}; fix the file there") from e


def read_yaml(path: str | Path) -> Any:
    """Read and parse a YAML file (UTF-8); errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file as UTF-8") from e
    return load_yaml(text, source=str(p))


def dataclass_from_dict(cls: type[T], d: Any, name: str | None = None) -> T:
    """``cls(**d)`` for a config dataclass, with the errors a config file needs: ``d`` must be a mapping, unknown
    keys are refused by name (``unknown train fields ['stepz']; valid: [...]``), and a field whose type is a
    dataclass (optionally ``| None``) is built from its nested mapping the same way. ``name`` is the section
    the mapping came from (default: the class name)."""
    label = name or cls.__name__
    if not isinstance(d, dict):
        raise ConfigError(f"{label} must be a mapping of {cls.__name__} fields, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {label} fields {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        hint = hints.get(key)
        nested = _dataclass_in(hint)
        if nested is not None and value is not None and not isinstance(value, nested):
            value = dataclass_from_dict(nested, value, f"{name}.{key}" if name else key)
        elif nested is None and hint is not None:
            ok, value = coerce_value(value, str(value), hint)
            if not ok:
                raise ConfigError(f"{label}.{key} expects {type_name(hint)}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass ``hint`` names, alone or in a union with None."""
    if dataclasses.is_dataclass(hint):
        return hint
    options = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(options) == 1 and dataclasses.is_dataclass(options[0]):
        return options[0]
    return None


def type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "a section of fields"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def coerce_value(value: Any, raw: str, hint: Any) -> tuple[bool, Any]:
    """(matches, ``value`` converted to ``hint``); ``raw`` is the text it was parsed from (a ``--set`` value, or
    ``str(value)`` for a config file), which a string field takes as written."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        for a in args:
            ok, v = coerce_value(value, raw, a)
            if ok and a is not str:
                return True, v
        return (True, raw) if str in args else (False, value)
    if hint is type(None):
        return value is None, value
    if hint is str:
        return True, raw if not isinstance(value, str) else value  # "train.data=123" names a file called 123
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        elem = args[0] if args else Any
        items = [coerce_value(v, str(v), elem) for v in value]
        return all(ok for ok, _ in items), (tuple if origin is tuple else list)(v for _, v in items)
    return True, value  # dict, Any: taken as written
