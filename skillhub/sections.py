"""``config.toml``'s sections as frozen pydantic models: the defaults, the types and the checks of each field (DESIGN
§6, §8). Every model forbids unknown keys, so a typo is an error naming the field instead of a silently ignored
setting (FAULTS B11). Reading a file and the ``SKILLHUB_*`` environment into a :class:`Config` is
:func:`skillhub.config.load_config`'s job; import these names from :mod:`skillhub.config` as well.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from skillhub.tomlwrite import toml_str, toml_table

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
    """The strategy's params. Unset (no ``[localize.params]`` table) with the ``dataless`` strategy:
    ``{sparsity = "auto"}``: the smallest sparsity of 1-20 % that keeps 99 % of the finetune's accuracy on the
    drop's examples, 1 % for a drop without them (:mod:`skillhub.autosparsity`)."""
    max_relative_delta: float = Field(0.5, gt=0)
    """Refuse a finetune whose ‖τ‖/‖θ₀‖ exceeds this: another base model, or a damaged file (FAULTS B7, B9)."""
    fallback: str | None = Field(None, min_length=1)
    """A strategy to use when a data-driven one cannot use a skill's examples (FAULTS B12); unset: the skill
    fails with the reason."""

    @model_validator(mode="before")
    @classmethod
    def _auto_by_default(cls, data: Any) -> Any:
        # The service's default, not the strategy's: the library's dataless default stays the paper's fixed 1%, and
        # a config that writes its params (even an empty table) gets exactly those.
        if isinstance(data, Mapping) and "params" not in data and data.get("strategy", "dataless") == "dataless":
            data = {**data, "params": {"sparsity": "auto"}}
        return data


class StitchSection(_Section):
    """``[stitch]``: how the localized skills are stitched into one model."""

    policy: str = Field("average", min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    accumulate: Literal["float32", "float64"] = "float64"
    """dtype of the running sums while stitching."""
    sparse_from: int = Field(500_000_000, ge=0)
    """Models of at least this many included parameters keep the stitcher's sums and counts only where masks are
    (O(Σ mask sizes) of memory, adds O(mask · log) amortised); smaller ones keep them dense (about 14 bytes per
    parameter beside the merged model, every add flat O(mask)). 0: always sparse."""


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
    route: Literal["skill", "merged"] = "skill"
    """Inference: the model a skill's predict runs on when the request does not say: ``skill`` (the skill's own
    localized model θ₀ + γ⊙τ, patched in per batch) or ``merged`` (the stitched model)."""
    skill_cache_mb: int = Field(256, ge=0)
    """Inference: memory for the masks the skill route keeps read (least recently used leave first)."""


class PublishSection(_Section):
    """``[publish]``: the quality gate a stitched version passes before it is served (:mod:`skillhub.gate`)."""

    gate: Literal["hold", "warn", "off"] = "hold"
    """``hold``: a version that makes a skill with examples worse is not published; the skills it would add are held
    out of the merged model (served on their own route). ``warn``: published, and logged. ``off``: not scored."""
    max_drop: float = Field(0.05, ge=0, le=1)
    """How far a skill's merged accuracy may fall below the served version's (a fraction: 0.05 = 5 points)."""
    recalibrate_statistics: bool = False
    """Before scoring, re-estimate the served models' normalization statistics (BatchNorm running means and
    variances, for families that have them) on the skills' fit examples: a candidate version on every merged skill's
    pooled, a skill's own route on its own; the served weights carry them. Off by default: on the demo's tower,
    whose finetunes keep BatchNorm frozen, it costs about 40 points (BENCHMARKS.md). Needs ``gate`` other than
    ``off``."""


class ExecutorSection(_Section):
    """``[executor]``: where localization jobs run (DESIGN §7, :mod:`skillhub.executor`). Only the daemon ever writes
    the registry; an executor only computes masks."""

    kind: Literal["local", "ray"] = "local"
    """``local``: each drop is validated and localized on the daemon's intake thread, one at a time. ``ray``: each
    drop's job is a Ray task, and several drops localize at once (needs the ``ray`` extra)."""
    address: str = Field("local", min_length=1)
    """Ray only: ``local`` starts a one-machine Ray inside the daemon's process; ``auto`` joins the cluster this
    machine is a node of; ``HOST:PORT`` (or ``ray://HOST:10001``) a running cluster."""
    num_cpus: float = Field(1.0, gt=0)
    """Ray only: CPUs each job reserves (Ray runs as many jobs at once as its free CPUs allow)."""
    num_gpus: float = Field(0.0, ge=0)
    """Ray only: GPUs each job of a data-driven strategy (``trained``) reserves; dataless jobs reserve none."""
    on_unreachable: Literal["error", "local"] = "error"
    """Ray only: Ray cannot be imported or its cluster reached at start-up: ``error`` = refuse to start, naming
    ``[executor] address``; ``local`` = log it and localize with the local executor."""
    max_job_losses: int = Field(3, ge=1)
    """Ray only: a drop whose job lost its worker this many times (killed, out of memory) is rejected with that
    reason; fewer losses leave it pending, and it is localized again."""


class FollowSection(_Section):
    """``[follow]``: a read-only replica (``skillhub run --follow``) of the state folder a primary writes."""

    poll_seconds: float = Field(0.1, gt=0, le=60)
    """How often the follower looks at the primary's ``models/current`` (a stat of one small file; polling, not
    file-system events, so that it works on network file systems too)."""


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
    publish: PublishSection = Field(default_factory=PublishSection)
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    follow: FollowSection = Field(default_factory=FollowSection)
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
