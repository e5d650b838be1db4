"""YAML loading with YAML 1.2 numbers: ``1e-3`` is a float (PyYAML's YAML 1.1 rules read it as a string).

Malformed YAML raises :class:`engram.errors.ConfigError` naming the source and the line, never a bare
``yaml.YAMLError``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$""", re.X),
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
        line = p.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file as UTF-8") from e
    return load_yaml(text, source=str(p))
