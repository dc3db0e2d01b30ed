"""Configuration: ``config.toml`` → frozen, validated pydantic models, passed explicitly (DESIGN §6, §8).

Precedence, lowest first: the defaults of the section models (:mod:`skillhub.sections`) < the config file <
``SKILLHUB_*`` environment variables < overrides from CLI flags. Every model forbids unknown keys, so a typo is an
error naming the field with a close-match hint instead of a silently ignored setting (FAULTS B11). Relative paths are
made absolute against the config file's folder, so the daemon behaves the same whatever its working directory.

This module reads and overrides; the models live in :mod:`skillhub.sections` and are imported from here.
"""

from __future__ import annotations

import copy
import difflib
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from skillhub.errors import ConfigError
from skillhub.sections import (
    BaseSection,
    Config,
    ExecutorSection,
    FollowSection,
    LocalizeSection,
    PluginsSection,
    PublishSection,
    ServeSection,
    SkillSection,
    SkillsSection,
    StateSection,
    StitchSection,
    WatchSection,
)

__all__ = [
    "CONFIG_ENV", "DEFAULT_CONFIG_NAME", "ENV_PREFIX", "BaseSection", "Config", "ExecutorSection", "FollowSection",
    "LocalizeSection", "PluginsSection", "PublishSection", "ServeSection", "SkillSection", "SkillsSection",
    "StateSection", "StitchSection", "WatchSection", "load_config",
]

#: prefix of the environment variables that override config keys (``SKILLHUB_SERVE__PORT=9000``).
ENV_PREFIX = "SKILLHUB_"
#: environment variable naming the config file when ``load_config`` is given no path.
CONFIG_ENV = "SKILLHUB_CONFIG"
#: the config file looked for in the working directory when neither a path nor ``$SKILLHUB_CONFIG`` is given.
DEFAULT_CONFIG_NAME = "config.toml"

_SETTABLE = frozenset(Config.model_fields) - {"source"}


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, merge and validate the configuration.

    :param path: the config file. ``None``: ``$SKILLHUB_CONFIG`` if set, else ``./config.toml`` if it exists, else
        pure defaults with relative paths against the working directory.
    :param env: the environment to read ``SKILLHUB_SECTION__KEY=value`` overrides from (default ``os.environ``).
        Names are case-insensitive (keys, skill names included, are lowercased); values are TOML values where they
        parse (``9000``, ``true``, ``["a"]``) and strings otherwise, except that a text field keeps the raw text.
        Only names whose first segment is a config field apply (``SKILLHUB_TOKEN``, ``SKILLHUB_CONFIG`` do not).
    :param overrides: dotted keys from CLI flags, e.g. ``{"serve.port": 9000}``; they beat the environment. A
        ``None`` value means "flag not given" and is skipped. Table values are merged into the table.
    :raises ConfigError: for a missing or unreadable file, bad TOML, an unknown key or an invalid value; it names
        the file (``path``), the dotted field (``key``) and, for a misspelled key, the close matches (``hint``).
    """
    environ = os.environ if env is None else env
    file = _locate(path, environ)
    data = _read_toml(file) if file is not None else {}
    if "source" in data:
        raise ConfigError("'source' cannot be set in a config file", path=file, key="source",
                          hint="it records which file the config was read from; remove it")
    origins: dict[tuple[str, ...], str] = {}  # dotted key -> who set it, so errors can blame the right place
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX):
            parts = tuple(name[len(ENV_PREFIX):].lower().split("__"))
            if parts[0] in _SETTABLE:
                value = _env_value(parts, environ[name])
                _set(data, parts, value, f"environment variable {name!r}", origins, file)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        parts = tuple(key.split("."))
        if parts[0] == "source":
            raise ConfigError("'source' is not a setting", path=file, key=key)
        _set(data, parts, value, f"override {key!r}", origins, file)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, file, origins) from exc
    return _resolve_paths(config, file.parent if file is not None else Path.cwd(), file)


def _locate(path: str | Path | None, environ: Mapping[str, str]) -> Path | None:
    hint = None
    if path is None:
        if environ.get(CONFIG_ENV):
            path, hint = environ[CONFIG_ENV], f"the path comes from ${CONFIG_ENV}"
        elif Path(DEFAULT_CONFIG_NAME).is_file():
            path = DEFAULT_CONFIG_NAME
        else:
            return None
    file = Path(path).expanduser().absolute()
    if not file.exists():
        raise ConfigError("config file not found", path=file, hint=hint)
    if not file.is_file():
        raise ConfigError("config path is not a file", path=file, hint=hint)
    return file


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        with file.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", path=file) from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read config file: {reason}", path=file) from exc


def _env_value(parts: tuple[str, ...], raw: str) -> Any:
    """``raw`` as a TOML value when it is one, else as a string."""
    try:
        doc = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    if len(doc) != 1:  # "1\nother = 2": not one value
        return raw
    value = doc["v"]
    # A text field keeps the raw text, so that e.g. SKILLHUB_BASE__MODEL=1e3 is not turned into a float to reject.
    if not isinstance(value, str) and _is_text_field(parts):
        return raw
    return value


def _is_text_field(parts: Sequence[str]) -> bool:
    model = _model_at(parts[:-1])
    field = model.model_fields.get(parts[-1]) if model is not None else None
    if field is None:
        return False
    annotation = field.annotation
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return any(arg in (str, Path) for arg in (typing.get_args(annotation) if is_union else (annotation,)))


def _model_at(parts: Sequence[str | int]) -> type[BaseModel] | None:
    """The model class of the table at ``parts``; a skill name under ``skills`` selects :class:`SkillSection`."""
    model: type[BaseModel] = Config
    for name in parts:
        field = model.model_fields.get(name) if isinstance(name, str) else None
        if field is None and model is SkillsSection:
            model = SkillSection
            continue
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _set(data: dict[str, Any], parts: tuple[str, ...], value: Any, origin: str,
         origins: dict[tuple[str, ...], str], file: Path | None) -> None:
    """Set ``data[parts]`` to ``value``, creating tables on the way and merging a table value into a table."""
    dotted = ".".join(parts)
    if not all(parts):
        raise ConfigError(f"{origin} names an empty key {dotted!r}", path=file, key=dotted)
    table = data
    for i, name in enumerate(parts[:-1]):
        child = table.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin} sets '{dotted}', but '{'.'.join(parts[:i + 1])}' is not a table",
                              path=file, key=dotted)
        table = child
    if isinstance(value, Mapping) and isinstance(table.get(parts[-1]), dict):
        for key, item in value.items():  # merge a table into a table, key by key
            _set(data, (*parts, str(key)), item, origin, origins, file)
        return
    table[parts[-1]] = copy.deepcopy(value)  # never alias the caller's mutable overrides
    origins[parts] = origin


def _config_error(exc: ValidationError, file: Path | None, origins: Mapping[tuple[str, ...], str]) -> ConfigError:
    """One ConfigError for the first validation error, naming its dotted field and counting the others."""
    errors = exc.errors()
    first = errors[0]
    loc = list(first["loc"])
    if loc[:2] == ["skills", "per_skill"]:  # per_skill is our model's detail; the user wrote [skills.NAME]
        del loc[1]
    dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "<config>"
    hint = None
    if first["type"] == "extra_forbidden":
        message = f"unknown key '{dotted}'"
        hint = _key_hint(loc)
    else:
        message = f"invalid value for '{dotted}': {_describe(first)}"
    blame = _blame(tuple(str(p) for p in loc), origins)
    if blame:
        message += f" (from {blame})"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return ConfigError(message, path=file, key=dotted, hint=hint)


def _blame(loc: tuple[str, ...], origins: Mapping[tuple[str, ...], str]) -> str | None:
    """Who set the value at ``loc``: an override of it or of a table holding it, else of a key inside it."""
    for i in range(len(loc), 0, -1):
        if loc[:i] in origins:
            return origins[loc[:i]]
    return next((origin for key, origin in origins.items() if key[:len(loc)] == loc), None)


def _key_hint(loc: Sequence[str | int]) -> str | None:
    model = _model_at(loc[:-1])
    if model is None:
        return None
    valid = [name for name in model.model_fields if not (model is Config and name == "source")]
    close = difflib.get_close_matches(str(loc[-1]).lower(), valid, n=3)
    guess = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{guess}valid keys: {', '.join(valid)}"


def _describe(error: Any) -> str:
    given = repr(error.get("input"))
    given = given if len(given) <= 60 else given[:57] + "..."
    if error["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a table, got {given}"
    if error["type"] == "value_error":  # our own validators: drop pydantic's "Value error, " prefix
        return f"{error['ctx']['error']}, got {given}"
    msg: str = error["msg"]
    return f"{msg[:1].lower()}{msg[1:]}, got {given}"


def _resolve_paths(config: Config, base_dir: Path, file: Path | None) -> Config:
    """Make the configured paths absolute against ``base_dir`` (the config file's folder), expanding ``~``."""

    def absolute(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else base_dir / p

    weights = config.base.weights
    model = config.base.model
    # A model given as a config file (open_clip: `x.json` or `local-dir:FOLDER`) is a path like the others.
    if model and model.endswith(".json"):
        model = str(absolute(Path(model)))
    elif model and model.startswith("local-dir:"):
        model = "local-dir:" + str(absolute(Path(model.removeprefix("local-dir:"))))
    return config.model_copy(update={
        "base": config.base.model_copy(update={"weights": absolute(weights) if weights is not None else None,
                                               "model": model}),
        "watch": config.watch.model_copy(update={"dir": absolute(config.watch.dir)}),
        "state": config.state.model_copy(update={"dir": absolute(config.state.dir)}),
        "plugins": config.plugins.model_copy(update={"dirs": [absolute(d) for d in config.plugins.dirs]}),
        "source": file,
    })


# --- a minimal TOML writer, enough for Config.dump() ---
