"""What the ``skillhub`` commands share: ``--param KEY=VALUE`` parsing, and the config and plugins a command runs
with (imported only when a command needs them)."""

from __future__ import annotations

import argparse
import tomllib
from typing import Any

from skillhub.errors import UsageError


def parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UsageError(f"--param {text!r} is not KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def params(args: argparse.Namespace) -> dict[str, Any]:
    return dict(parse_param(p) for p in (getattr(args, "param", None) or []))


def config(args: argparse.Namespace) -> Any:
    from skillhub.config import load_config

    return load_config(getattr(args, "config", None))


def plugins(cfg: Any) -> Any:
    from skillhub.plugins import load_plugins

    return load_plugins(cfg.plugins.dirs)
