"""Writing TOML: the effective configuration (``skillhub config check``, :meth:`Config.dump`) as text that
``tomllib`` reads back to the same values. The standard library reads TOML but does not write it."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from skillhub.errors import ConfigError

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_str(text: str) -> str:
    """``text`` as a TOML basic string."""
    return '"' + "".join(
        _ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in text
    ) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_str(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)  # not repr(): subclasses (IntEnum) print otherwise
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else float.__repr__(value)
    if isinstance(value, (str, Path)):
        return toml_str(str(value))
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def toml_table(header: tuple[str, ...], table: Mapping[str, Any]) -> list[str]:
    """Lines of one table (``header`` = its dotted name): its header, its plain keys (unset ones as comments), then its sub-tables."""
    lines = [f"[{'.'.join(_toml_key(h) for h in header)}]"] if header else []
    subtables = []
    for key, value in table.items():
        if value is None:
            lines.append(f"# {_toml_key(key)} is not set")
        elif isinstance(value, Mapping):
            subtables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in subtables:
        lines += ["", *toml_table((*header, key), value)]
    return lines
