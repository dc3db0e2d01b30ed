"""Inference on the served versions: an engine with a dynamic batcher (the HTTP routes in :mod:`skillhub.server`
and :class:`~skillhub.hub.Hub` are thin layers over it).

Every request takes the current :class:`~skillhub.publish.ModelVersion` once, at its start, and is answered by that
version however many versions are published meanwhile (FAULTS C9). Images from concurrent requests that hold the
same version are embedded together: the batcher collects up to ``max_batch`` images or waits ``max_wait_ms``, so
throughput under load is several times that of one-at-a-time, while a lone request waits at most a few ms extra.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from skillhub.errors import SkillhubError, StitchError
from skillhub.families import Runtime
from skillhub.head import Head
from skillhub.log import get_logger
from skillhub.publish import ModelVersion

log = get_logger("skillhub.inference")


class Overloaded(SkillhubError):
    """The inference queue is full (answered with 503)."""


@dataclass
class _Job:
    version: ModelVersion
    batch: torch.Tensor
    future: Future[torch.Tensor] = field(default_factory=Future)


class InferenceEngine:
    """Builds a runnable model per served version (cached) and embeds images with dynamic batching.

    :param runtime: builds a runnable model from a version's tensors (the family's ``runtime``), or returns ``None``
        when the family serves no inference.
    :param head: a skill's classification head by its sha256 (a :class:`~skillhub.head.HeadStore`'s ``get``).
    """

    def __init__(self, runtime: Callable[[Mapping[str, torch.Tensor]], Runtime | None],
                 head: Callable[[str | None], Head | None], *, family: str = "", max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_queue: int = 1024, cache: int = 2) -> None:
        self._make_runtime, self._head, self.family = runtime, head, family
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

    def submit(self, version: ModelVersion, batch: torch.Tensor) -> Future[torch.Tensor]:
        job = _Job(version, batch)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded("inference queue is full", hint="retry shortly") from None
        return job.future

    def embed(self, version: ModelVersion, batch: torch.Tensor) -> torch.Tensor:
        """Blocking embed through the batcher (the Python API's path)."""
        return self.submit(version, batch).result()

    def head(self, version: ModelVersion, skill: str) -> Head:
        """``skill``'s classification head in ``version``; :class:`StitchError` when it is not served or has none."""
        entry = version.manifest["skills"].get(skill)
        if entry is None:
            raise StitchError(f"skill {skill!r} is not in the served model (version {version.number})", key=skill)
        head = self._head(entry.get("head"))
        if head is None:
            raise StitchError(f"skill {skill!r} has no classification head", key=skill)
        return head

    def preprocess(self, version: ModelVersion, images: Sequence[Any]) -> torch.Tensor:
        """PIL images → the normalised batch ``version``'s model takes."""
        return self.runtime(version).preprocess(images)

    def predict(self, version: ModelVersion, skill: str, images: Sequence[Any], top_k: int = 5) -> dict[str, Any]:
        """Classify PIL ``images`` with ``skill``'s head on ``version`` (blocking, through the batcher)."""
        head = self.head(version, skill)
        emb = self.embed(version, self.preprocess(version, images))
        return {"version": version.number, "skill": skill, "predictions": head.top_k(emb, top_k)}

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
            by_version: dict[int, list[_Job]] = {}
            for job in jobs:
                by_version.setdefault(job.version.number, []).append(job)
            for group in by_version.values():
                self._embed_group(group)

    def _embed_group(self, group: list[_Job]) -> None:
        try:
            rt = self.runtime(group[0].version)
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
