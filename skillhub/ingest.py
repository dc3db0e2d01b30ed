"""Ingest: a staged checkpoint becomes a registered skill version (DESIGN §3, from intake to the registry).

The checkpoint is opened once; its family derives everything from it in one call (keys mapped onto the base's,
validation, head, few-shot examples when the strategy needs them); the strategy localizes it; the registry stores
the mask and the head. Exactly once per content: the same bytes are registered once, whatever their name.

Threads: :meth:`Ingestor.ingest` runs on the intake's worker (or the caller's thread), re-localizations on the
ingestor's own worker; neither holds the service's lock, because localization is the slow part.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from skillhub import faultpoints
from skillhub.autosparsity import choose
from skillhub.checkpoint import Checkpoint, fingerprint, open_checkpoint
from skillhub.config import Config
from skillhub.copying import staged_sha256
from skillhub.delta import SparseDelta
from skillhub.desired import localization
from skillhub.errors import CheckpointError, DiskFullError, LocalizeError, SkillhubError
from skillhub.families import ModelFamily, Prepared
from skillhub.localize import LocalizeContext
from skillhub.log import get_logger
from skillhub.metrics import Metrics
from skillhub.ops import LocalizeResult, base_squares, localize_checkpoint
from skillhub.placement import runtime_on
from skillhub.plugins import Plugins
from skillhub.quality import accuracy as accuracy_of
from skillhub.quality import embed, split
from skillhub.registry import Registry, VersionRow
from skillhub.routing import SkillPatcher

log = get_logger("skillhub.ingest")


def skill_name(ft: Checkpoint, *, skill: str | None, sidecar: Mapping[str, Any] | None, default_name: str | None,
               path: Path) -> str:
    """A drop's skill name: ``skill`` if given, else the sidecar's ``skill``, else the header metadata
    ``skillhub.skill``, else ``default_name`` (the drop's name in the inbox), else the file's stem."""
    name = skill or str((sidecar or {}).get("skill") or ft.metadata.get("skillhub.skill") or default_name
                        or Path(path).name.removesuffix(".safetensors"))
    if not name or not name.isprintable() or "/" in name or len(name) > 200:
        raise CheckpointError(f"unusable skill name {name!r}", path=path,
                              hint="set `skill = \"name\"` in a sidecar NAME.toml (printable, no '/')")
    return name


def skill_seed(source_sha: str) -> int:
    """The localization seed of a checkpoint: the first 32 bits of its sha256."""
    return int(source_sha[:8], 16) if source_sha else 0


class Ingestor:
    """Validates, localizes and registers checkpoints against one base.

    :param config: returns the config in force (it changes on a live reload).
    :param on_registered: called after a version became READY (the service schedules a reconcile).
    :param event: calls a plugin event hook by name (``skill_registered``, ``skill_failed``).
    """

    def __init__(self, *, registry: Registry, plugins: Plugins, family: ModelFamily, base: Checkpoint, base_sha: str,
                 device: torch.device, config: Callable[[], Config], metrics: Metrics,
                 on_registered: Callable[[], None], event: Callable[..., None]) -> None:
        self.registry, self.plugins, self.family = registry, plugins, family
        self.base, self.base_sha, self.device = base, base_sha, device
        self.config, self.metrics = config, metrics
        self.on_registered, self.event = on_registered, event
        self._jobs = ThreadPoolExecutor(1, thread_name_prefix="skillhub-relocalize")
        self._relocalizing: set[tuple[str, str]] = set()
        self._patcher: SkillPatcher | None = None  # θ₀ to score masks on (sparsity "auto"); intake's thread only
        # θ₀'s side of the distance check (FAULTS B7, B9) depends on the base alone: computed now, in the
        # background, so that no drop pays a pass over the base for it.
        self._jobs.submit(base_squares, base, sorted(family.included_keys(base)), base_sha)

    def close(self) -> None:
        self._jobs.shutdown(wait=True, cancel_futures=True)

    def ingest(self, path: Path, *, skill: str | None = None, default_name: str | None = None,
               sha256: str | None = None, sidecar: Mapping[str, Any] | None = None, keep: bool = True) -> VersionRow:
        """Validate and localize one (staged) checkpoint and register it; exactly once per content.

        The skill is named as :func:`skill_name` says. ``keep=False``: the staged copy is deleted once its mask is
        durable (it is then not available to re-localize with other params). Returns the READY row (the existing one
        when this content was seen before). Raises a :class:`~skillhub.errors.SkillhubError` naming the problem when
        the checkpoint cannot be used; the registry then holds a FAILED row with that reason.
        """
        ft = open_checkpoint(path)
        name = skill_name(ft, skill=skill, sidecar=sidecar, default_name=default_name, path=path)
        sha = sha256 or fingerprint(ft)
        declared = ft.metadata.get("skillhub.base")
        if declared and declared != self.base_sha:
            raise CheckpointError(f"declares base {declared[:12]}…, but the served base is {self.base_sha[:12]}…",
                                  path=path, hint="drop a finetune of the configured base model")
        known = [r for r in self.registry.find_by_source(sha) if r.status == "READY"]
        if known:
            log.info("already_registered", skill=known[0].skill, version=known[0].version, sha=sha[:16])
            self._discard(path, keep)
            return known[0]
        strategy, params = localization(self.config(), name, sidecar)
        row, _ = self.registry.begin_version(name, sha, strategy, params, source_path=str(path) if keep else None,
                                            meta={"sidecar": dict(sidecar or {})})
        try:
            prepared = self._prepare(ft, sidecar, strategy)
            if prepared.head is not None:
                meta = {**row.meta, "head": self.registry.store_head(*prepared.head.encode()),
                        "classes": prepared.head.classes}
                if prepared.examples is not None:  # kept for the quality gate and re-centring the heads
                    meta["examples"] = self.registry.store_examples(prepared.examples)
                row = self.registry.update_meta(row.id, meta)
        except SkillhubError as e:
            self._failed(row, e)
            raise
        ready = self._localize(row, prepared)
        self._discard(path, keep)
        return ready

    def _prepare(self, ft: Checkpoint, sidecar: Mapping[str, Any] | None, strategy: str) -> Prepared:
        """The family's one pass over the checkpoint, with the drop's examples when the family reads examples (the
        quality gate scores every skill that brings them); unusable or missing examples only matter to a strategy
        that needs them."""
        needs = self.plugins.localizer(strategy).needs_examples
        try:
            return self.family.prepare(self.base, ft, sidecar, examples=needs or self.family.reads_examples)
        except LocalizeError as e:
            if needs and self.config().localize.fallback is None:
                raise
            prepared = self.family.prepare(self.base, ft, sidecar)
            return Prepared(prepared.checkpoint, prepared.head, None, examples_error=str(e))

    def _failed(self, row: VersionRow, e: SkillhubError) -> None:
        if not isinstance(e, DiskFullError):  # C4: nothing is wrong with the drop; it stays pending and is retried
            self.registry.mark_failed(row.id, str(e))
            self.event("skill_failed", skill=row.skill, reason=str(e))

    def _discard(self, path: Path, keep: bool) -> None:
        if not keep:
            self.registry.discard_staged(path)

    def _localize(self, row: VersionRow, prepared: Prepared) -> VersionRow:
        t0 = time.perf_counter()
        strategy, params = row.strategy, row.params
        try:
            # Each skill its own seed, from its content: random strategies (DARE) draw different positions for
            # different skills, and the same positions for the same checkpoint whenever it is localized again.
            ctx = LocalizeContext(device=self.device, seed=skill_seed(row.source_sha))
            if self.plugins.localizer(strategy).needs_examples:
                try:
                    if prepared.examples is None:
                        raise LocalizeError(prepared.examples_error or "no few-shot examples in the drop",
                                            path=prepared.checkpoint.path)
                    ctx.examples = self.family.objective(self.base, prepared.head, prepared.examples)
                except LocalizeError as e:  # B12: unusable few-shot data fail this skill, or fall back if configured
                    fallback = self.config().localize.fallback
                    if fallback is None:
                        raise
                    log.warning("localize_fallback", skill=row.skill, strategy=strategy, fallback=fallback,
                                reason=str(e))
                    strategy, params = fallback, {}
                    row = self.registry.update_meta(row.id, {**row.meta, "fallback": {"from": row.strategy,
                                                                                      "reason": str(e)}})
            def run(p: Mapping[str, Any]) -> LocalizeResult:
                return localize_checkpoint(self.base, prepared, family=self.family, localizer=strategy, params=p,
                                           plugins=self.plugins, skill=row.skill, base_sha=self.base_sha,
                                           source_sha=row.source_sha, ctx=ctx,
                                           max_relative_delta=self.config().localize.max_relative_delta)

            if (params or {}).get("sparsity") == "auto":
                result, record = self._auto_sparsity(row, prepared, params, run)
                row = self.registry.update_meta(row.id, {**row.meta, "auto_sparsity": record})
            else:
                result = run(params)
        except SkillhubError as e:
            self._failed(row, e)
            raise
        self.metrics.localize_seconds.observe(time.perf_counter() - t0)
        ready = self.registry.store_mask(row.id, result.delta)
        faultpoints.reach("mask_committed")
        log.info("skill_registered", skill=ready.skill, version=ready.version, nnz=ready.nnz,
                 strategy=ready.strategy, seconds=round(result.seconds, 3))
        self.event("skill_registered", skill=ready.skill, version=ready.version, mask_sha=ready.mask_sha or "",
                   nnz=ready.nnz or 0, strategy=ready.strategy)
        self.on_registered()
        return ready

    def _auto_sparsity(self, row: VersionRow, prepared: Prepared, params: Mapping[str, Any],
                       run: Callable[[Mapping[str, Any]], LocalizeResult]) -> tuple[LocalizeResult, dict[str, Any]]:
        """``sparsity = "auto"`` (:mod:`skillhub.autosparsity`): the smallest sparsity of the ladder whose localized
        model keeps ``auto_keep`` of the finetune's accuracy on the fit examples. Without examples and a head (or a
        family that runs models), the ladder's smallest rung, and the record says why."""
        from skillhub.strategies.dataless import Dataless

        p = Dataless.Params.model_validate(dict(params))
        ladder, keep = sorted(p.auto_ladder), p.auto_keep
        if prepared.examples is None or prepared.head is None or self._scorer() is None:
            why = prepared.examples_error or "no examples or no head in the drop"
            log.warning("auto_sparsity_without_examples", skill=row.skill, sparsity=ladder[0], reason=why)
            return run({**params, "sparsity": ladder[0]}), {"sparsity": ladder[0], "reason": why}
        fit = split(prepared.examples).fit
        results: dict[float, LocalizeResult] = {}

        def localize(s: float) -> SparseDelta:
            results[s] = run({**params, "sparsity": s})
            return results[s].delta

        def accuracy(delta: SparseDelta) -> float:
            patcher = self._scorer()
            assert patcher is not None and prepared.head is not None
            rt = patcher.use(f"auto:{row.id}:{delta.nnz}", delta)
            return accuracy_of(prepared.head, embed(rt, fit.images), fit.labels) or 0.0

        try:
            choice = choose(localize, accuracy, ladder=ladder, keep=keep)
        finally:
            if self._patcher is not None:
                self._patcher.restore()
        log.info("auto_sparsity", skill=row.skill, sparsity=choice.sparsity, finetune=round(choice.finetune, 4),
                 accuracy={repr(s): round(a, 4) for s, a in choice.accuracy.items()}, reached=choice.reached)
        return results[choice.sparsity], choice.record(keep)

    def _scorer(self) -> SkillPatcher | None:
        """A runnable copy of θ₀ to score localized models on (built on first use; ``None``: the family runs no
        model)."""
        if self._patcher is None:
            rt = runtime_on(self.family.runtime, self.device)({k: self.base.tensor(k) for k in self.base})
            if rt is None:
                return None
            self._patcher = SkillPatcher(rt)
        return self._patcher

    # --- re-localization (a config edit changed a skill's strategy or params) -----------------------------------

    def relocalize(self, row: VersionRow, strategy: str, params: dict[str, Any]) -> bool:
        """Localize ``row``'s staged checkpoint again with ``strategy``/``params``, in the background (once per
        source and settings at a time). Returns False when the staged copy is gone (``keep_staged = false``)."""
        key = (row.source_sha, repr((strategy, sorted(params.items()))))
        if not row.source_path or not Path(row.source_path).exists():
            return False
        if key not in self._relocalizing:
            self._relocalizing.add(key)
            self._jobs.submit(self._relocalize, row, strategy, params, key)
        return True

    def _relocalize(self, row: VersionRow, strategy: str, params: dict[str, Any], key: tuple[str, str]) -> None:
        try:
            new, created = self.registry.begin_version(row.skill, row.source_sha, strategy, params,
                                                       source_path=row.source_path, meta=row.meta)
            if created or new.status != "READY":
                staged = Path(row.source_path or "")
                # Staged copies are not fsynced (skillhub.staging): after a machine crash one may be damaged, and
                # a re-localization may run before intake's start-up check has looked. Never localize a copy that
                # is not the checkpoint the row names.
                if staged_sha256(staged) != row.source_sha:
                    self.registry.discard_staged(staged)  # so that it is not tried again at every reconcile
                    self._failed(new, CheckpointError(
                        "the staged copy no longer matches the checkpoint it was made from", path=staged,
                        hint="drop the skill's checkpoint again to re-localize it"))
                    return
                ft = open_checkpoint(staged)
                self._localize(new, self._prepare(ft, row.meta.get("sidecar") or {}, strategy))
        except SkillhubError as e:
            log.error("relocalize_failed", skill=row.skill, error=str(e))
        finally:
            self._relocalizing.discard(key)
