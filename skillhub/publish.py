"""Published model versions: immutable snapshots, served from memory at once, written to disk in the background.

Layout: ``state/models/<n>/manifest.json`` (skills with versions and mask hashes, base fingerprint, stitch policy,
creation time) and ``state/models/<n>/model.safetensors``; ``state/models/current`` holds the number of the version
being served. A version directory appears by an atomic rename of a complete temp directory holding its manifest;
``current`` moves after that. For a base given as a model folder (``config.json``, tokenizer, shards and an index:
:mod:`skillhub.modelfolder`), a version's weights are written in the base's layout instead (the same shard files
and index, the config and tokenizer files beside them), so ``state/models/<n>/`` is a folder that
``from_pretrained``, vLLM or TGI load, and the symlink ``state/models/latest`` is moved to it once its weights are
complete: point an external server at ``latest``, never at a folder whose weights are still being written. The
weights file follows from a background thread (temp + fsync + rename), because
the manifest alone determines the weights (the registry can always rebuild them) and the drop-to-served path must
not pay O(model) disk writes that the O(mask) stitch avoided (DESIGN §3, publish): the writer waits for
``quiet_seconds`` without a new publication, and during a burst writes only the newest version.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from skillhub import faultpoints
from skillhub.atomic import atomic_file, fsync_dir
from skillhub.checkpoint import write_safetensors
from skillhub.errors import DiskFullError, RegistryError
from skillhub.log import get_logger
from skillhub.modelfolder import INDEX_NAME, Layout, write_model

log = get_logger("skillhub.publish")
IDENTITY_KEYS = ("base", "family", "policy", "policy_params", "skills")
#: the symlink to the newest version whose weights are complete on disk (a loadable model folder)
LATEST = "latest"


def identity(manifest: Mapping[str, Any]) -> str:
    """What determines a version's weights: the manifest less its number and time."""
    return json.dumps({k: manifest.get(k) for k in IDENTITY_KEYS}, sort_keys=True)


@dataclass(frozen=True, eq=False)
class ModelVersion:
    """One merged model, immutable: a request that took it keeps using it while newer versions are published."""

    number: int
    tensors: Mapping[str, torch.Tensor]
    manifest: dict[str, Any]
    created: float = field(default_factory=time.time)

    @property
    def identity(self) -> str:
        return identity(self.manifest)


class PublishedVersions:
    """The published versions of a models folder, read only: their numbers and manifests (what a follower shows
    of the primary's versions; :class:`Publisher` is the writer of the same folder)."""

    def __init__(self, models_dir: Path) -> None:
        self.dir = models_dir

    def manifest(self, number: int) -> dict[str, Any] | None:
        """A published version's manifest, or None when it is missing or unreadable."""
        return read_manifest(self.dir, number)

    def numbers(self) -> list[int]:
        return sorted(int(p.name) for p in self.dir.iterdir() if p.is_dir() and p.name.isdigit())


class Publisher(PublishedVersions):
    """Owns ``state/models/``: version numbers, manifests, the ``current`` pointer, background weight files."""

    def __init__(self, models_dir: Path, *, keep: int = 5, write_weights: bool = True,
                 quiet_seconds: float = 2.0, layout: Layout | None = None) -> None:
        """:param layout: the base's layout (:func:`skillhub.modelfolder.layout_of`); for a base folder, versions'
        weights are written in it (a loadable model folder), else as one ``model.safetensors``."""
        super().__init__(models_dir)
        self.layout = layout if layout is not None and layout.folder else None
        self.quiet_seconds = quiet_seconds
        self._last_publish = 0.0
        self._hurry = threading.Event()
        self.keep = keep
        self.write_weights = write_weights
        self.dir.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue[ModelVersion | None] = queue.Queue()
        self._thread = threading.Thread(target=self._writer, name="skillhub-weights-writer", daemon=True)
        self._thread.start()
        self._latest_queued = 0
        self.written: set[int] = set()

    # --- start-up -----------------------------------------------------------------------------------------------

    def recover(self) -> dict[str, Any] | None:
        """Remove half-written version directories, weight temp files and versions that never became current (a
        crash between a version's directory and its ``current`` pointer, FAULTS C3); return the current manifest,
        if any."""
        current = self.current_number()
        for n in self.numbers():
            if current is None or n > current:
                log.warning("unpublished_version_removed", version=n)
                shutil.rmtree(self.dir / str(n), ignore_errors=True)
        for p in self.dir.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            elif p.is_dir():
                for t in p.glob(".*.tmp"):
                    t.unlink(missing_ok=True)
        return self.manifest(current) if current is not None else None

    @staticmethod
    def peek_current(models_dir: Path) -> dict[str, Any] | None:
        """The current version's manifest read without a publisher (nothing is created or cleaned)."""
        number = read_current(models_dir)
        return read_manifest(models_dir, number) if number is not None else None

    @staticmethod
    def peek(models_dir: Path, number: int | None = None) -> dict[str, Any] | None:
        """Version ``number``'s manifest (default: the current one's) read without a publisher, with its number."""
        number = read_current(models_dir) if number is None else number
        found = read_manifest(models_dir, number) if number is not None else None
        return None if found is None else {**found, "version": number}

    def current_number(self) -> int | None:
        return read_current(self.dir)

    def next_number(self) -> int:
        return max(self.numbers(), default=0) + 1

    def weights_file(self, number: int) -> Path:
        """The file whose presence says version ``number``'s weights are complete (the one written last)."""
        if self.layout is None:
            return self.dir / str(number) / "model.safetensors"
        return self.dir / str(number) / (INDEX_NAME if self.layout.indexed else self.layout.shards[-1].name)

    def has_weights(self, number: int) -> bool:
        return self.weights_file(number).is_file()

    # --- publishing ---------------------------------------------------------------------------------------------

    def publish(self, version: ModelVersion) -> None:
        """Make ``version`` durable as the current one: its manifest dir (atomic), then ``current``; weights later."""
        final = self.dir / str(version.number)
        try:
            if not final.exists():
                tmp = self.dir / f".{version.number}.{os.getpid()}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    tmp.mkdir()
                    manifest = dict(version.manifest, version=version.number, created=version.created)
                    _write_text(tmp / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
                    faultpoints.reach("publish_manifest")
                    os.replace(tmp, final)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                fsync_dir(self.dir)
                faultpoints.reach("publish_current")
            _write_text(self.dir / "current", f"{version.number}\n")
        except OSError as e:
            if final.is_dir() and self.current_number() != version.number:
                shutil.rmtree(final, ignore_errors=True)  # never current: a later number may reuse nothing of it
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"disk full publishing version {version.number} ({e.strerror or e})",
                                    path=self.dir, hint="free space; the service keeps serving the previous "
                                                        "version and retries by itself") from e
            raise RegistryError(f"cannot publish version {version.number} ({e.strerror or e})", path=self.dir,
                                hint="check permissions and free space of the state folder") from e
        self._last_publish = time.monotonic()
        self.queue_weights(version)
        self.prune()

    def queue_weights(self, version: ModelVersion) -> None:
        if self.write_weights and not self.has_weights(version.number):
            self._latest_queued = version.number
            self._queue.put(version)

    def _writer(self) -> None:
        while True:
            version = self._queue.get()
            if version is None:
                return
            # Wait for a quiet moment: writing O(model) bytes competes with the next drop's staging and
            # localization, and the drop-to-served path must not pay for it.
            while not self._hurry.is_set() and time.monotonic() - self._last_publish < self.quiet_seconds:
                self._hurry.wait(0.05)
            # During a burst only the newest version's weights are worth writing; older ones are rebuildable.
            if version.number < self._latest_queued or not (self.dir / str(version.number)).is_dir():
                continue
            path = self.dir / str(version.number) / "model.safetensors"
            try:
                t0 = time.perf_counter()
                meta = {"skillhub.manifest": json.dumps(version.manifest, sort_keys=True)}
                if self.layout is None:
                    write_safetensors(path, version.tensors, meta, faultpoint="weights_write")
                else:
                    tensors = version.tensors
                    write_model(path.parent, self.layout, tensors, tensors.__getitem__, meta,
                                faultpoint="weights_write")
                    self._point_latest(version.number)
                self.written.add(version.number)
                log.info("weights_written", version=version.number, seconds=round(time.perf_counter() - t0, 3))
            except OSError as e:  # disk full etc.: the version still serves from memory; retried on next publish
                log.error("weights_write_failed", version=version.number, error=str(e))

    def flush(self, timeout: float = 60.0) -> bool:
        """Write queued weight files now, without waiting for a quiet moment (tests, shutdown)."""
        self._hurry.set()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._queue.empty() and self._idle():
                    return True
                time.sleep(0.05)
            return False
        finally:
            self._hurry.clear()

    def _idle(self) -> bool:
        n = self._latest_queued
        return n == 0 or self.has_weights(n) or not (self.dir / str(n)).is_dir()

    def _point_latest(self, number: int) -> None:
        """Move ``latest`` to version ``number`` (atomically: a new symlink renamed over the old one)."""
        link = self.dir / LATEST
        tmp = self.dir / f".{LATEST}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(str(number), tmp)
        os.replace(tmp, link)
        fsync_dir(self.dir)

    def latest_number(self) -> int | None:
        """The version ``latest`` points to (the newest one whose model folder is complete), if any."""
        try:
            return int(os.readlink(self.dir / LATEST))
        except (OSError, ValueError):
            return None

    def prune(self) -> None:
        """Keep the newest ``keep`` versions; never the current one, nor the one ``latest`` points to."""
        keep = {self.current_number(), self.latest_number()}
        for n in self.numbers()[: -self.keep]:
            if n not in keep:
                shutil.rmtree(self.dir / str(n), ignore_errors=True)

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout)


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text.encode())


def read_current(models_dir: Path) -> int | None:
    """The number ``models_dir/current`` names, or None when there is none (nothing is created or cleaned)."""
    try:
        return int((models_dir / "current").read_text().strip())
    except (OSError, ValueError):
        return None


def read_manifest(models_dir: Path, number: int) -> dict[str, Any] | None:
    """Version ``number``'s manifest as published (with ``version`` and ``created``), or None when it is missing
    or unreadable."""
    try:
        found = json.loads((models_dir / str(number) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None
