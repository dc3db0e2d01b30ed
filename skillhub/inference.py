"""Inference on the served merged model: a dynamic batcher and the ``predict`` / ``embed`` HTTP routes.

Every request takes the current :class:`~skillhub.publish.ModelVersion` once, at its start, and is answered by that
version however many versions are published meanwhile (FAULTS C9). Images from concurrent requests that hold the
same version are embedded together: the batcher collects up to ``max_batch`` images or waits ``max_wait_ms``, so
throughput under load is several times that of one-at-a-time, while a lone request waits at most a few ms extra.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from fastapi import APIRouter, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from skillhub.errors import SkillhubError
from skillhub.families import Runtime
from skillhub.log import get_logger
from skillhub.publish import ModelVersion

if TYPE_CHECKING:
    from skillhub.hub import Hub

log = get_logger("skillhub.inference")
MAX_IMAGES_PER_REQUEST = 64
MAX_IMAGE_PIXELS = 40_000_000


class Overloaded(SkillhubError):
    """The inference queue is full (answered with 503)."""


@dataclass
class _Job:
    version: ModelVersion
    batch: torch.Tensor
    future: Future[torch.Tensor] = field(default_factory=Future)


class InferenceEngine:
    """Builds a runnable model per served version (cached) and embeds images with dynamic batching."""

    def __init__(self, hub: Hub, *, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 cache: int = 2) -> None:
        self.hub = hub
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
                rt = self.hub.family.runtime(version.tensors)
                if rt is None:
                    raise SkillhubError(f"model family {self.hub.family.name!r} serves no inference",
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


def decode_images(raw: list[bytes]) -> list[Any]:
    """Bytes → PIL images, refusing non-images and decompression bombs with a 400 naming the image."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    images = []
    for i, data in enumerate(raw):
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception as e:  # PIL raises many types for bad input
            raise HTTPException(400, f"image {i} is not a readable image ({type(e).__name__})") from None
        images.append(img)
    return images


async def read_images(request: Request) -> tuple[list[bytes], int]:
    """Images from a multipart form (fields ``images``/``image``/``file``) or JSON ``{"images": [base64...]}``."""
    ctype = request.headers.get("content-type", "")
    top_k = 5
    raw: list[bytes] = []
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        for key, value in form.multi_items():
            if key in ("images", "image", "file") and hasattr(value, "read"):
                raw.append(await value.read())
            elif key == "top_k":
                top_k = _int(value)
    else:
        try:
            body = await request.json()
            items = body.get("images") if isinstance(body, dict) else None
            if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
                raise ValueError
            raw = [base64.b64decode(s, validate=True) for s in items]
            top_k = _int(body.get("top_k", 5))
        except (ValueError, binascii.Error):
            raise HTTPException(400, 'send multipart "images" files, or JSON {"images": ["<base64>", ...]}') from None
    if not raw:
        raise HTTPException(400, "no images in the request")
    if len(raw) > MAX_IMAGES_PER_REQUEST:
        raise HTTPException(413, f"at most {MAX_IMAGES_PER_REQUEST} images per request")
    return raw, max(1, top_k)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HTTPException(400, "top_k must be an integer") from None


def inference_router(hub: Hub) -> APIRouter:
    """The ``predict`` and ``embed`` routes (the engine is started on the first request)."""
    router = APIRouter()

    def served() -> ModelVersion:
        version = hub.current  # taken once: the whole request is answered by this version (C9)
        if version is None:
            raise HTTPException(503, "no model version is being served yet")
        return version

    async def embeddings(request: Request, version: ModelVersion) -> tuple[torch.Tensor, int]:
        raw, top_k = await read_images(request)
        engine = hub.engine
        images = await run_in_threadpool(decode_images, raw)
        rt = await run_in_threadpool(engine.runtime, version)
        batch = await run_in_threadpool(rt.preprocess, images)
        try:
            emb = await asyncio.wrap_future(engine.submit(version, batch))
        except Overloaded as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        return emb, top_k

    @router.post("/v1/skills/{name}/predict")
    async def predict(name: str, request: Request) -> dict[str, Any]:
        version = served()
        entry = version.manifest["skills"].get(name)
        if entry is None:
            raise HTTPException(404, f"skill {name!r} is not in the served model (version {version.number})")
        head = hub.head_by_sha(entry.get("head"))
        if head is None:
            raise HTTPException(400, f"skill {name!r} has no classification head")
        emb, top_k = await embeddings(request, version)
        return {"version": version.number, "skill": name, "predictions": head.top_k(emb, top_k)}

    @router.post("/v1/embed")
    async def embed(request: Request) -> dict[str, Any]:
        version = served()
        emb, _ = await embeddings(request, version)
        return {"version": version.number, "embeddings": emb.tolist()}

    return router
