"""Serving replicas (DESIGN §7): ``skillhub run --follow`` serves the versions a primary publishes in a state folder
it shares, and never writes that folder.

A published version's manifest (:mod:`skillhub.publish`) fully determines its weights: the base fingerprint, the
stitch policy and its params, and every skill's mask by content hash (plus the heads that serve it). A follower
keeps its own :class:`~skillhub.stitch.Stitcher` over the same base and, when ``models/current`` moves, replays
the difference between the manifest it serves and the new one as mask removes and adds (:func:`replay_plan`), each
read from the shared ``masks/``: the cost is O(changed masks), like the primary's own reconcile, and the full
weights file is never read. With the same masks and float64 accumulators (the default) the result is the
primary's, bit for bit, whatever order the masks arrive in.

Safety, from how the primary publishes: a version's directory appears by one rename of a complete temp directory
and ``current`` moves after it, so a ``current`` that names a version always names a complete manifest; mask files
are written (temp, fsync, rename) before any manifest names them and are checked against their hash here. All new
masks are read before the stitcher changes, the version is switched in one assignment after its snapshot is
complete and its weights pass the finite check, and requests keep the version they started on (FAULTS C9). A
version that cannot be applied (a mask the primary removed between publication and this read, a config that does
not match the primary's) is not served: the last good one keeps serving, the error shows in ``/healthz``, and it
is tried again. When the primary dies, ``current`` stays where it was and so does the follower.

Lag is measured from the moment ``current`` moved (its mtime, written by the primary) to the moment the follower
serves that version (for the version a follower starts on, from its own start); across machines it includes their
clock difference.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skillhub.errors import FollowerError, RegistryError, SkillhubError, StitchError
from skillhub.log import get_logger
from skillhub.publish import ModelVersion, PublishedVersions, identity, read_current, read_manifest
from skillhub.registry import Registry

if TYPE_CHECKING:
    import torch

    from skillhub.delta import SparseDelta
    from skillhub.metrics import Metrics
    from skillhub.stitch import Stitcher

log = get_logger("skillhub.follow")
RETRY_SECONDS = 2.0  # a version that failed to apply is tried again this long after, not on every poll
DESCRIBE_KEYS = ("base", "family", "policy", "policy_params")


def follower_registry(state: Path) -> tuple[Registry, FollowerError]:
    """The state folder's files, read by hash, with no lock and no database: a follower writes nothing there, and
    every query or change of the registry raises the :class:`~skillhub.errors.FollowerError` returned with it."""
    if not (state / "models").is_dir():
        raise RegistryError("no published versions to follow here (models/ is missing)", path=state,
                            hint="start the primary (`skillhub run`) on this state folder first, or point "
                                 "[state] dir at the primary's")
    refusal = FollowerError(
        "this service is a read-only follower: it serves the primary's published versions and changes nothing",
        path=state, hint="send enable, disable, pin and remove to the primary (`skillhub run` without --follow "
                         "on this state folder)")
    return Registry.files_only(state, None, refusal), refusal


def replay_plan(active: Mapping[str, str], wanted: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """``(removes, adds)``: the skills to take out of a stitcher holding ``active`` (skill → mask sha256) and the
    skills to add so that it holds ``wanted``; a skill whose mask changed is in both. Sorted by name, so every
    follower replays the same steps."""
    removes = sorted(n for n, sha in active.items() if wanted.get(n) != sha)
    adds = sorted(n for n, sha in wanted.items() if active.get(n) != sha)
    return removes, adds


def manifest_masks(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Skill → mask sha256 of the skills a manifest stitches into its merged model (held skills are not in it)."""
    skills = manifest.get("skills")
    if not isinstance(skills, Mapping):
        raise StitchError("the manifest has no 'skills' table", key="skills")
    out = {}
    for name, entry in skills.items():
        sha = entry.get("mask") if isinstance(entry, Mapping) else None
        if not isinstance(sha, str):
            raise StitchError(f"the manifest names no mask for skill {name!r}", key=str(name))
        out[str(name)] = sha
    return out


def apply_manifest(stitcher: Stitcher, active: dict[str, str], manifest: Mapping[str, Any],
                   load: Callable[[str], SparseDelta]) -> tuple[list[str], list[str]]:
    """Bring ``stitcher`` (holding ``active``, which is updated in place) to what ``manifest`` stitches: O(changed
    masks). Every new mask is read (``load``: a sha256 → its mask) before the stitcher changes, so a missing or
    damaged file changes nothing; an add that fails half-way (out of memory) leaves ``active`` true to what the
    stitcher holds, so the next call completes the change. Returns ``(removed, added)``."""
    wanted = manifest_masks(manifest)
    removes, adds = replay_plan(active, wanted)
    deltas = {name: load(wanted[name]) for name in adds}
    for name in removes:
        stitcher.remove(name)
        del active[name]
    for name in adds:
        stitcher.add(name, deltas[name])
        active[name] = wanted[name]
    return removes, adds


class Follower:
    """A read-only replica of the versions a primary publishes under ``models_dir``.

    :param masks: reads a mask file by its sha256, checked against it (the state folder's files, opened read-only).
    :param models_dir: the primary's ``state/models``.
    :param stitcher: this follower's own stitcher over the same base (its included tensors).
    :param passthrough: the base's tensors that are not merged (every version carries them unchanged).
    :param describe: this follower's base fingerprint, family, policy and params: a manifest must match them.
    :param metrics: where the served version and its lag are shown.
    :param poll_seconds: how often ``models/current`` is looked at.

    Readers take :attr:`current` (immutable) once per request, as with the primary's reconciler.
    """

    def __init__(self, *, masks: Callable[[str], SparseDelta], models_dir: Path, stitcher: Stitcher,
                 passthrough: Mapping[str, torch.Tensor], describe: Mapping[str, Any], metrics: Metrics,
                 poll_seconds: float = 0.1) -> None:
        self.masks, self.models_dir, self.stitcher = masks, Path(models_dir), stitcher
        self.publisher = PublishedVersions(self.models_dir)  # the primary's kept versions, read only (history views)
        self.passthrough, self.describe, self.metrics = dict(passthrough), dict(describe), metrics
        self.poll_seconds = poll_seconds
        self.lock = threading.RLock()  # held while the stitcher changes (views read it under the same lock)
        self.active: dict[str, str] = {}  # skill -> mask sha256 stitched in
        self.held: dict[str, Any] = {}  # the primary's gate holds skills; a follower holds none itself
        self.current: ModelVersion | None = None
        self.last_error: str | None = None
        self.retry_at: float | None = None  # not used: the watch thread retries by itself
        self.pointer: int | None = None  # the version ``current`` names now
        self.lag: float | None = None  # seconds from the primary's publication to served here, last version
        self._moved_at: float | None = None  # when ``current`` last moved (its mtime)
        self._seen: tuple[int, int] | None = None  # (inode, mtime) of the ``current`` file last applied
        self._failed: tuple[tuple[int, int], float] | None = None  # the stamp that failed, and when to try again
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._spares = ThreadPoolExecutor(1, thread_name_prefix="skillhub-follow-spares")

    # --- life ---------------------------------------------------------------------------------------------------

    def start(self) -> ModelVersion | None:
        """Serve the version ``current`` names now (if any), then watch it from a background thread."""
        version = self.poll()
        self._thread = threading.Thread(target=self._watch, name="skillhub-follow", daemon=True)
        self._thread.start()
        return version

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._spares.shutdown(wait=False, cancel_futures=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
                self._lag_now()  # /metrics shows the lag growing while behind, without a /healthz call
            except Exception as e:  # the replica keeps serving whatever goes wrong reading the primary's files
                log.exception("follow_poll_crashed", error=f"{type(e).__name__}: {e}")

    # --- one look at the primary ----------------------------------------------------------------------------------

    def poll(self) -> ModelVersion | None:
        """Look at ``models/current`` once; when it names a version not served yet, apply it and serve it. Returns
        the newly served version, else None (nothing new, or it could not be applied: see :attr:`last_error`)."""
        with self.lock:
            try:
                st = os.stat(self.models_dir / "current")
            except OSError:
                return None  # nothing published yet (or the folder is away): keep serving what is served
            stamp = (st.st_ino, st.st_mtime_ns)
            if stamp == self._seen:
                return None
            if self._failed is not None and self._failed[0] == stamp and time.monotonic() < self._failed[1]:
                return None
            number = read_current(self.models_dir)
            self.pointer, self._moved_at = number, st.st_mtime
            if number is not None:
                self.metrics.follow_primary_version.set(number)
            try:
                version = self._version(number)
            except (SkillhubError, OSError, RuntimeError) as e:
                self._failed = (stamp, time.monotonic() + RETRY_SECONDS)
                if self.last_error != str(e):
                    log.error("follow_version_not_applied", version=number, error=str(e),
                              serving=self.current.number if self.current else None)
                self.last_error = str(e)
                return None
            self._seen, self._failed, self.last_error = stamp, None, None
            if version is None:
                return None
            self.current = version
            self.lag = max(0.0, time.time() - max(st.st_mtime, self._started))
            self.metrics.follow_version.set(version.number)
            self.metrics.follow_lag.set(self.lag)
            self.metrics.skills.set(len(self.active))
            self._spares.submit(self.stitcher.prepare)  # copies for the next change, off its path
            log.info("follow_version_served", version=version.number, skills=sorted(self.active),
                     lag_seconds=round(self.lag, 4))
            return version

    def _version(self, number: int | None) -> ModelVersion | None:
        """The version ``number`` built on this stitcher (None: the one served already is that version)."""
        if number is None:
            raise StitchError("models/current names no version number", path=self.models_dir / "current",
                              hint="the primary writes it; it is read again when it changes")
        manifest = read_manifest(self.models_dir, number)
        if manifest is None:
            raise StitchError(f"version {number} has no readable manifest", path=self.models_dir / str(number),
                              hint="the primary may have pruned it; the next version is taken when it is published")
        shown = {k: v for k, v in manifest.items() if k not in ("version", "created")}
        if self.current is not None and self.current.number == number and \
                self.current.identity == identity(shown):
            return None
        theirs = {k: manifest.get(k) for k in DESCRIBE_KEYS}
        ours = {k: self.describe.get(k) for k in DESCRIBE_KEYS}
        if theirs != ours:
            differ = [k for k in DESCRIBE_KEYS if theirs[k] != ours[k]]
            raise StitchError(f"version {number} was made with another {', '.join(differ)} than this follower's "
                              f"config gives ({', '.join(f'{k}={theirs[k]!r}' for k in differ)})",
                              path=self.models_dir / str(number) / "manifest.json",
                              hint="run the follower with the primary's config.toml ([base], [stitch])")
        t0 = time.perf_counter()
        apply_manifest(self.stitcher, self.active, manifest, self.masks)
        bad = self.stitcher.nonfinite()
        if bad:
            raise StitchError(f"version {number}'s merged weights hold NaN/Inf in {bad!r} here", key=bad,
                              hint="the primary's smoke check passed them: check that both use the same base file")
        created = manifest.get("created")
        version = ModelVersion(number, {**self.passthrough, **self.stitcher.snapshot()}, shown,
                               **({"created": float(created)} if isinstance(created, (int, float)) else {}))
        self.metrics.follow_apply_seconds.observe(time.perf_counter() - t0)
        return version

    # --- what /healthz shows -------------------------------------------------------------------------------------

    def _lag_now(self) -> tuple[bool, float | None]:
        """(behind, lag): the last version's lag when ``current`` names the version served, else how long it has
        named another (growing); the lag gauge is set to it."""
        with self.lock:
            served = self.current.number if self.current is not None else None
            behind = self.pointer is not None and self.pointer != served
            lag = self.lag
            if behind and self._moved_at is not None:
                lag = max(0.0, time.time() - max(self._moved_at, self._started))
            if lag is not None:
                self.metrics.follow_lag.set(lag)
            return behind, lag

    def health(self) -> dict[str, Any]:
        """The served version, the one ``current`` names, and the lag: the last version's when caught up, else how
        long ``current`` has named a version this follower does not serve (it grows)."""
        with self.lock:
            served = self.current.number if self.current is not None else None
            behind, lag = self._lag_now()
            out: dict[str, Any] = {"ok": not behind, "version": served, "primary_version": self.pointer,
                                   "lag_seconds": None if lag is None else round(lag, 4)}
            if self.last_error:
                out["last_error"] = self.last_error
            return out
