"""Configuration: ``config.toml`` → frozen, validated pydantic models, passed explicitly (DESIGN §6, §8).

Precedence, lowest first: the defaults below < the config file < ``SKILLHUB_*`` environment variables < overrides
from CLI flags. Every model forbids unknown keys, so a typo is an error naming the field with a close-match hint
instead of a silently ignored setting (FAULTS B11). Relative paths are made absolute against the config file's
folder, so the daemon behaves the same whatever its working directory.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from skillhub.errors import ConfigError
from skillhub.tomlwrite import toml_str, toml_table

__all__ = [
    "CONFIG_ENV", "DEFAULT_CONFIG_NAME", "ENV_PREFIX", "BaseSection", "Config", "LocalizeSection", "PluginsSection",
    "ServeSection", "SkillSection", "SkillsSection", "StateSection", "StitchSection", "WatchSection", "load_config",
]

#: prefix of the environment variables that override config keys (``SKILLHUB_SERVE__PORT=9000``).
ENV_PREFIX = "SKILLHUB_"
#: environment variable naming the config file when ``load_config`` is given no path.
CONFIG_ENV = "SKILLHUB_CONFIG"
#: the config file looked for in the working directory when neither a path nor ``$SKILLHUB_CONFIG`` is given.
DEFAULT_CONFIG_NAME = "config.toml"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseSection(_Section):
    """``[base]``: the base model every skill was finetuned from."""

    family: str = "state_dict"
    """Model family: ``open_clip`` or ``state_dict`` built in; plugins may add more, so only the form is checked."""
    weights: Path | None = None
    """Base weights (safetensors file or sharded folder); ``None`` = the built-in demo model."""
    model: str | None = None
    """open_clip model name or config (family ``open_clip``)."""
    include: list[str] = Field(default_factory=list)
    """fnmatch patterns of tensor keys to merge; empty = the family's default."""
    exclude: list[str] = Field(default_factory=list)
    """fnmatch patterns of tensor keys never to merge."""
    factory: str | None = None
    """``module:callable`` building the torch model for inference (family ``state_dict``)."""

    @field_validator("family")
    @classmethod
    def _family_is_identifier(cls, value: str) -> str:
        if not _IDENTIFIER.fullmatch(value):
            raise ValueError("must be an identifier such as 'open_clip' or 'state_dict'")
        return value

    @field_validator("factory")
    @classmethod
    def _factory_is_import_path(cls, value: str | None) -> str | None:
        if value is not None and not _FACTORY.fullmatch(value):
            raise ValueError("must have the form 'module:callable', e.g. 'mypkg.models:build'")
        return value


class WatchSection(_Section):
    """``[watch]``: the inbox folder the daemon watches for dropped skills."""

    dir: Path = Path("inbox")
    rescan_seconds: float = Field(30.0, gt=0)
    """Full rescan period; the safety net under the file-system events."""
    stable_seconds: float = Field(1.0, ge=0)
    """A file is ingested once its size and mtime have not changed for this long."""
    shard_timeout_seconds: float = Field(600.0, gt=0)
    """A sharded drop whose shards are still incomplete after this long is rejected."""
    poll: bool = False
    """Force the polling observer (network file systems, where events do not arrive)."""


class StateSection(_Section):
    """``[state]``: where the registry, masks and published models live."""

    dir: Path = Path("state")
    keep_versions: int = Field(5, ge=1)
    """Published model versions kept on disk; older ones are pruned."""
    keep_staged: bool = True
    """Keep the staged copy of each ingested finetune (needed to re-localize with other params)."""
    write_weights: bool = True
    """Write ``model.safetensors`` for each published version (off: masks and manifest only)."""


class LocalizeSection(_Section):
    """``[localize]``: the default localization strategy and its params (validated by the strategy itself)."""

    strategy: str = Field("dataless", min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    max_relative_delta: float = Field(0.5, gt=0)
    """Refuse a finetune whose ‖τ‖/‖θ₀‖ exceeds this: another base model, or a damaged file (FAULTS B7, B9)."""
    fallback: str | None = Field(None, min_length=1)
    """A strategy to use when a data-driven one cannot use a skill's examples (FAULTS B12); unset: the skill
    fails with the reason."""


class StitchSection(_Section):
    """``[stitch]``: how the localized skills are stitched into one model."""

    policy: str = Field("average", min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    accumulate: Literal["float32", "float64"] = "float64"
    """dtype of the running sums while stitching."""


class SkillSection(_Section):
    """``[skills.NAME]``: settings for one skill; unset fields fall back to ``[localize]``."""

    enabled: bool = True
    strategy: str | None = Field(None, min_length=1)
    params: dict[str, Any] | None = None
    """``None`` = use ``[localize.params]``."""
    version: int | None = Field(None, ge=1)
    """Pin this skill version instead of following the newest."""


class SkillsSection(_Section):
    """``[skills]``: the ``disabled`` list and the per-skill tables ``[skills.NAME]`` (gathered in ``per_skill``).

    ``disabled`` and ``per_skill`` are reserved and cannot name a skill.
    """

    disabled: list[str] = Field(default_factory=list)
    per_skill: dict[str, SkillSection] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _gather_skill_tables(cls, data: Any) -> Any:
        # In TOML the skill tables sit beside `disabled`; gathering them into one typed field keeps extra="forbid"
        # meaningful inside each table. A non-table value stays put so pydantic reports it at `skills.NAME`.
        if not isinstance(data, Mapping):
            return data
        explicit = data.get("per_skill", {})
        if not isinstance(explicit, Mapping) or not all(
            isinstance(v, (Mapping, SkillSection)) for v in explicit.values()
        ):
            raise ValueError("'per_skill' is a reserved name and cannot be used for a skill")
        tables = dict(explicit)
        tables.update((k, v) for k, v in data.items() if k not in ("disabled", "per_skill"))
        gathered: dict[str, Any] = {"per_skill": tables}
        if "disabled" in data:
            gathered["disabled"] = data["disabled"]
        return gathered

    def is_enabled(self, name: str) -> bool:
        """Whether skill ``name`` takes part in the merge: not listed in ``disabled`` (which wins) and not
        ``enabled = false`` in its table."""
        return name not in self.disabled and self.for_skill(name).enabled

    def for_skill(self, name: str) -> SkillSection:
        """The ``[skills.NAME]`` table of ``name``, or an all-defaults one when there is none."""
        table = self.per_skill.get(name)
        return table if table is not None else SkillSection()


class ServeSection(_Section):
    """``[serve]``: the HTTP server."""

    enabled: bool = True
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8750, ge=0, le=65535)
    """0 = any free port."""
    token_env: str = Field("SKILLHUB_TOKEN", min_length=1)
    """Name of the environment variable holding the bearer token (the token itself never sits in the file)."""
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    max_concurrency: int = Field(64, gt=0)
    max_batch: int = Field(32, gt=0)
    """Inference: most images embedded together (dynamic batching); 1 disables batching."""
    batch_wait_ms: float = Field(5.0, ge=0)
    """Inference: how long the batcher waits for more images once it has one."""


class PluginsSection(_Section):
    """``[plugins]``: folders whose ``*.py`` files are loaded as plugins."""

    dirs: list[Path] = Field(default_factory=lambda: [Path("plugins")])


class Config(_Section):
    """The whole, validated configuration. Build it with :func:`load_config`."""

    base: BaseSection = Field(default_factory=BaseSection)
    watch: WatchSection = Field(default_factory=WatchSection)
    state: StateSection = Field(default_factory=StateSection)
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    localize: LocalizeSection = Field(default_factory=LocalizeSection)
    stitch: StitchSection = Field(default_factory=StitchSection)
    skills: SkillsSection = Field(default_factory=SkillsSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    plugins: PluginsSection = Field(default_factory=PluginsSection)
    source: Path | None = None
    """The config file this was read from (set by :func:`load_config`; not a setting)."""

    @field_validator("device")
    @classmethod
    def _device_is_known(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value

    def dump(self) -> str:
        """The effective configuration as TOML text that :func:`load_config` reads back to an equal config.

        Unset (``None``) keys appear as comments; ``source`` appears only in the heading comment.
        """
        data = self.model_dump(exclude={"source"})
        data["skills"] = {"disabled": data["skills"]["disabled"], **data["skills"]["per_skill"]}
        origin = f"read from {toml_str(str(self.source))}" if self.source else "no config file"
        return "\n".join([f"# effective skillhub config ({origin})", *toml_table((), data)]) + "\n"


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
