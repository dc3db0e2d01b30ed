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
from skillhub.checkpoint import Checkpoint, fingerprint, open_checkpoint
from skillhub.config import Config
from skillhub.copying import staged_sha256
from skillhub.desired import localization
from skillhub.errors import CheckpointError, DiskFullError, LocalizeError, SkillhubError
from skillhub.families import ModelFamily, Prepared
from skillhub.localize import LocalizeContext
from skillhub.log import get_logger
from skillhub.metrics import Metrics
from skillhub.ops import localize_checkpoint
from skillhub.plugins import Plugins
from skillhub.registry import Registry, VersionRow

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
                head_sha = self.registry.store_head(*prepared.head.encode())
                row = self.registry.update_meta(row.id, {**row.meta, "head": head_sha,
                                                         "classes": prepared.head.classes})
        except SkillhubError as e:
            self._failed(row, e)
            raise
        ready = self._localize(row, prepared)
        self._discard(path, keep)
        return ready

    def _prepare(self, ft: Checkpoint, sidecar: Mapping[str, Any] | None, strategy: str) -> Prepared:
        """The family's one pass over the checkpoint; unusable examples only matter to a strategy that needs them."""
        needs = self.plugins.localizer(strategy).needs_examples
        try:
            return self.family.prepare(self.base, ft, sidecar, examples=needs)
        except LocalizeError as e:
            if not needs or self.config().localize.fallback is None:
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
            ctx = LocalizeContext(device=self.device, seed=0)
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
            result = localize_checkpoint(self.base, prepared, family=self.family, localizer=strategy, params=params,
                                         plugins=self.plugins, skill=row.skill, base_sha=self.base_sha,
                                         source_sha=row.source_sha, ctx=ctx,
                                         max_relative_delta=self.config().localize.max_relative_delta)
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
