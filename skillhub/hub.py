"""The in-process service (``skillhub.Hub``): registry + incremental stitcher + published versions.

The daemon, the HTTP server and the CLI are thin layers over this class; an application can embed it directly.

Threads: intake (or the caller) runs :meth:`Hub.ingest` (validation and localization, the slow part, outside the
hub's lock); :meth:`Hub.reconcile` is the only code that changes the stitcher and publishes, under one lock;
readers take :attr:`Hub.current`, an immutable :class:`~skillhub.publish.ModelVersion`, and keep it for the whole
request however many versions are published meanwhile.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from skillhub import faultpoints
from skillhub.checkpoint import Checkpoint, FingerprintCache, open_checkpoint
from skillhub.config import Config
from skillhub.errors import CheckpointError, ConfigError, LocalizeError, RegistryCorruptError, SkillhubError, StitchError
from skillhub.families import Head
from skillhub.inference import InferenceEngine
from skillhub.localize import LocalizeContext
from skillhub.log import get_logger
from skillhub.metrics import Metrics
from skillhub.ops import localize_checkpoint
from skillhub.plugins import Plugins, check_config, load_plugins
from skillhub.publish import ModelVersion, Publisher, finite, identity
from skillhub.recovery import RECOVERY_STEPS, check_registry_is_current, last_verified
from skillhub.registry import Registry, VersionRow
from skillhub.statedir import take_lock
from skillhub.stitch import Stitcher, resolve_device

log = get_logger("skillhub.hub")
OOM_RETRY_SECONDS = 30.0  # a device out of memory is retried this long after, not in a loop (FAULTS C8)
PUBLISH_RETRY_SECONDS = 5.0  # a failed publication (disk full, C4) is retried this long after


def demo_base(cfg: Config) -> tuple[Path, str]:
    """The built-in demo base used when no ``[base] weights`` is configured (made on first use, next to the state
    folder): its weights file and its open_clip model config."""
    from skillhub.demo import make_demo

    base, model_cfg, _ = make_demo(Path(cfg.state.dir).parent / "demo")
    return base, str(model_cfg)


class Hub:
    """The skillhub service as a library object. Call :meth:`start` before use and :meth:`close` after."""

    def __init__(self, config: Config, *, plugins: Plugins | None = None) -> None:
        self.config = config
        self.plugins = plugins or load_plugins(config.plugins.dirs)
        check_config(config, self.plugins)
        self.metrics = Metrics()
        self.fingerprints = FingerprintCache()
        self._lock = threading.RLock()
        self._current: ModelVersion | None = None
        self._active: dict[str, VersionRow] = {}  # skill -> version stitched in
        self._jobs = ThreadPoolExecutor(1, thread_name_prefix="skillhub-relocalize")
        self._relocalizing: set[tuple[str, str]] = set()
        self._heads: dict[str, Head] = {}
        self._engine: InferenceEngine | None = None
        self.on_change: Callable[[], None] = lambda: None  # the daemon sets this to schedule a reconcile
        self.last_error: str | None = None
        self.read_only: str | None = None  # why the registry cannot be changed (FAULTS C5), or None
        self.retry_at: float | None = None  # monotonic time to run reconcile again after a transient failure
        self._dirty = False  # the stitcher holds changes no published version has yet

    # --- life ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Lock the state folder, recover from a crash, open the base, replay the registry and publish/serve."""
        cfg = self.config
        state = Path(cfg.state.dir)
        try:
            self.registry = Registry(state)
            check_registry_is_current(self.registry, state)
        except RegistryCorruptError as e:  # C5: never an empty registry over the top; serve what files vouch for
            self.read_only = str(e)
            self.registry = Registry.files_only(state, take_lock(state), e)
        else:
            report = self.registry.recover()
            for row in report.pending:  # interrupted localizations: the drop is still in the inbox or staging
                self.registry.mark_failed(row.id, "interrupted by a restart; it is retried when the file is seen "
                                                  "again")
            if report.removed_orphans:
                log.warning("orphan_masks_set_aside", count=len(report.removed_orphans),
                            folder=str(state / "orphans"),
                            hint="one is normal after a crash; many mean the registry lost rows: run skillhub doctor")
        if cfg.base.weights:
            base_path = Path(cfg.base.weights)
            self.family = self.plugins.family(cfg.base.family).from_config(cfg.base)
        else:  # no base configured: the built-in demo (an open_clip model with a real pretrained image tower)
            base_path, model_cfg = demo_base(cfg)
            self.family = self.plugins.family("open_clip")(cfg.base.include, cfg.base.exclude, model=model_cfg)
        self.base_path = base_path
        self.base: Checkpoint = open_checkpoint(base_path)
        self.base_sha = self.fingerprints.checkpoint(self.base)
        self.included = self.family.included_keys(self.base)
        self.device = resolve_device(cfg.device)
        self.policy = self.plugins.make_policy(cfg.stitch.policy, cfg.stitch.params)
        accumulate = torch.float64 if cfg.stitch.accumulate == "float64" else torch.float32
        self.stitcher = Stitcher({k: self.base.tensor(k) for k in self.included}, self.policy, device=self.device,
                                 accumulate=accumulate)
        included = set(self.included)
        self.passthrough = {k: self.base.tensor(k).clone() for k in self.base if k not in included}
        self.publisher = Publisher(state / "models", keep=cfg.state.keep_versions,
                                   write_weights=cfg.state.write_weights and self.read_only is None)
        if self.read_only is not None:
            self._serve_last_verified()
            return
        self._on_disk = self.publisher.recover()
        log.info("hub_started", base=str(base_path), base_sha=self.base_sha[:16], included=len(self.included),
                 device=str(self.device), policy=self.policy.name, recovered=not report.clean)
        self.reconcile()

    def _serve_last_verified(self) -> None:
        """Read-only mode (C5): serve the newest published version that files alone verify; change nothing."""
        found = last_verified(self.publisher, self.registry, self.base_sha, self.policy.name,
                              self.policy.params.model_dump(mode="json"))
        log.error("registry_unusable", error=self.read_only, recovery=RECOVERY_STEPS,
                  serving=found[0]["version"] if found else None)
        if found is None:
            self.last_error = f"{self.read_only}; no published version could be verified, so none is served"
            return
        manifest, masks = found
        for name, delta in masks.items():
            self.stitcher.add(name, delta.to(self.device))
        shown = {k: v for k, v in manifest.items() if k not in ("version", "created")}
        self._current = ModelVersion(int(manifest["version"]), {**self.passthrough, **self.stitcher.snapshot()}, shown)
        self.last_error = self.read_only

    @property
    def engine(self) -> InferenceEngine:
        """The inference engine (dynamic batching over the served versions), started on first use."""
        with self._lock:
            if self._engine is None:
                serve = self.config.serve
                self._engine = InferenceEngine(self, max_batch=serve.max_batch, max_wait_ms=serve.batch_wait_ms)
                self._engine.start()
            return self._engine

    def embed(self, images: Sequence[Any]) -> tuple[int, torch.Tensor]:
        """Normalised image embeddings of PIL ``images`` from the current version: (version, [N, D])."""
        version = self._current
        if version is None:
            raise StitchError("no model version is being served yet")
        rt = self.engine.runtime(version)
        return version.number, self.engine.embed(version, rt.preprocess(images))

    def predict(self, skill: str, images: Sequence[Any], top_k: int = 5) -> dict[str, Any]:
        """Classify PIL ``images`` with ``skill``'s head on the current merged version (as the HTTP route does)."""
        version = self._current
        if version is None or skill not in version.manifest["skills"]:
            raise StitchError(f"skill {skill!r} is not in the served model", key=skill)
        head = self.head_by_sha(version.manifest["skills"][skill].get("head"))
        if head is None:
            raise StitchError(f"skill {skill!r} has no classification head", key=skill)
        rt = self.engine.runtime(version)
        emb = self.engine.embed(version, rt.preprocess(images))
        return {"version": version.number, "skill": skill, "predictions": head.top_k(emb, top_k)}

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()
        self._jobs.shutdown(wait=True, cancel_futures=True)
        if hasattr(self, "publisher"):
            self.publisher.close()
        if hasattr(self, "registry"):
            self.registry.close()

    def __enter__(self) -> Hub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ------------------------------------------------------------------------------------------------

    @property
    def current(self) -> ModelVersion | None:
        """The version being served (immutable; hold on to it for the length of a request)."""
        return self._current

    # --- ingest -------------------------------------------------------------------------------------------------

    def desired(self, skill: str, sidecar: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """The strategy and params a skill should be localized with: its config table, else its sidecar, else
        ``[localize]``."""
        cfg = self.config
        sk = cfg.skills.per_skill.get(skill)
        if sk is not None and (sk.strategy or sk.params is not None):
            strategy = sk.strategy or cfg.localize.strategy
            params = dict(sk.params if sk.params is not None else
                          (cfg.localize.params if strategy == cfg.localize.strategy else {}))
            return strategy, params
        if sidecar and (sidecar.get("strategy") or sidecar.get("params")):
            strategy = str(sidecar.get("strategy") or cfg.localize.strategy)
            return strategy, dict(sidecar.get("params") or {})
        return cfg.localize.strategy, dict(cfg.localize.params)

    def ingest(self, path: Path, *, skill: str | None = None, default_name: str | None = None,
               sha256: str | None = None, sidecar: Mapping[str, Any] | None = None, keep: bool = True) -> VersionRow:
        """Validate and localize one (staged) checkpoint and register it; exactly once per content.

        The skill's name is ``skill`` if given, else the sidecar's ``skill``, else the header metadata
        ``skillhub.skill``, else ``default_name`` (the drop's name in the inbox), else the file's stem.

        Returns the READY row (the existing one when this content was seen before). Raises a
        :class:`~skillhub.errors.SkillhubError` naming the problem when the checkpoint cannot be used; the registry
        then holds a FAILED row with that reason.
        """
        ft = open_checkpoint(path)
        skill = skill or str((sidecar or {}).get("skill") or ft.metadata.get("skillhub.skill") or default_name
                             or Path(path).name.removesuffix(".safetensors"))
        sha = sha256 or self.fingerprints.checkpoint(ft)
        if not skill or not skill.isprintable() or "/" in skill or len(skill) > 200:
            raise CheckpointError(f"unusable skill name {skill!r}", path=path,
                                  hint="set `skill = \"name\"` in a sidecar NAME.toml (printable, no '/')")
        declared = ft.metadata.get("skillhub.base")
        if declared and declared != self.base_sha:
            raise CheckpointError(f"declares base {declared[:12]}…, but the served base is {self.base_sha[:12]}…",
                                  path=path, hint="drop a finetune of the configured base model")
        strategy, params = self.desired(skill, sidecar)
        known = [r for r in self.registry.find_by_source(sha) if r.status == "READY"]
        if known:
            log.info("already_registered", skill=known[0].skill, version=known[0].version, sha=sha[:16])
            return known[0]
        meta: dict[str, Any] = {"sidecar": dict(sidecar or {})}
        head = self.family.head(self.base, ft, sidecar)
        if head is not None:
            meta["head"] = self.registry.store_head(head.tensors(), {"skillhub.classes": json.dumps(head.classes),
                                                                     "skillhub.scale": str(head.scale)})
            meta["classes"] = head.classes
        row, _ = self.registry.begin_version(skill, sha, strategy, params, source_path=str(path) if keep else None,
                                            meta=meta)
        return self._localize_row(row, ft)

    def head(self, row: VersionRow) -> Head | None:
        """A skill version's classification head (families with heads), cached by content hash."""
        return self.head_by_sha(row.meta.get("head"))

    def head_by_sha(self, sha: str | None) -> Head | None:
        if not sha:
            return None
        if sha not in self._heads:
            tensors, meta = self.registry.load_head(sha)
            self._heads[sha] = Head(tensors["weight"], tensors.get("bias"), json.loads(meta["skillhub.classes"]),
                                    float(meta.get("skillhub.scale", "1.0")))
        return self._heads[sha]

    def _localize_row(self, row: VersionRow, ft: Checkpoint) -> VersionRow:
        t0 = time.perf_counter()
        strategy, params = row.strategy, row.params
        try:
            ctx = LocalizeContext(device=self.device, seed=0)
            if self.plugins.localizer(strategy).needs_examples:
                try:
                    ctx.examples = self.family.objective(self.base, ft, self.head(row), row.meta.get("sidecar") or {})
                except LocalizeError as e:  # B12: unusable few-shot data fail this skill, or fall back if configured
                    fallback = self.config.localize.fallback
                    if fallback is None:
                        raise
                    log.warning("localize_fallback", skill=row.skill, strategy=strategy, fallback=fallback,
                                reason=str(e))
                    strategy, params = fallback, {}
                    row = self.registry.update_meta(row.id, {**row.meta, "fallback": {"from": row.strategy,
                                                                                      "reason": str(e)}})
            result = localize_checkpoint(self.base, ft, family=self.family, localizer=strategy, params=params,
                                         plugins=self.plugins, skill=row.skill, base_sha=self.base_sha,
                                         source_sha=row.source_sha, ctx=ctx,
                                         max_relative_delta=self.config.localize.max_relative_delta)
        except SkillhubError as e:
            self.registry.mark_failed(row.id, str(e))
            self._event("skill_failed", skill=row.skill, reason=str(e))
            raise
        self.metrics.localize_seconds.observe(time.perf_counter() - t0)
        ready = self.registry.store_mask(row.id, result.delta)
        faultpoints.reach("mask_committed")
        log.info("skill_registered", skill=ready.skill, version=ready.version, nnz=ready.nnz,
                 strategy=ready.strategy, seconds=round(result.seconds, 3))
        self._event("skill_registered", skill=ready.skill, version=ready.version, mask_sha=ready.mask_sha or "",
                    nnz=ready.nnz or 0, strategy=ready.strategy)
        self.on_change()
        return ready

    def _event(self, name: str, **kw: Any) -> None:
        try:
            getattr(self.plugins.manager.hook, name)(**kw)
        except Exception as e:  # a broken plugin never stops the service
            log.warning("plugin_event_failed", hook=name, error=f"{type(e).__name__}: {e}")

    # --- reconcile and publish ----------------------------------------------------------------------------------

    def wanted(self) -> dict[str, VersionRow]:
        """READY skills that config and registry settings enable, at their pinned or latest version."""
        cfg = self.config
        out: dict[str, VersionRow] = {}
        for s in self.registry.skills():
            if not s.enabled or not cfg.skills.is_enabled(s.name):
                continue
            pin = cfg.skills.for_skill(s.name).version or s.pinned
            ready = [v for v in s.versions if v.status == "READY"]
            chosen = next((v for v in ready if v.version == pin), None) if pin else (ready[-1] if ready else None)
            if chosen is None:
                continue
            out[s.name] = self._maybe_relocalize(chosen, ready)
        return out

    def _maybe_relocalize(self, chosen: VersionRow, ready: list[VersionRow]) -> VersionRow:
        """Serve the version localized with the skill's desired strategy/params, re-localizing it in the
        background when the config changed them; until then the current one keeps serving."""
        strategy, params = self.desired(chosen.skill, chosen.meta.get("sidecar"))
        if (chosen.strategy, chosen.params) == (strategy, params):
            return chosen
        for v in ready:
            if v.source_sha == chosen.source_sha and (v.strategy, v.params) == (strategy, params):
                return v
        key = (chosen.source_sha, repr((strategy, sorted(params.items()))))
        if chosen.source_path and Path(chosen.source_path).exists() and key not in self._relocalizing:
            self._relocalizing.add(key)
            self._jobs.submit(self._relocalize, chosen, strategy, params, key)
        return chosen

    def _relocalize(self, row: VersionRow, strategy: str, params: dict[str, Any], key: tuple[str, str]) -> None:
        try:
            new, created = self.registry.begin_version(row.skill, row.source_sha, strategy, params,
                                                       source_path=row.source_path, meta=row.meta)
            if created or new.status != "READY":
                self._localize_row(new, open_checkpoint(Path(row.source_path or "")))
        except SkillhubError as e:
            log.error("relocalize_failed", skill=row.skill, error=str(e))
        finally:
            self._relocalizing.discard(key)

    def reconcile(self) -> ModelVersion | None:
        """Bring the stitcher to the wanted set (O(changed masks)) and publish a version if anything changed.

        A skill whose mask cannot be stitched, or whose stitch produces NaN/Inf, is taken out again and marked
        FAILED; the other changes still go through; the old version keeps serving until a good one is built.
        """
        if self.read_only is not None:
            return None
        with self._lock:
            t0 = time.perf_counter()
            self.retry_at = None
            wanted = self.wanted()
            for name, row in list(self._active.items()):
                if name not in wanted or wanted[name].id != row.id:
                    self.stitcher.remove(name)
                    del self._active[name]
                    self._dirty = True
            for name, row in wanted.items():
                if name in self._active:
                    continue
                try:
                    faultpoints.reach("stitch_add")
                    self.stitcher.add(name, self.registry.load_mask(row.mask_sha or "", device=self.device))
                except torch.OutOfMemoryError as e:  # C8: not the skill's fault; keep serving, retry later
                    self._transient(f"device out of memory stitching {name!r} ({str(e).splitlines()[0]}); the "
                                    "served version is unchanged", OOM_RETRY_SECONDS)
                    continue
                except (SkillhubError, RuntimeError) as e:
                    self._fail(row, f"cannot stitch: {e}")
                    continue
                self._active[name] = row
                self._dirty = True
            if not self._dirty and self._current is not None:
                return None
            faultpoints.reach("stitch")
            try:
                version = self._build_version()
            except torch.OutOfMemoryError as e:
                self._transient(f"out of memory building a version ({str(e).splitlines()[0]})", OOM_RETRY_SECONDS)
                return None
            bad = finite(version.tensors)
            if bad is not None:  # smoke check failed (C7): take the newest additions out, keep serving the old one
                for name in [n for n in wanted if n in self._active and (
                        self._current is None or n not in self._current.manifest["skills"])]:
                    self.stitcher.remove(name)
                    self._fail(self._active.pop(name), f"merged weights hold NaN/Inf in {bad!r}")
                version = self._build_version()
                if finite(version.tensors) is not None or version.identity == getattr(self._current, "identity", ""):
                    self._dirty = False
                    return None
            self.metrics.stitch_seconds.observe(time.perf_counter() - t0)
            try:
                self._publish(version)
            except SkillhubError as e:  # C4: disk full etc.; the old version keeps serving, retried later
                self._transient(str(e), PUBLISH_RETRY_SECONDS)
                return None
            self._dirty = False
            self.last_error = None
            return version

    def _transient(self, reason: str, retry_seconds: float) -> None:
        log.error("reconcile_deferred", reason=reason, retry_seconds=retry_seconds)
        self.last_error = reason
        self.retry_at = time.monotonic() + retry_seconds

    def _fail(self, row: VersionRow, reason: str) -> None:
        log.error("skill_failed", skill=row.skill, version=row.version, reason=reason)
        self.registry.mark_failed(row.id, reason)
        self.last_error = reason
        self._event("skill_failed", skill=row.skill, reason=reason)

    def manifest(self) -> dict[str, Any]:
        return {
            "base": self.base_sha,
            "family": self.family.name,
            "policy": self.policy.name,
            "policy_params": self.policy.params.model_dump(mode="json"),
            "skills": {n: {"version": r.version, "mask": r.mask_sha, "nnz": r.nnz, "strategy": r.strategy,
                           "params": r.params, "source": r.source_sha, "head": r.meta.get("head")}
                       for n, r in sorted(self._active.items())},
        }

    def _build_version(self) -> ModelVersion:
        manifest = self.manifest()
        on_disk = self._on_disk
        if on_disk is not None and identity(on_disk) == identity(manifest) and self._current is None:
            number = int(on_disk["version"])  # a restart rebuilt the version that was being served: same number
        else:
            number = self.publisher.next_number()
        tensors = {**self.passthrough, **self.stitcher.snapshot()}
        return ModelVersion(number, tensors, manifest)

    def _publish(self, version: ModelVersion) -> None:
        t0 = time.perf_counter()
        self.publisher.publish(version)
        self._current = version
        self._on_disk = None
        self.metrics.publish_seconds.observe(time.perf_counter() - t0)
        self.metrics.versions.inc()
        self.metrics.skills.set(len(self._active))
        log.info("version_published", version=version.number, skills=sorted(self._active))
        self._event("version_published", version=version.number, manifest=version.manifest)

    # --- control ------------------------------------------------------------------------------------------------

    def set_enabled(self, skill: str, enabled: bool) -> None:
        self.registry.set_enabled(skill, enabled)
        self.on_change()

    def pin(self, skill: str, version: int | None) -> None:
        self.registry.set_pinned(skill, version)
        self.on_change()

    def remove(self, skill: str) -> int:
        with self._lock:
            n = self.registry.remove_skill(skill)
        self.on_change()
        return n

    def apply_config(self, config: Config) -> None:
        """Switch to a new, already validated config: skills on/off, pins, strategies (stitch policy, base and
        device changes need a restart and are refused)."""
        old = self.config
        for field in ("base", "state", "device", "stitch", "watch", "serve", "plugins"):
            if getattr(old, field) != getattr(config, field):
                raise StitchError(f"changing [{field}] needs a restart", key=field,
                                  hint="restart `skillhub run` to apply it")
        check_config(config, self.plugins)
        self._check_skill_names(old, config)
        self.config = config
        self.on_change()

    def _check_skill_names(self, old: Config, new: Config) -> None:
        """An edit may not newly name a skill the registry does not know (FAULTS B11: most likely a typo, which would
        otherwise do nothing, silently). Names already in the config before are left alone."""
        known = {s.name for s in self.registry.skills()}
        for field, before, after in (("skills.disabled", old.skills.disabled, new.skills.disabled),
                                     ("skills", old.skills.per_skill, new.skills.per_skill)):
            unknown = sorted(set(after) - set(before) - known)
            if unknown:
                raise ConfigError(f"{field}: unknown skill {unknown[0]!r}", path=new.source, key=field,
                                  hint=f"known skills: {', '.join(sorted(known)) or 'none yet'}; to set up a skill "
                                       "before dropping it, give the drop a sidecar NAME.toml instead")

    # --- views --------------------------------------------------------------------------------------------------

    def skills_view(self) -> list[dict[str, Any]]:
        if self.read_only is not None:  # no registry to list: what the served version holds
            cur = self._current.manifest["skills"] if self._current else {}
            return [{"name": n, "enabled": True, "pinned": None, "active_version": s["version"],
                     "versions": [{"version": s["version"], "status": "READY", "reason": None, "nnz": s["nnz"],
                                   "strategy": s["strategy"], "params": s["params"], "mask": s["mask"]}]}
                    for n, s in sorted(cur.items())]
        active = dict(self._active)
        out = []
        for s in self.registry.skills():
            out.append({
                "name": s.name,
                "enabled": s.enabled and self.config.skills.is_enabled(s.name),
                "pinned": self.config.skills.for_skill(s.name).version or s.pinned,
                "active_version": active[s.name].version if s.name in active else None,
                "versions": [{"version": v.version, "status": v.status, "reason": v.reason, "nnz": v.nnz,
                              "strategy": v.strategy, "params": v.params, "mask": v.mask_sha}
                             for v in s.versions],
            })
        return out

    def model_view(self) -> dict[str, Any]:
        cur = self._current
        if cur is None:
            return {"version": None}
        numel = sum(self.base[k].numel for k in self.included)
        with self._lock:  # the stitcher changes under reconcile; overlap describes the served version
            overlap = self.stitcher.overlap()
        return {"version": cur.number, "base": self.base_sha, "policy": self.policy.name,
                "skills": cur.manifest["skills"], "included_parameters": numel,
                "overlap": overlap, "created": cur.created}
