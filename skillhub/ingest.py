"""Ingest: a staged checkpoint becomes a registered skill version (DESIGN §3, from intake to the registry).

Two halves. The localization job (:mod:`skillhub.job`: the family validates the checkpoint and derives its head and
few-shot examples in one pass, the strategy localizes it) writes nothing, and runs wherever the executor
(:mod:`skillhub.executor`, ``[executor]``) puts it: on this thread, or as a Ray task. This module does the rest, in
the daemon's process only, so that the registry has one writer: it names the skill, opens the version's PENDING row
before the job and stores the mask, head and examples after it. Exactly once per content: the same bytes are
registered once, whatever their name, and a job that is retried reuses its row.

Threads: :meth:`Ingestor.ingest` and :meth:`Ingestor.offer` run on the intake's worker (or the caller's thread),
re-localizations on the ingestor's own worker; neither holds the service's lock, because localization is the slow
part.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skillhub import faultpoints
from skillhub.checkpoint import Checkpoint, open_checkpoint
from skillhub.config import Config
from skillhub.copying import staged_sha256
from skillhub.desired import localization
from skillhub.errors import CheckpointError, DiskFullError, JobLostError, LocalizeError, SkillhubError
from skillhub.executor import Executor
from skillhub.families import ModelFamily
from skillhub.fingerprints import fingerprint
from skillhub.job import LocalizeJob, Localized, skill_seed
from skillhub.log import get_logger
from skillhub.metrics import Metrics
from skillhub.ops import base_squares
from skillhub.plugins import Plugins
from skillhub.registry import Registry, VersionRow

__all__ = ["Ingestor", "skill_name", "skill_seed"]

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


@dataclass(frozen=True)
class _Ticket:
    """A drop whose job was submitted: its PENDING row, its staged copy and the job's future."""

    row: VersionRow
    path: Path
    keep: bool
    future: Future[Localized]


class Ingestor:
    """Validates, localizes (through ``executor``) and registers checkpoints against one base.

    :param executor: runs the localization jobs (:func:`skillhub.executor.make_executor`).
    :param config: returns the config in force (it changes on a live reload).
    :param on_registered: called after a version became READY (the service schedules a reconcile).
    :param event: calls a plugin event hook by name (``skill_registered``, ``skill_failed``).
    """

    def __init__(self, *, registry: Registry, plugins: Plugins, family: ModelFamily, base: Checkpoint, base_sha: str,
                 executor: Executor, config: Callable[[], Config], metrics: Metrics,
                 on_registered: Callable[[], None], event: Callable[..., None]) -> None:
        self.registry, self.plugins, self.family = registry, plugins, family
        self.base, self.base_sha, self.executor = base, base_sha, executor
        self.config, self.metrics = config, metrics
        self.on_registered, self.event = on_registered, event
        self._jobs = ThreadPoolExecutor(1, thread_name_prefix="skillhub-relocalize")
        self._relocalizing: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._tickets: dict[str, _Ticket] = {}  # staged path -> its job in flight (offer)
        self._losses: dict[int, int] = {}  # version id -> jobs of it that lost their worker
        # θ₀'s side of the distance check (FAULTS B7, B9) depends on the base alone: computed now, in the
        # background, so that no drop pays a pass over the base for it.
        self._jobs.submit(base_squares, base, sorted(family.included_keys(base)), base_sha)

    def close(self) -> None:
        self._jobs.shutdown(wait=True, cancel_futures=True)

    def ingest(self, path: Path, *, skill: str | None = None, default_name: str | None = None,
               sha256: str | None = None, sidecar: Mapping[str, Any] | None = None, keep: bool = True) -> VersionRow:
        """Validate and localize one (staged) checkpoint and register it; exactly once per content. Blocks until
        the executor's job is done (:meth:`offer` does not).

        The skill is named as :func:`skill_name` says. ``keep=False``: the staged copy is deleted once its mask is
        durable (it is then not available to re-localize with other params). Returns the READY row (the existing one
        when this content was seen before). Raises a :class:`~skillhub.errors.SkillhubError` naming the problem when
        the checkpoint cannot be used; the registry then holds a FAILED row with that reason.
        """
        started = self._start(path, skill=skill, default_name=default_name, sha256=sha256, sidecar=sidecar, keep=keep)
        if isinstance(started, VersionRow):
            return started
        wait([started.future])
        return self._finish(started)

    def offer(self, path: Path, *, skill: str | None = None, default_name: str | None = None,
              sha256: str | None = None, sidecar: Mapping[str, Any] | None = None, keep: bool = True,
              on_done: Callable[[], None] | None = None) -> VersionRow | None:
        """:meth:`ingest` without waiting: the first call for a staged ``path`` submits its job to the executor;
        calls while the job runs return ``None``; the call after it finished registers the result and returns the
        READY row (or raises as :meth:`ingest` does). ``on_done`` is called, from any thread, when the job
        finishes (the daemon then asks again). A job whose worker died raises
        :class:`~skillhub.errors.JobLostError`: nothing was stored, the row stays PENDING, and the next call
        submits the job again (at most ``[executor] max_job_losses`` times; then the drop fails with the reason).
        With the local executor the job runs within the first call, so that call registers it."""
        key = str(path)
        with self._lock:
            ticket = self._tickets.get(key)
        if ticket is None:
            started = self._start(path, skill=skill, default_name=default_name, sha256=sha256, sidecar=sidecar,
                                  keep=keep)
            if isinstance(started, VersionRow):
                return started
            ticket = started
            with self._lock:
                self._tickets[key] = ticket
            if on_done is not None:
                ticket.future.add_done_callback(lambda _: on_done())
        if not ticket.future.done():
            return None
        with self._lock:
            self._tickets.pop(key, None)
        return self._finish(ticket)

    def in_flight(self) -> int:
        """How many drops' jobs :meth:`offer` has submitted and not yet registered."""
        with self._lock:
            return len(self._tickets)

    def _start(self, path: Path, *, skill: str | None, default_name: str | None, sha256: str | None,
               sidecar: Mapping[str, Any] | None, keep: bool) -> VersionRow | _Ticket:
        """The cheap part, on the caller's thread: name the skill, check the declared base, look the content up,
        open (or reuse) its PENDING row and submit its job."""
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
        return _Ticket(row, Path(path), keep, self._submit(row, Path(path), dict(sidecar or {})))

    def _submit(self, row: VersionRow, path: Path, sidecar: dict[str, Any]) -> Future[Localized]:
        cfg = self.config().localize
        job = LocalizeJob(path=path, skill=row.skill, version_id=row.id, source_sha=row.source_sha,
                          strategy=row.strategy, params=row.params, sidecar=sidecar, fallback=cfg.fallback,
                          max_relative_delta=cfg.max_relative_delta)
        return self.executor.submit(job, needs_gpu=self.plugins.localizer(row.strategy).needs_examples)

    def _finish(self, ticket: _Ticket) -> VersionRow:
        """Register a finished job's result (the only writes of ingesting a drop), or record why it failed."""
        row = ticket.row
        try:
            out = ticket.future.result()
        except JobLostError as e:
            losses = self._losses[row.id] = self._losses.get(row.id, 0) + 1
            limit = self.config().executor.max_job_losses
            log.warning("localize_job_lost", skill=row.skill, version=row.version, losses=losses, limit=limit,
                        error=str(e))
            if losses < limit:
                raise  # the row stays PENDING; the caller offers the drop again
            del self._losses[row.id]
            e = LocalizeError(f"its localization job lost its worker {losses} times (killed, or out of memory?)",
                              key=row.skill, hint="check the Ray workers' memory and logs, then drop it again")
            self._failed(row, e)
            raise e from None
        except SkillhubError as e:
            self._failed(row, e)
            raise
        self._losses.pop(row.id, None)
        try:
            meta: dict[str, Any] = dict(out.meta)
            if out.head is not None:
                meta |= {"head": self.registry.store_head(*out.head.encode()), "classes": out.head.classes}
                if out.examples is not None:  # kept for the quality gate and re-centring the heads
                    meta["examples"] = self.registry.store_examples(out.examples)
            if meta:
                row = self.registry.update_meta(row.id, {**row.meta, **meta})
        except SkillhubError as e:
            self._failed(row, e)
            raise
        self.metrics.localize_seconds.observe(out.elapsed)
        ready = self.registry.store_mask(row.id, out.delta)
        faultpoints.reach("mask_committed")
        log.info("skill_registered", skill=ready.skill, version=ready.version, nnz=ready.nnz,
                 strategy=ready.strategy, seconds=round(out.seconds, 3), **({"worker": out.worker} if out.worker else {}))
        self.event("skill_registered", skill=ready.skill, version=ready.version, mask_sha=ready.mask_sha or "",
                   nnz=ready.nnz or 0, strategy=ready.strategy)
        self.on_registered()
        self._discard(ticket.path, ticket.keep)
        return ready

    def _failed(self, row: VersionRow, e: SkillhubError) -> None:
        if not isinstance(e, DiskFullError):  # C4: nothing is wrong with the drop; it stays pending and is retried
            self.registry.mark_failed(row.id, str(e))
            self.event("skill_failed", skill=row.skill, reason=str(e))

    def _discard(self, path: Path, keep: bool) -> None:
        if not keep:
            self.registry.discard_staged(path)

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
                ticket = _Ticket(new, staged, True, self._submit(new, staged, dict(row.meta.get("sidecar") or {})))
                wait([ticket.future])
                self._finish(ticket)
        except SkillhubError as e:
            log.error("relocalize_failed", skill=row.skill, error=str(e))
        finally:
            self._relocalizing.discard(key)
