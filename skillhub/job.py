"""A localization job: one staged checkpoint → its validated mask, head and examples (DESIGN §3 "localize", §7).

The job is the expensive, independent half of ingesting a drop, and nothing in it writes: it opens the staged
checkpoint once, lets the family validate it against the base and derive its head and few-shot examples, and runs the
strategy (with the data-driven fall-back and the ``sparsity = "auto"`` ladder). What it returns is registered by the
one process that writes the registry (:mod:`skillhub.ingest`). Because a job carries its inputs by value
(:class:`LocalizeJob`) and needs only a :class:`Workspace` (θ₀, the family, the plugins, the device), an executor
(:mod:`skillhub.executor`) can run it on the caller's thread or in another process, on another machine that sees
the same files.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from skillhub import faultpoints, kernels
from skillhub.autosparsity import localize_auto, wants_auto
from skillhub.checkpoint import Checkpoint, open_checkpoint
from skillhub.config import BaseSection
from skillhub.delta import SparseDelta
from skillhub.errors import CheckpointError, ExecutorError, LocalizeError
from skillhub.families import Examples, ModelFamily, Prepared
from skillhub.fingerprints import fingerprint
from skillhub.head import Head
from skillhub.localize import LocalizeContext
from skillhub.log import get_logger
from skillhub.ops import LocalizeResult, localize_checkpoint
from skillhub.placement import runtime_on
from skillhub.plugins import Plugins, load_plugins
from skillhub.routing import SkillPatcher

log = get_logger("skillhub.job")


def skill_seed(source_sha: str) -> int:
    """The localization seed of a checkpoint: the first 32 bits of its sha256."""
    return int(source_sha[:8], 16) if source_sha else 0


@dataclass(frozen=True)
class LocalizeJob:
    """Everything one localization needs besides its :class:`Workspace`, by value (it may travel to a worker).

    :param path: the staged checkpoint (a file or a folder of shards), on storage the worker can read.
    :param skill: the skill's name (for the mask's provenance and the logs).
    :param version_id: the registry row the result is for (the job itself never touches the registry).
    :param source_sha: the checkpoint's sha256 (its content hash; also seeds random strategies).
    :param strategy, params: what the configuration asks for (:func:`skillhub.desired.localization`).
    :param sidecar: the drop's parsed sidecar (head, classes, examples' location).
    :param fallback: ``[localize] fallback`` at submission time (FAULTS B12).
    :param max_relative_delta: ``[localize] max_relative_delta`` at submission time (FAULTS B7, B9).
    """

    path: Path
    skill: str
    version_id: int
    source_sha: str
    strategy: str
    params: Mapping[str, Any]
    sidecar: Mapping[str, Any] = field(default_factory=dict)
    fallback: str | None = None
    max_relative_delta: float | None = None


@dataclass(frozen=True)
class Localized:
    """What a job gives back: the mask, and what the registry stores beside it.

    :param delta: the mask (γ⊙τ, sparse), with its provenance.
    :param seconds: the localization itself (as :func:`~skillhub.ops.localize_checkpoint` timed it).
    :param elapsed: the job after the family's validation: the objective, the ladder's steps and the localization.
    :param head: the skill's head, for families with heads.
    :param examples: the few-shot examples the drop brought, when the family reads them (the quality gate scores
        the skill on them).
    :param meta: records for the version's metadata: ``fallback`` (a data-driven strategy fell back, and why),
        ``auto_sparsity`` (the ladder's choice).
    :param worker: where it ran (``pid@host``), for the logs.
    """

    delta: SparseDelta
    seconds: float
    elapsed: float
    head: Head | None = None
    examples: Examples | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    worker: str = ""


class Workspace:
    """What jobs run against: θ₀, its fingerprint, the family, the plugins and the device, plus a runnable copy of θ₀
    built on first use (to score masks for ``sparsity = "auto"``). One per process and base; not thread-safe for
    the scorer, so one thread runs jobs on a workspace at a time."""

    def __init__(self, *, base: Checkpoint, base_sha: str, family: ModelFamily, plugins: Plugins,
                 device: torch.device) -> None:
        self.base, self.base_sha, self.family = base, base_sha, family
        self.plugins, self.device = plugins, device
        self._patcher: SkillPatcher | None = None
        # A workspace lives as long as its process (the daemon, a Ray worker), so the compiled localization pass
        # pays for its loading here: in the background, before the first drop needs it (skillhub.kernels). Not a
        # daemon thread: a process that exits while numba compiles (the first run on a machine, ~3 s) would be
        # aborted in LLVM's C++ ("terminate called without an active exception"); exit waits for it instead.
        threading.Thread(target=kernels.warm, name="skillhub-kernels").start()

    def scorer(self) -> SkillPatcher | None:
        """A runnable copy of θ₀ to score localized models on (``None``: the family runs no model)."""
        if self._patcher is None:
            self._patcher = scorer_for(self.base, self.family, self.device)
        return self._patcher


def scorer_for(base: Checkpoint, family: ModelFamily, device: torch.device) -> SkillPatcher | None:
    """A runnable copy of θ₀ on ``device`` that masks are patched into to be scored (``None``: the family runs no
    model)."""
    rt = runtime_on(family.runtime, device)({k: base.tensor(k) for k in base})
    return None if rt is None else SkillPatcher(rt)


def run(job: LocalizeJob, ws: Workspace) -> Localized:
    """Validate and localize ``job``'s checkpoint against ``ws``'s base. Pure of side effects on the state folder.

    Raises a :class:`~skillhub.errors.SkillhubError` naming the problem when the checkpoint cannot be used.
    """
    faultpoints.reach("localize_job")
    ft = open_checkpoint(job.path)
    declared = ft.metadata.get("skillhub.base")
    if declared and declared != ws.base_sha:  # checked again here: a worker may see another file than the daemon
        raise CheckpointError(f"declares base {declared[:12]}…, but the served base is {ws.base_sha[:12]}…",
                              path=job.path, hint="drop a finetune of the configured base model")
    prepared = _prepare(job, ws, ft)
    t0 = time.perf_counter()
    meta: dict[str, Any] = {}
    strategy, params = job.strategy, job.params
    # Each skill its own seed, from its content: random strategies (DARE) draw different positions for different
    # skills, and the same positions for the same checkpoint whenever it is localized again.
    ctx = LocalizeContext(device=ws.device, seed=skill_seed(job.source_sha))
    if ws.plugins.localizer(strategy).needs_examples:
        try:
            if prepared.examples is None:
                raise LocalizeError(prepared.examples_error or "no few-shot examples in the drop",
                                    path=prepared.checkpoint.path)
            ctx.examples = ws.family.objective(ws.base, prepared.head, prepared.examples)
        except LocalizeError as e:  # B12: unusable few-shot data fail this skill, or fall back if configured
            if job.fallback is None:
                raise
            log.warning("localize_fallback", skill=job.skill, strategy=strategy, fallback=job.fallback, reason=str(e))
            meta["fallback"] = {"from": strategy, "reason": str(e)}
            strategy, params = job.fallback, {}

    def localize(p: Mapping[str, Any]) -> LocalizeResult:
        return localize_checkpoint(ws.base, prepared, family=ws.family, localizer=strategy, params=p,
                                   plugins=ws.plugins, skill=job.skill, base_sha=ws.base_sha,
                                   source_sha=job.source_sha, ctx=ctx, max_relative_delta=job.max_relative_delta)

    if wants_auto(params):
        result, meta["auto_sparsity"] = localize_auto(localize, lambda r: r.delta, params, prepared, ws.scorer,
                                                      skill=job.skill, tag=f"auto:{job.version_id}")
    else:
        result = localize(params)
    return Localized(result.delta, result.seconds, time.perf_counter() - t0, prepared.head, prepared.examples, meta)


def _prepare(job: LocalizeJob, ws: Workspace, ft: Checkpoint) -> Prepared:
    """The family's one pass over the checkpoint, with the drop's examples when the family reads them (the quality
    gate scores every skill that brings them)."""
    return prepare(ws.family, ws.base, ft, job.sidecar, needs=ws.plugins.localizer(job.strategy).needs_examples
                   and job.fallback is None, wants=ws.family.reads_examples)


def prepare(family: ModelFamily, base: Checkpoint, ft: Checkpoint, sidecar: Mapping[str, Any] | None, *,
            needs: bool, wants: bool) -> Prepared:
    """``family.prepare`` with the examples read when ``needs`` (missing or unusable examples raise) or ``wants``
    them (then missing or unusable ones are only recorded in ``examples_error``: they matter to a strategy that
    needs them, to ``sparsity = "auto"`` and to the quality gate, which each say so)."""
    try:
        return family.prepare(base, ft, sidecar, examples=needs or wants)
    except LocalizeError as e:
        if needs:
            raise
        prepared = family.prepare(base, ft, sidecar)
        return Prepared(prepared.checkpoint, prepared.head, None, examples_error=str(e))


def open_workspace(base_path: Path, base_sha: str, family: ModelFamily, plugins: Plugins,
                   device: torch.device) -> Workspace:
    """A workspace on the base at ``base_path``, refusing a file that is not the base ``base_sha`` names (a worker
    on another machine must see the very base the daemon serves, or its masks would be wrong without a sound)."""
    base = open_checkpoint(base_path)
    if fingerprint(base) != base_sha:
        raise CheckpointError(f"this worker's base is not the served one (sha256 {fingerprint(base)[:12]}…, expected "
                              f"{base_sha[:12]}…)", path=base_path,
                              hint="every worker must see the same [base] weights at the same path (shared storage)")
    return Workspace(base=base, base_sha=base_sha, family=family, plugins=plugins, device=device)


@dataclass(frozen=True)
class WorkspaceSpec:
    """How a worker process opens its own :class:`~skillhub.job.Workspace`: the ``[base]`` section, the base's
    fingerprint (checked against the file the worker sees), the plugin folders and the device setting."""

    base: BaseSection
    base_sha: str
    plugin_dirs: tuple[Path, ...]
    device: str

    def open(self) -> Workspace:
        """Load the plugins, build the family and open the base, as the daemon does at start-up."""
        from skillhub.stitch import resolve_device

        if self.base.weights is None:
            raise ExecutorError("a localization worker needs [base] weights", key="base.weights")
        plugins = load_plugins(self.plugin_dirs)
        family = plugins.family(self.base.family).from_config(self.base)
        return open_workspace(Path(self.base.weights), self.base_sha, family, plugins, resolve_device(self.device))
