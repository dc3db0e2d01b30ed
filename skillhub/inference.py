"""Inference on the served versions: an engine with a dynamic batcher (the HTTP routes in :mod:`skillhub.server`
and :class:`~skillhub.hub.Hub` are thin layers over it).

Every request takes the current :class:`~skillhub.publish.ModelVersion` once, at its start, and is answered by that
version however many versions are published meanwhile (FAULTS C9). It runs on one of two *routes*:

- ``merged``: the version's stitched model, one forward pass for every skill at once;
- ``skill``: the named skill's own localized model θ₀ + γₜ⊙τₜ (:mod:`skillhub.routing`), with the mask that
  version serves for it.

Images from concurrent requests that run on the same model (the same version on ``merged``, the same mask on
``skill``) are embedded together: the batcher collects up to ``max_batch`` images or waits ``max_wait_ms``, so
throughput under load is several times that of one-at-a-time, while a lone request waits at most a few ms extra.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from skillhub.errors import SkillhubError, StitchError
from skillhub.families import Runtime
from skillhub.head import Head
from skillhub.log import get_logger
from skillhub.publish import ModelVersion
from skillhub.routing import MaskCache, SkillPatcher, check_route, route_key

if TYPE_CHECKING:
    from skillhub.delta import SparseDelta

log = get_logger("skillhub.inference")


class Overloaded(SkillhubError):
    """The inference queue is full (answered with 503)."""


class HeldOut(StitchError):
    """The quality gate held the skill out of the merged model: only its own route serves it (answered with 409)."""


@dataclass
class _Job:
    version: ModelVersion
    batch: torch.Tensor
    mask: str | None = None  # the skill route's mask (sha256); None: the merged model
    future: Future[torch.Tensor] = field(default_factory=Future)

    @property
    def model(self) -> tuple[str, int | str]:
        """Which model runs this job: jobs with the same one share a batch."""
        return ("skill", self.mask) if self.mask is not None else ("merged", self.version.number)


class InferenceEngine:
    """Builds a runnable model per served version (cached) and embeds images with dynamic batching.

    :param runtime: builds a runnable model from a version's tensors (the family's ``runtime``), or returns ``None``
        when the family serves no inference.
    :param head: a skill's classification head by its sha256 (a :class:`~skillhub.head.HeadStore`'s ``get``).
    :param base: θ₀'s tensors, all of them (the skill route builds its one patched copy from them), or ``None``
        when the skill route is not offered.
    :param masks: a mask file's content by its sha256 (the registry's ``load_mask``).
    :param skill_cache_bytes: how many bytes of masks the skill route keeps in memory.
    """

    def __init__(self, runtime: Callable[[Mapping[str, torch.Tensor]], Runtime | None],
                 head: Callable[[str | None], Head | None], *, family: str = "", max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_queue: int = 1024, cache: int = 2,
                 base: Callable[[], Mapping[str, torch.Tensor]] | None = None,
                 masks: Callable[[str], SparseDelta] | None = None, skill_cache_bytes: int = 256 << 20) -> None:
        self._make_runtime, self._head, self.family = runtime, head, family
        self._base = base
        self._patcher: SkillPatcher | None = None
        self._patcher_lock = threading.Lock()
        self.masks = MaskCache(masks or _no_masks, skill_cache_bytes)
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self._queue: queue.Queue[_Job | None] = queue.Queue(max_queue)
        self._runtimes: OrderedDict[int, Runtime] = OrderedDict()
        self._building: dict[int, threading.Lock] = {}  # version -> lock held while its model is built
        self._cache = cache
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches run (tests and the serve benchmark read it)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="skillhub-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def runtime(self, version: ModelVersion) -> Runtime:
        """The runnable model of ``version`` (built once; the last few versions are kept)."""
        with self._lock:
            rt = self._runtimes.get(version.number)
            if rt is not None:
                self._runtimes.move_to_end(version.number)
                return rt
            building = self._building.setdefault(version.number, threading.Lock())
        # One build per version: the first requests on a new version all wait for the same model, rather than each
        # building a copy (a model's worth of memory apiece, and heap fragmentation that stays).
        with building:
            with self._lock:
                rt = self._runtimes.get(version.number)
            if rt is None:
                rt = self._make_runtime(version.tensors)
                if rt is None:
                    raise SkillhubError(f"model family {self.family!r} serves no inference",
                                        hint="use the open_clip family, or download the weights from "
                                             "/v1/model/weights")
                with self._lock:
                    self._runtimes[version.number] = rt
                    while len(self._runtimes) > self._cache:
                        self._runtimes.popitem(last=False)
        with self._lock:
            self._building.pop(version.number, None)
        return rt

    def patcher(self) -> SkillPatcher:
        """The skill route's one runnable copy of θ₀ (built once, on first use; only the worker thread patches it,
        request threads only preprocess with it)."""
        with self._patcher_lock:
            if self._patcher is None:
                if self._base is None:
                    raise StitchError("this service does not offer the skill route", key="route",
                                      hint="ask for route=merged")
                rt = self._make_runtime(self._base())
                if rt is None:
                    raise SkillhubError(f"model family {self.family!r} serves no inference")
                self._patcher = SkillPatcher(rt)
            return self._patcher

    def adopt(self, version: ModelVersion, runtime: Runtime) -> None:
        """Take over an already built runnable model of ``version`` (the quality gate built it to score it)."""
        with self._lock:
            if version.number not in self._runtimes:
                self._runtimes[version.number] = runtime
                while len(self._runtimes) > self._cache:
                    self._runtimes.popitem(last=False)

    def submit(self, version: ModelVersion, batch: torch.Tensor, *, mask: str | None = None) -> Future[torch.Tensor]:
        """Queue ``batch`` for ``version``'s merged model, or (``mask``) for θ₀ + γ⊙τ of that mask."""
        job = _Job(version, batch, mask)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded("inference queue is full", hint="retry shortly") from None
        return job.future

    def embed(self, version: ModelVersion, batch: torch.Tensor, *, mask: str | None = None) -> torch.Tensor:
        """Blocking embed through the batcher (the Python API's path)."""
        return self.submit(version, batch, mask=mask).result()

    @staticmethod
    def entry(version: ModelVersion, skill: str, route: str = "merged") -> dict[str, Any]:
        """``skill``'s entry in ``version``'s manifest (its mask version, mask, head); :class:`StitchError` when the
        version does not serve it on ``route`` (a skill the quality gate held out of the merged model is served on
        its own route only)."""
        entry = version.manifest["skills"].get(skill)
        if entry is not None:
            return dict(entry)
        held = (version.manifest.get("held") or {}).get(skill)
        if held is None:
            raise StitchError(f"skill {skill!r} is not in the served model (version {version.number})", key=skill)
        if route != "skill":
            raise HeldOut(f"skill {skill!r} is held out of the merged model (version {version.number}): "
                              f"{held.get('reason')}", key=skill, hint="ask for route=skill: its own model serves it")
        return dict(held)

    @staticmethod
    def served_skills(version: ModelVersion) -> list[str]:
        """Every skill ``version`` answers: in the merged model, or held out of it (own route only)."""
        return sorted({*version.manifest["skills"], *(version.manifest.get("held") or {})})

    def head(self, version: ModelVersion, skill: str, route: str = "merged") -> Head:
        """``skill``'s classification head on ``route`` in ``version`` (the one the quality gate re-centred there,
        when it did); :class:`StitchError` when the skill is not served there or has no head."""
        heads = ((version.manifest.get("quality") or {}).get(skill) or {}).get("heads") or {}
        head = self._head(heads.get(route) or self.entry(version, skill, route).get("head"))
        if head is None:
            raise StitchError(f"skill {skill!r} has no classification head", key=skill)
        return head

    def preprocess(self, version: ModelVersion, images: Sequence[Any], *, mask: str | None = None) -> torch.Tensor:
        """PIL images → the normalised batch the model takes (``mask``: the skill route's, so that a service asked
        only for skill routes never builds a merged model)."""
        return (self.patcher().runtime if mask is not None else self.runtime(version)).preprocess(images)

    def route_mask(self, version: ModelVersion, skill: str, route: str) -> str | None:
        """The mask the batcher runs ``skill`` with on ``route`` (``None``: the merged model)."""
        entry = self.entry(version, skill, check_route(route))
        if route != "skill":
            return None
        # with the normalization statistics the quality gate re-estimated on this skill's model, if it did
        stats = (((version.manifest.get("quality") or {}).get(skill) or {}).get("statistics") or {}).get("skill")
        key = route_key(str(entry["mask"]), stats)
        self.masks.get(key)  # read now, on the request's thread, not on the worker's
        return key

    def answer(self, version: ModelVersion, skill: str, route: str, emb: torch.Tensor, top_k: int) -> dict[str, Any]:
        """The body of a predict answer: which model answered, and the top-k classes per image."""
        entry = self.entry(version, skill, route)
        return {"version": version.number, "route": route, "skill": skill, "skill_version": entry["version"],
                "predictions": self.head(version, skill, route).top_k(emb, top_k)}

    def predict(self, version: ModelVersion, skill: str, images: Sequence[Any], top_k: int = 5, *,
                route: str = "merged") -> dict[str, Any]:
        """Classify PIL ``images`` with ``skill``'s head on ``version``, on ``route`` (blocking, batched)."""
        mask = self.route_mask(version, skill, route)
        self.head(version, skill, route)  # no head: refused before any work
        emb = self.embed(version, self.preprocess(version, images, mask=mask), mask=mask)
        return self.answer(version, skill, route, emb, top_k)

    def predict_many(self, version: ModelVersion, skills: Sequence[str], emb: torch.Tensor,
                     top_k: int = 5) -> dict[str, Any]:
        """Every skill of ``skills`` on the same merged embeddings (one forward pass for all of them)."""
        heads = {s: self.head(version, s) for s in skills}
        return {"version": version.number, "route": "merged",
                "predictions": {s: h.top_k(emb, top_k) for s, h in heads.items()}}

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, n = [first], first.batch.shape[0]
            deadline = time.monotonic() + self.max_wait
            while n < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                jobs.append(job)
                n += job.batch.shape[0]
            by_model: dict[tuple[str, int | str], list[_Job]] = {}
            for job in jobs:
                by_model.setdefault(job.model, []).append(job)
            # the skill patched in now goes first: one switch fewer per collected batch
            patched = ("skill", self._patcher.current) if self._patcher is not None else None
            for key in sorted(by_model, key=lambda k: k != patched):
                self._embed_group(by_model[key])

    def _embed_group(self, group: list[_Job]) -> None:
        try:
            mask = group[0].mask
            if mask is None:
                rt = self.runtime(group[0].version)
            else:
                rt = self.patcher().use(mask, self.masks.get(mask))
            out = rt.embed(torch.cat([j.batch for j in group]))
            self.batches += 1
        except Exception as e:  # every waiting request gets the error; the worker lives on
            for j in group:
                j.future.set_exception(e)
            return
        start = 0
        for j in group:
            size = j.batch.shape[0]
            j.future.set_result(out[start:start + size])
            start += size


def _no_masks(sha: str) -> SparseDelta:
    raise StitchError("this service does not offer the skill route", key="route", hint="ask for route=merged")
