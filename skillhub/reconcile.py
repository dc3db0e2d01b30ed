"""Reconcile: registry × config → the stitched, checked, published version (DESIGN §2-3).

:class:`Reconciler` owns the stitcher and the set of skill versions stitched in. :meth:`Reconciler.reconcile`
brings the stitcher to the wanted set in O(changed masks), builds a version, smoke-checks it (every weight finite),
passes it through the quality gate (:mod:`skillhub.gate`: skills with examples scored, heads re-centred, skills that
would make the merged model worse held out of it), and publishes it; a version that fails never replaces the one
being served. It runs under one lock; readers take
:attr:`Reconciler.current`, an immutable :class:`~skillhub.publish.ModelVersion`, and keep it for a whole request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from skillhub import faultpoints
from skillhub.config import Config
from skillhub.desired import localization, served_version
from skillhub.errors import SkillhubError
from skillhub.gate import Gate
from skillhub.log import get_logger
from skillhub.metrics import Metrics
from skillhub.modelfolder import finite
from skillhub.publish import ModelVersion, Publisher, identity
from skillhub.recovery import last_verified
from skillhub.registry import Registry, VersionRow
from skillhub.stitch import Stitcher

log = get_logger("skillhub.reconcile")
OOM_RETRY_SECONDS = 30.0  # a device out of memory is retried this long after, not in a loop (FAULTS C8)
PUBLISH_RETRY_SECONDS = 5.0  # a failed publication (disk full, C4) is retried this long after


class Reconciler:
    """The stitcher, what is stitched in, and the versions published from it.

    :param passthrough: the base's tensors that are not merged (every version carries them unchanged).
    :param describe: the manifest fields that identify the base and the stitch (base, family, policy, params).
    :param relocalize: asks for a version to be localized again with other settings (background); returns False
        when that cannot be done (no staged copy).
    :param event: calls a plugin event hook by name.
    :param gate: scores candidates on the skills' examples (families that serve inference), or ``None``.
    """

    def __init__(self, *, registry: Registry, config: Callable[[], Config], stitcher: Stitcher,
                 passthrough: Mapping[str, torch.Tensor], publisher: Publisher, describe: Mapping[str, Any],
                 device: torch.device, metrics: Metrics,
                 relocalize: Callable[[VersionRow, str, dict[str, Any]], bool], event: Callable[..., None],
                 gate: Gate | None = None) -> None:
        self.registry, self.config, self.stitcher = registry, config, stitcher
        self.passthrough, self.publisher, self.describe = dict(passthrough), publisher, dict(describe)
        self.device, self.metrics, self.relocalize, self.event = device, metrics, relocalize, event
        self.lock = threading.RLock()
        self.active: dict[str, VersionRow] = {}  # skill -> version stitched in
        self.current: ModelVersion | None = None
        self.last_error: str | None = None
        self.retry_at: float | None = None  # monotonic time to run again after a transient failure
        self._dirty = False  # the stitcher holds changes no published version has yet
        self._on_disk: dict[str, Any] | None = None  # the manifest that was served before a restart
        self._passthrough_bad: str | None = None  # the smoke check of the tensors no version changes, done once
        # After a publication, the stitcher's copies for its next change are made here, off the drop-to-served path.
        self._spares = ThreadPoolExecutor(1, thread_name_prefix="skillhub-stitch-spares")
        self.gate = gate
        # skill -> (the version row the gate held out of the merged model, why): until that skill's wanted version
        # changes, it is served on its own route only
        self.held: dict[str, tuple[VersionRow, str]] = {}

    def start(self) -> ModelVersion | None:
        """After a (re)start: recover the published versions and serve the wanted set (the same number as before
        when it is the same version)."""
        self._on_disk = self.publisher.recover()
        return self.reconcile()

    def serve_last_verified(self, reason: str) -> ModelVersion | None:
        """Read-only mode (FAULTS C5): serve the newest published version that files alone verify; change nothing."""
        d = self.describe
        found = last_verified(self.publisher, self.registry, d["base"], d["policy"], d["policy_params"])
        if found is None:
            self.last_error = f"{reason}; no published version could be verified, so none is served"
            return None
        manifest, masks = found
        for name, delta in masks.items():
            self.stitcher.add(name, delta.to(self.device))
        shown = {k: v for k, v in manifest.items() if k not in ("version", "created")}
        self.current = ModelVersion(int(manifest["version"]), self._merged(), shown)
        self.last_error = reason
        return self.current

    # --- what should be served ----------------------------------------------------------------------------------

    def wanted(self) -> dict[str, VersionRow]:
        """The version of every enabled skill that should be stitched in (:func:`~skillhub.desired.served_version`),
        localized with the skill's desired settings where that version exists already."""
        cfg = self.config()
        out: dict[str, VersionRow] = {}
        for state in self.registry.skills():
            chosen = served_version(state, cfg)
            if chosen is not None:
                ready = [v for v in state.versions if v.status == "READY"]
                out[state.name] = self._with_desired_settings(chosen, ready, cfg)
        return out

    def _with_desired_settings(self, chosen: VersionRow, ready: list[VersionRow], cfg: Config) -> VersionRow:
        """The READY version of the same checkpoint localized with the skill's desired strategy/params; until it
        exists (it is localized in the background), ``chosen`` keeps serving."""
        strategy, params = localization(cfg, chosen.skill, chosen.meta.get("sidecar"))
        if (chosen.strategy, chosen.params) == (strategy, params):
            return chosen
        for v in ready:
            if v.source_sha == chosen.source_sha and (v.strategy, v.params) == (strategy, params):
                return v
        self.relocalize(chosen, strategy, params)
        return chosen

    # --- the loop's one step ------------------------------------------------------------------------------------

    def reconcile(self) -> ModelVersion | None:
        """Bring the stitcher to the wanted set (O(changed masks)) and publish a version if anything changed.

        A skill whose mask cannot be stitched, or whose stitch produces NaN/Inf, is taken out again and marked
        FAILED; the other changes still go through; the old version keeps serving until a good one is built.
        """
        with self.lock:
            t0 = time.perf_counter()
            self.retry_at = None
            wanted = self.wanted()
            for name in [n for n in self.held if n not in wanted or wanted[n].id != self.held[n][0].id]:
                del self.held[name]  # a new version (or none) is wanted: the gate judges it afresh
            held_now = set(self.held)
            wanted = {n: r for n, r in wanted.items() if n not in self.held}
            for name, row in list(self.active.items()):
                if name not in wanted or wanted[name].id != row.id:
                    self.stitcher.remove(name)
                    del self.active[name]
                    self._dirty = True
            for name, row in wanted.items():
                if name not in self.active and self._add(name, row):
                    self.active[name] = row
                    self._dirty = True
            if not self._dirty and self.current is not None:
                if held_now != set(self.held):
                    self._show_held(self.current)
                return None
            faultpoints.reach("stitch")
            try:
                version = self._build_version()
            except torch.OutOfMemoryError as e:
                self._transient(f"out of memory building a version ({str(e).splitlines()[0]})", OOM_RETRY_SECONDS)
                return None
            bad = self._smoke(version)
            if bad is not None:  # smoke check failed (C7): take the newest additions out, keep serving the old one
                for name in [n for n in wanted if n in self.active and (
                        self.current is None or n not in self.current.manifest["skills"])]:
                    self.stitcher.remove(name)
                    self._fail(self.active.pop(name), bad)
                version = self._build_version()
                if self._smoke(version) is not None or version.identity == getattr(self.current, "identity", ""):
                    self._dirty = False
                    return None
            self.metrics.stitch_seconds.observe(time.perf_counter() - t0)
            gated = self._gate(version)
            if gated is None:
                self._dirty = False
                return None
            version = gated
            try:
                self._publish(version)
            except SkillhubError as e:  # C4: disk full etc.; the old version keeps serving, retried later
                self._transient(str(e), PUBLISH_RETRY_SECONDS)
                return None
            self._dirty = False
            self.last_error = None
            return version

    def _gate(self, version: ModelVersion) -> ModelVersion | None:
        """Score ``version`` on the skills' examples and record it in its manifest. With ``gate = "hold"``, when it
        makes a skill worse, the skills it newly adds are held out of the merged model: one alone at once; several
        (a start, a burst of drops) are added back one at a time in name order, each kept only if the gate passes.
        ``None``: nothing new to publish (the served version stays)."""
        cfg = self.config().publish
        if self.gate is None or cfg.gate == "off":
            return self._show_held(version)
        verdict = self.gate.evaluate(version, self.current, max_drop=cfg.max_drop,
                                     statistics=cfg.recalibrate_statistics)
        if verdict.failing:
            log.warning("quality_gate_failed", version=version.number, failing=verdict.failing, gate=cfg.gate)
            before = (self.current.manifest if self.current is not None else self._on_disk or {}).get("skills", {})
            added = sorted(n for n, e in version.manifest["skills"].items()
                           if (before.get(n) or {}).get("mask") != e["mask"])
            if cfg.gate == "hold" and added:
                rows = {n: self.active.pop(n) for n in added}
                for name in added:
                    self.stitcher.remove(name)
                if len(added) == 1:
                    self._hold(rows[added[0]], verdict.failing)
                else:
                    for name in added:
                        if not self._add(name, rows[name]):
                            continue
                        trial = self.gate.evaluate(self._build_version(), self.current, max_drop=cfg.max_drop,
                                     statistics=cfg.recalibrate_statistics)
                        if trial.failing:
                            self.stitcher.remove(name)
                            self._hold(rows[name], trial.failing)
                        else:
                            self.active[name] = rows[name]
                version = self._build_version()
                if self.current is not None and version.identity == self.current.identity:
                    self.current.manifest["quality"] = self._with_held(dict(self.current.manifest.get("quality") or {}))
                    self._show_held(self.current)
                    return None
                verdict = self.gate.evaluate(version, self.current, max_drop=cfg.max_drop,
                                     statistics=cfg.recalibrate_statistics)
        version.manifest["quality"] = self._with_held(verdict.quality)
        for name, q in verdict.quality.items():
            for route, acc in q["accuracy"].items():
                if acc is not None:
                    self.metrics.skill_accuracy.labels(skill=name, route=route).set(acc)
        return self._show_held(version)

    def _with_held(self, quality: dict[str, Any]) -> dict[str, Any]:
        """``quality`` with the held skills' records: scored on their own route, with its re-centred head."""
        assert self.gate is not None
        for name, (row, _) in self.held.items():
            record = self.gate.own_route({"head": row.meta.get("head"), "examples": row.meta.get("examples"),
                                          "mask": row.mask_sha}, self.config().publish.recalibrate_statistics)
            if record is not None:
                quality[name] = record
        return quality

    def _hold(self, row: VersionRow, failing: Mapping[str, str]) -> None:
        reason = "held out of the merged model by the quality gate: " + "; ".join(failing[n] for n in sorted(failing))
        self.held[row.skill] = (row, reason)
        log.warning("skill_held", skill=row.skill, version=row.version, reason=reason)

    def _show_held(self, version: ModelVersion) -> ModelVersion:
        """Name the held skills in ``version``'s manifest (served on their own route only); not part of its
        identity, so it may change on the version being served."""
        version.manifest["held"] = {n: {"version": r.version, "mask": r.mask_sha, "head": r.meta.get("head"),
                                        "examples": r.meta.get("examples"), "reason": why}
                                    for n, (r, why) in sorted(self.held.items())}
        return version

    def _smoke(self, version: ModelVersion) -> str | None:
        """The smoke check of the version just built: why it fails, else None. Every weight finite, in O(changed
        entries): the passthrough tensors never change, so they are checked once, and the stitcher counts
        non-finite merged entries as it changes them (:meth:`~skillhub.stitch.Stitcher.nonfinite`). Then, for
        families that run models, one probe batch through it must give finite outputs (:meth:`Gate.probe`)."""
        if self._passthrough_bad is None:
            self._passthrough_bad = finite(self.passthrough) or ""
        bad = self._passthrough_bad or self.stitcher.nonfinite()
        if bad:
            return f"merged weights hold NaN/Inf in {bad!r}"
        return self.gate.probe(version) if self.gate is not None else None

    def _add(self, name: str, row: VersionRow) -> bool:
        try:
            faultpoints.reach("stitch_add")
            self.stitcher.add(name, self.registry.load_mask(row.mask_sha or "", device=self.device))
        except torch.OutOfMemoryError as e:  # C8: not the skill's fault; keep serving, retry later
            self._transient(f"device out of memory stitching {name!r} ({str(e).splitlines()[0]}); the served "
                            "version is unchanged", OOM_RETRY_SECONDS)
            return False
        except (SkillhubError, RuntimeError) as e:
            self._fail(row, f"cannot stitch: {e}")
            return False
        return True

    def _transient(self, reason: str, retry_seconds: float) -> None:
        log.error("reconcile_deferred", reason=reason, retry_seconds=retry_seconds)
        self.last_error = reason
        self.retry_at = time.monotonic() + retry_seconds

    def _fail(self, row: VersionRow, reason: str) -> None:
        log.error("skill_failed", skill=row.skill, version=row.version, reason=reason)
        self.registry.mark_failed(row.id, reason)
        self.last_error = reason
        self.event("skill_failed", skill=row.skill, reason=reason)

    def manifest(self) -> dict[str, Any]:
        """What the stitcher holds now, as a version's manifest (it determines the weights)."""
        return {**self.describe,
                "skills": {n: {"version": r.version, "mask": r.mask_sha, "nnz": r.nnz, "strategy": r.strategy,
                               "params": r.params, "source": r.source_sha, "head": r.meta.get("head"),
                               "examples": r.meta.get("examples")}
                           for n, r in sorted(self.active.items())}}

    def _merged(self) -> dict[str, torch.Tensor]:
        """Every tensor of the model now: the stitcher's merged tensors, frozen on its own device (copy on write: no
        device→CPU copy of the model per version, DESIGN §7), and the passthrough ones (CPU)."""
        return {**self.passthrough, **self.stitcher.snapshot(self.stitcher.device)}

    def _build_version(self) -> ModelVersion:
        manifest = self.manifest()
        on_disk = self._on_disk
        if on_disk is not None and identity(on_disk) == identity(manifest) and self.current is None:
            number = int(on_disk["version"])  # a restart rebuilt the version that was being served: same number
        else:
            number = self.publisher.next_number()
        return ModelVersion(number, self._merged(), manifest)

    def _publish(self, version: ModelVersion) -> None:
        t0 = time.perf_counter()
        self.publisher.publish(version)
        self.current = version
        self._spares.submit(self.stitcher.prepare)
        self._on_disk = None
        self.metrics.publish_seconds.observe(time.perf_counter() - t0)
        self.metrics.versions.inc()
        self.metrics.skills.set(len(self.active))
        log.info("version_published", version=version.number, skills=sorted(self.active))
        self.event("version_published", version=version.number, manifest=version.manifest)
