"""The in-process service (``skillhub.Hub``): a thin façade that owns the state folder's lock and the service's
threads, over the two halves of the data's path:

- :class:`~skillhub.ingest.Ingestor`: a staged checkpoint → a registered skill version (intake's thread; the
  localization itself runs where the :mod:`~skillhub.executor` puts it);
- :class:`~skillhub.reconcile.Reconciler`: registry × config → the stitched, checked, published version (one lock);

and the :class:`~skillhub.inference.InferenceEngine` that answers requests on the published versions. The daemon,
the HTTP server and the CLI are thin layers over this class; an application can embed it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from skillhub import views
from skillhub.analytics import AnalyticsCache
from skillhub.checkpoint import Checkpoint, open_checkpoint
from skillhub.config import Config
from skillhub.errors import ConfigError, RegistryCorruptError, StitchError
from skillhub.executor import Executor, WorkspaceSpec, make_executor
from skillhub.fingerprints import fingerprint
from skillhub.follow import Follower, follower_registry
from skillhub.gate import Gate
from skillhub.head import Head, HeadStore
from skillhub.heap import MMAP_THRESHOLD, fix_mmap_threshold
from skillhub.inboxview import inbox_view
from skillhub.inference import InferenceEngine
from skillhub.ingest import Ingestor
from skillhub.job import Workspace
from skillhub.log import get_logger
from skillhub.metrics import Metrics
from skillhub.modelfolder import layout_of
from skillhub.placement import runtime_on
from skillhub.plugins import Plugins, check_config, load_plugins
from skillhub.publish import ModelVersion, Publisher
from skillhub.reconcile import Reconciler
from skillhub.recovery import RECOVERY_STEPS, check_registry_is_current
from skillhub.registry import RecoveryReport, Registry, VersionRow
from skillhub.reload import check_reload
from skillhub.routing import PatchedTensors, split_route_key, with_statistics
from skillhub.statedir import take_lock
from skillhub.stitch import Stitcher, resolve_device, service_layout
from skillhub.taking import TAKEN

if TYPE_CHECKING:
    from skillhub.delta import SparseDelta
    from skillhub.families import Runtime

log = get_logger("skillhub.hub")


class Hub:
    """The skillhub service as a library object. Call :meth:`start` before use and :meth:`close` after.

    ``config`` must name its base (``[base] weights``); the daemon and the CLI put the built-in demo there when none
    is configured (:func:`skillhub.demo.with_demo_base`).

    With ``follow``, the hub is a read-only replica (``skillhub run --follow``, :mod:`skillhub.follow`): it serves
    the versions a primary publishes in the same state folder and writes nothing there (no lock, no database, no
    temp file); every change is refused with :class:`~skillhub.errors.FollowerError`.
    """

    reconciler: Reconciler | Follower  # what serves the versions: this hub's own, or the primary's (follow)
    gate: Gate | None

    def __init__(self, config: Config, *, plugins: Plugins | None = None, follow: bool = False) -> None:
        self.config = config
        self.following = follow
        self.plugins = plugins or load_plugins(config.plugins.dirs)
        check_config(config, self.plugins)
        self.metrics = Metrics()
        self.on_change = lambda: None  # the daemon sets this to schedule a reconcile
        self.read_only: str | None = None  # why the registry cannot be changed (FAULTS C5), or None
        self._engine: InferenceEngine | None = None
        self._ingestor: Ingestor | None = None
        self.executor: Executor | None = None

    # --- life ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Lock the state folder, recover from a crash, open the base, replay the registry and publish/serve (as a
        follower: open the state folder's files read-only and serve the version the primary's ``current`` names)."""
        cfg = self.config
        if cfg.base.weights is None:
            raise ConfigError("no base model: [base] weights is not set", key="base.weights",
                              hint="set [base] weights (and model), or run `skillhub run`, which uses the demo")
        state = Path(cfg.state.dir)
        report: RecoveryReport | None = None
        if self.following:  # the primary's files, no lock, no database: every change is refused
            self.registry, self._refusal = follower_registry(state)
        else:
            report = self._open_registry(state)
        self.family = self.plugins.family(cfg.base.family).from_config(cfg.base)
        self.base_path = Path(cfg.base.weights)
        self.base: Checkpoint = open_checkpoint(self.base_path)
        self.base_sha = fingerprint(self.base)
        self.included = self.family.included_keys(self.base)
        self.device = resolve_device(cfg.device)
        self.policy = self.plugins.make_policy(cfg.stitch.policy, cfg.stitch.params)
        self.heads = HeadStore(self.registry.load_head)
        self.mask_analytics = AnalyticsCache(self.registry.load_mask)
        accumulate = torch.float64 if cfg.stitch.accumulate == "float64" else torch.float32
        parameters = sum(self.base[k].numel for k in self.included)
        if fix_mmap_threshold(parameters, cfg.stitch.sparse_from):  # big models: freed scratch goes back (heap.py)
            log.info("mmap_threshold_fixed", bytes=MMAP_THRESHOLD, parameters=parameters)
        stitcher = Stitcher({k: self.base.tensor(k) for k in self.included}, self.policy, device=self.device,
                            accumulate=accumulate, **service_layout(parameters, cfg.stitch.sparse_from))
        included = set(self.included)
        passthrough = {k: self.base.tensor(k).clone() for k in self.base if k not in included}
        describe = {"base": self.base_sha, "family": self.family.name, "policy": self.policy.name,
                    "policy_params": self.policy.params.model_dump(mode="json")}
        if self.following:  # no gate (it stores heads), no publisher, no ingestor: the primary's files only
            self.gate = None
            self.reconciler = Follower(
                masks=lambda sha: self.registry.load_mask(sha, verify=True, device=self.device),
                models_dir=state / "models", stitcher=stitcher, passthrough=passthrough, describe=describe,
                metrics=self.metrics, poll_seconds=cfg.follow.poll_seconds)
            served = self.reconciler.start()
            log.info("follower_started", state=str(state), base_sha=self.base_sha[:16], device=str(self.device),
                     serving=served.number if served else None)
            return
        self.gate = Gate(runtime=runtime_on(self.family.runtime, self.device), base=self._base_tensors,
                         heads=self.heads.get,
                         examples=self.registry.load_examples, masks=self.registry.load_mask,
                         store_head=lambda head: self.registry.store_head(*head.encode()),
                         statistics=self._recalibrate_statistics, store_statistics=self.registry.store_statistics
                         ) if self.family.reads_examples and self.read_only is None else None
        self.reconciler = Reconciler(
            registry=self.registry, config=lambda: self.config, stitcher=stitcher, passthrough=passthrough,
            publisher=Publisher(state / "models", keep=cfg.state.keep_versions,
                                write_weights=cfg.state.write_weights and self.read_only is None,
                                layout=layout_of(self.base)),
            describe=describe, device=self.device, metrics=self.metrics, relocalize=self._relocalize,
            event=self._event, gate=self.gate)
        if self.read_only is not None:
            served = self.reconciler.serve_last_verified(self.read_only)
            log.error("registry_unusable", error=self.read_only, recovery=RECOVERY_STEPS,
                      serving=served.number if served else None)
            return
        workspace = Workspace(base=self.base, base_sha=self.base_sha, family=self.family, plugins=self.plugins,
                              device=self.device)
        self.executor = make_executor(cfg.executor, workspace, WorkspaceSpec(
            cfg.base, self.base_sha, tuple(cfg.plugins.dirs), cfg.device))
        self._ingestor = Ingestor(registry=self.registry, plugins=self.plugins, family=self.family, base=self.base,
                                  base_sha=self.base_sha, executor=self.executor, config=lambda: self.config,
                                  metrics=self.metrics, on_registered=lambda: self.on_change(), event=self._event)
        log.info("hub_started", base=str(self.base_path), base_sha=self.base_sha[:16], included=len(self.included),
                 device=str(self.device), policy=self.policy.name, executor=self.executor.kind, recovered=report is not None and not report.clean)
        self.reconciler.start()

    def _open_registry(self, state: Path) -> RecoveryReport | None:
        """Lock and open the registry and recover it from a crash (the report), or, when its database cannot be
        used (FAULTS C5), open its files only and go read-only (None)."""
        try:
            self.registry = Registry(state)
            check_registry_is_current(self.registry, state)
        except RegistryCorruptError as e:  # C5: never an empty registry over the top; serve what files vouch for
            self.read_only = str(e)
            self.registry = Registry.files_only(state, take_lock(state), e)
            return None
        report = self.registry.recover()
        for row in report.pending:  # interrupted localizations: the drop is still in the inbox or staging
            self.registry.mark_failed(row.id, "interrupted by a restart; it is retried when the file is seen again")
        if report.removed_orphans:
            log.warning("orphan_masks_set_aside", count=len(report.removed_orphans), folder=str(state / "orphans"),
                        hint="one is normal after a crash; many mean the registry lost rows: run skillhub doctor")
        return report

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()
        if self._ingestor is not None:
            self._ingestor.close()
        if self.executor is not None:
            self.executor.close()
        if isinstance(getattr(self, "reconciler", None), Reconciler):
            self.reconciler.publisher.close()
        elif hasattr(self, "reconciler"):
            self.reconciler.stop()
        if hasattr(self, "registry"):
            self.registry.close()

    def __enter__(self) -> Hub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the data's path ----------------------------------------------------------------------------------------

    def ingest(self, path: Path, *, skill: str | None = None, default_name: str | None = None,
               sha256: str | None = None, sidecar: Mapping[str, Any] | None = None, keep: bool = True) -> VersionRow:
        """Validate, localize and register one (staged) checkpoint: :meth:`skillhub.ingest.Ingestor.ingest`."""
        if self.following:  # only the primary ingests
            raise self._refusal
        if self._ingestor is None:
            raise RegistryCorruptError(self.read_only or "the hub is not started", hint=RECOVERY_STEPS)
        return self._ingestor.ingest(path, skill=skill, default_name=default_name, sha256=sha256, sidecar=sidecar,
                                     keep=keep)

    def offer(self, path: Path, *, skill: str | None = None, default_name: str | None = None,
              sha256: str | None = None, sidecar: Mapping[str, Any] | None = None, keep: bool = True,
              on_done: Callable[[], None] | None = None) -> VersionRow | None:
        """:meth:`ingest` without waiting for the executor (:meth:`skillhub.ingest.Ingestor.offer`): ``None`` while
        the drop's job runs; call again after ``on_done`` to register it."""
        if self._ingestor is None:
            raise RegistryCorruptError(self.read_only or "the hub is not started", hint=RECOVERY_STEPS)
        return self._ingestor.offer(path, skill=skill, default_name=default_name, sha256=sha256, sidecar=sidecar,
                                    keep=keep, on_done=on_done)

    def localizing(self) -> int:
        """How many drops' localization jobs are in flight (submitted through :meth:`offer`, not yet registered)."""
        return self._ingestor.in_flight() if self._ingestor is not None else 0

    def reconcile(self) -> ModelVersion | None:
        """Stitch the wanted set and publish: :meth:`skillhub.reconcile.Reconciler.reconcile` (nothing while the
        registry is read-only)."""
        if self.read_only is not None or not isinstance(self.reconciler, Reconciler):
            return None  # read-only, or a follower (its watch thread applies the primary's versions)
        version = self.reconciler.reconcile()
        self._adopt()
        return version

    def _adopt(self) -> None:
        """Hand the model the quality gate built for the version now served to the inference engine."""
        gate: Gate | None = getattr(self, "gate", None)
        built = gate.candidate_runtime if gate is not None else None
        if built is not None and self._engine is not None and built[0] is self.current:
            self._engine.adopt(*built)

    def _recalibrate_statistics(self, runtime: Runtime, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The plugins' :func:`~skillhub.hookspecs.recalibrate_statistics` for the served family."""
        return self.plugins.manager.hook.recalibrate_statistics(family=self.family.name, runtime=runtime,
                                                                images=images)

    def _route_delta(self, key: str) -> SparseDelta:
        """What the skill route patches in for a :func:`~skillhub.routing.route_key`: the mask, with the
        recalibrated statistics the quality gate stored for it when there are any."""
        mask, stats = split_route_key(key)
        delta = self.registry.load_mask(mask)
        if stats is None:
            return delta
        return with_statistics(delta, self._base_tensors(), self.registry.load_statistics(stats))

    def _base_tensors(self) -> dict[str, torch.Tensor]:
        """θ₀, every tensor (mapped from the base file, not copied)."""
        return {k: self.base.tensor(k) for k in self.base}

    @property
    def current(self) -> ModelVersion | None:
        """The version being served (immutable; hold on to it for the length of a request)."""
        return self.reconciler.current if hasattr(self, "reconciler") else None

    @property
    def last_error(self) -> str | None:
        return self.reconciler.last_error if hasattr(self, "reconciler") else None

    @property
    def retry_at(self) -> float | None:
        """Monotonic time to run :meth:`reconcile` again after a transient failure (disk full, out of memory)."""
        return self.reconciler.retry_at if hasattr(self, "reconciler") else None

    def _relocalize(self, row: VersionRow, strategy: str, params: dict[str, Any]) -> bool:
        return self._ingestor is not None and self._ingestor.relocalize(row, strategy, params)

    def _event(self, name: str, **kw: Any) -> None:
        try:
            getattr(self.plugins.manager.hook, name)(**kw)
        except Exception as e:  # a broken plugin never stops the service
            log.warning("plugin_event_failed", hook=name, error=f"{type(e).__name__}: {e}")

    # --- inference ----------------------------------------------------------------------------------------------

    @property
    def engine(self) -> InferenceEngine:
        """The inference engine (dynamic batching over the served versions), started on first use."""
        with self.reconciler.lock:
            if self._engine is None:
                serve = self.config.serve
                self._engine = InferenceEngine(
                    runtime_on(self.family.runtime, self.device), self.heads.get, family=self.family.name,
                    max_batch=serve.max_batch,
                    max_wait_ms=serve.batch_wait_ms, base=self._base_tensors, masks=self._route_delta,
                    skill_cache_bytes=serve.skill_cache_mb << 20)
                self._engine.start()
                self._adopt()
            return self._engine

    def _served(self) -> ModelVersion:
        version = self.current
        if version is None:
            raise StitchError("no model version is being served yet", hint="drop a skill into the inbox")
        return version

    def embed(self, images: Sequence[Any]) -> tuple[int, torch.Tensor]:
        """Normalised image embeddings of PIL ``images`` from the current version: (version, [N, D])."""
        version = self._served()
        return version.number, self.engine.embed(version, self.engine.preprocess(version, images))

    def predict(self, skill: str, images: Sequence[Any], top_k: int = 5, *, route: str | None = None
                ) -> dict[str, Any]:
        """Classify PIL ``images`` with ``skill``'s head on the current version, as ``POST
        /v1/skills/{skill}/predict`` does: on ``route`` ``"skill"`` (θ₀ + γ⊙τ of the skill's mask) or ``"merged"``
        (the stitched model); default ``[serve] route``."""
        return self.engine.predict(self._served(), skill, images, top_k, route=route or self.config.serve.route)

    def predict_all(self, images: Sequence[Any], skills: Sequence[str] | None = None, top_k: int = 5
                    ) -> dict[str, Any]:
        """Every skill of ``skills`` (default: all the merged model serves) on each image, from one forward pass of
        the merged model (``POST /v1/predict``)."""
        version = self._served()
        emb = self.engine.embed(version, self.engine.preprocess(version, images))
        return self.engine.predict_many(version, list(skills or version.manifest["skills"]), emb, top_k)

    def skill_weights(self, skill: str, version: ModelVersion | None = None) -> tuple[ModelVersion, Mapping[str, torch.Tensor]]:
        """θ₀ + γ⊙τ of ``skill``'s mask in ``version`` (default: the current one), every tensor of the model, built
        one tensor at a time as it is read (``GET /v1/model/weights?skill=NAME``)."""
        version = version or self._served()
        return version, PatchedTensors(self._base_tensors(),
                                       self.engine.masks.get(self.engine.route_mask(version, skill, "skill")))

    def head(self, row: VersionRow) -> Head | None:
        """A skill version's classification head (families with heads)."""
        return self.heads.get(row.meta.get("head"))

    # --- control ------------------------------------------------------------------------------------------------

    def set_enabled(self, skill: str, enabled: bool) -> None:
        self.registry.set_enabled(skill, enabled)
        self.on_change()

    def pin(self, skill: str, version: int | None) -> None:
        self.registry.set_pinned(skill, version)
        self.on_change()

    def remove(self, skill: str) -> int:
        """Forget a skill: its versions, mask files, staged checkpoints and heads no other version uses."""
        with self.reconciler.lock:
            n = self.registry.remove_skill(skill)
        self.on_change()
        return n

    def apply_config(self, config: Config) -> None:
        """Switch to a new, already validated config: skills on/off, pins, strategies (stitch policy, base and
        device changes need a restart and are refused: :func:`skillhub.reload.check_reload`)."""
        check_reload(self.config, config, self.plugins, lambda: (s.name for s in self.registry.skills()))
        self.config = config
        self.on_change()

    # --- views --------------------------------------------------------------------------------------------------

    def skills_view(self) -> list[dict[str, Any]]:
        """Every skill with its settings, served version and versions (what ``GET /v1/skills`` answers)."""
        if self.read_only is not None or self.following:  # no registry to list: what the served version holds
            return views.served_skills(self.current.manifest if self.current else None)
        quality = (self.current.manifest.get("quality") or {}) if self.current is not None else {}
        return views.skills(self.registry.skills(), self.config.skills, dict(self.reconciler.active),
                            dict(self.reconciler.held), quality)

    def model_view(self) -> dict[str, Any]:
        """The served version: base, policy, skills, overlap (what ``GET /v1/model`` answers)."""
        cur = self.current
        if cur is None:
            return {"version": None}
        with self.reconciler.lock:  # the stitcher changes under reconcile; overlap describes the served version
            overlap = self.reconciler.stitcher.overlap()
        return views.model(cur, base_sha=self.base_sha, policy=self.policy.name, overlap=overlap,
                           included_parameters=sum(self.base[k].numel for k in self.included))

    def analytics(self, version: int | None = None) -> dict[str, Any]:
        """The mask analytics of the served version, or of kept version ``version`` (what ``GET /v1/analytics``
        answers): :func:`skillhub.views.analytics`, cached per version."""
        return views.analytics(self.mask_analytics, self.current, lambda: self.reconciler.publisher, version)

    def history(self) -> list[dict[str, Any]]:
        """What each kept version changed, newest first, with the gate's decisions (``GET /v1/history``):
        :func:`skillhub.views.history` over the kept manifests."""
        return views.history(self.reconciler.publisher, self.current)

    def inbox(self) -> dict[str, Any]:
        """The drops waiting in the inbox and the rejected ones with their reasons (``GET /v1/inbox``)."""
        return inbox_view(Path(self.config.watch.dir), taken=Path(self.config.state.dir) / "staging" / TAKEN)
