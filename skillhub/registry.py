"""The registry: the only writer of the state folder, and the single source of truth on disk.

Layout of ``state_dir``::

    registry.sqlite3 (+ -wal, -shm)   SQLite, WAL, synchronous=FULL: skill versions and per-skill settings
    lock                              flock'ed for the owner's whole life; holds the owner's pid
    masks/<sha256>.mask.safetensors   content-addressed mask files (DESIGN §8)
    staging/                          staged checkpoints (written by intake; the registry only cleans debris)
    models/                           published versions (written by publish)

A skill version moves PENDING → READY (its mask file exists, named by its sha256) or FAILED (with a reason). The
ordering rule that makes crashes harmless (FAULTS C1, C2): the mask file is written (temp, fsync, rename, fsync dir)
*before* the row says READY, so a READY row never exists without its file; a file without a row is an orphan that
:meth:`Registry.gc` removes. New content for a known skill name becomes a new version; old versions stay for rollback.

This module owns those versions, the per-skill settings, and which files may go; :mod:`skillhub.statefiles` reads
and writes the content-addressed files, :mod:`skillhub.statedir` opens the folder (folders, lock, database) and
:mod:`skillhub.records` holds the values the registry returns; :mod:`skillhub.registryconn` holds the connection
(paths, lock, transactions, the read-only and files-only modes).
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skillhub import faultpoints
from skillhub.atomic import fsync_dir, sha256_file
from skillhub.errors import DiskFullError, RegistryError
from skillhub.records import RecoveryReport, SkillState, VersionRow
from skillhub.registryconn import DB_NAME, RegistryConnection
from skillhub.statefiles import MASK_SUFFIX, SHA_RE

if TYPE_CHECKING:  # tensors are imported where masks are read or written: listing skills needs no torch
    from skillhub.delta import SparseDelta

__all__ = ["DB_NAME", "MASK_SUFFIX", "MISSING_MASK_REASON", "STATUSES", "RecoveryReport", "Registry", "SkillState",
           "VersionRow", "canonical_json"]

STATUSES = ("PENDING", "READY", "FAILED")
MISSING_MASK_REASON = "mask file missing after a crash; drop the checkpoint again"


def canonical_json(obj: Mapping[str, Any]) -> str:
    """The one JSON spelling of a params/meta dict, so equal params compare equal as text in SQL."""
    try:
        return json.dumps(dict(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise RegistryError(f"not JSON-serialisable: {e}", hint="params and meta must be plain JSON values") from None


def _lenient(value: str) -> str:
    """Informational text (paths, reasons): keep it, escaping what UTF-8 cannot hold, rather than fail."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _skill_name(value: str) -> str:
    # Names come from dropped file names (FAULTS A11): anything goes except what SQLite cannot store (lone
    # surrogates from non-UTF-8 bytes); quotes, newlines and NULs are harmless because values are always bound.
    if not isinstance(value, str) or not value or _lenient(value) != value:
        raise RegistryError(f"skill name {ascii(value)} is empty or not valid UTF-8", key=ascii(value),
                            hint="rename the file, or set the skill name in its sidecar")
    return value


class Registry(RegistryConnection):
    """The state folder and its SQLite registry. Thread-safe; one writing process per folder (``flock``). The
    folder's content-addressed files are :class:`~skillhub.statefiles.StateFiles`'; the rows that name them are
    this class's.

    :param state_dir: the state folder; created if missing (unless ``readonly``).
    :param readonly: open the database read-only, without the lock, for inspection next to a running daemon.
    :raises StateLockedError: another live process holds the folder.
    :raises RegistryError: the folder is not writable, or the registry is missing (readonly) or corrupt.
    """

    def begin_version(self, skill: str, source_sha: str, strategy: str, params: Mapping[str, Any], *,
                      source_path: str | Path | None = None,
                      meta: Mapping[str, Any] | None = None) -> tuple[VersionRow, bool]:
        """``(row, created)``: the version with this (source_sha, strategy, params), whatever its skill name or status,
        or else a new PENDING one numbered past the skill's highest. A FAILED row is returned as is: see :meth:`retry`.
        """
        skill, canon = _skill_name(skill), canonical_json(params)
        with self._lock, self._tx() as db:
            row = db.execute("SELECT * FROM versions WHERE source_sha = ? AND strategy = ? AND params = ?",
                             (source_sha, strategy, canon)).fetchone()
            if row is not None:
                return VersionRow.from_sql(row), False
            (n,) = db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE skill = ?", (skill,)).fetchone()
            now = time.time()
            cur = db.execute(
                "INSERT INTO versions (skill, version, source_sha, strategy, params, status, source_path, meta, "
                "created, updated) VALUES (?, ?, ?, ?, ?, 'PENDING', ?, ?, ?, ?)",
                (skill, n, source_sha, strategy, canon, None if source_path is None else _lenient(str(source_path)),
                 canonical_json(meta or {}), now, now))
            return self._get(db, int(cur.lastrowid or 0)), True

    def find_by_source(self, source_sha: str) -> list[VersionRow]:
        """Every version made from the checkpoint with this sha256, oldest first."""
        with self._lock:
            rows = self._db().execute("SELECT * FROM versions WHERE source_sha = ? ORDER BY id", (source_sha,))
            return [VersionRow.from_sql(r) for r in rows]

    def store_mask(self, version_id: int, delta: SparseDelta) -> VersionRow:
        """Write the version's mask file (content-addressed), then mark the row READY in one transaction."""
        self.get(version_id)  # an unknown id fails before anything is written
        self._writable()
        tmp = self.masks_dir / f".incoming-{version_id}-{os.getpid()}-{os.urandom(4).hex()}.tmp"
        with self._lock:
            self._inflight.add(tmp.name)
        try:
            sha = delta.save(tmp, faultpoint="mask_write")  # the slow part runs outside the lock; gc() ignores temp names
            final = self.mask_path(sha)
            with self._lock:
                # Under the lock from here: gc() must never see the final file before the row references it.
                if final.is_file() and sha256_file(final) == sha:
                    tmp.unlink()
                else:
                    os.replace(tmp, final)
                    fsync_dir(self.masks_dir)
                faultpoints.reach("mask_renamed")
                with self._tx() as db:
                    cur = db.execute("UPDATE versions SET status = 'READY', mask_sha = ?, nnz = ?, reason = NULL, "
                                     "updated = ? WHERE id = ?", (sha, delta.nnz, time.time(), version_id))
                    if cur.rowcount != 1:
                        raise RegistryError(f"version id {version_id} was removed while its mask was written")
                    return self._get(db, version_id)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"disk full writing a mask file ({e.strerror or e}); the registry is unchanged",
                                    path=self.masks_dir, hint="free space on this file system; the drop is retried "
                                                              "by itself") from e
            raise RegistryError(f"cannot write the mask file ({e.strerror or e}); the registry is unchanged",
                                path=tmp, hint="check free disk space and permissions, then drop it again") from e
        finally:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._inflight.discard(tmp.name)

    def mark_failed(self, version_id: int, reason: str) -> VersionRow:
        """Mark a version FAILED with a reason the user can act on."""
        return self._update(version_id, "status = 'FAILED', reason = ?", _lenient(reason))

    def retry(self, version_id: int) -> VersionRow:
        """Move a FAILED version back to PENDING (same row and number), for an explicit re-drop or retry."""
        if self.get(version_id).status == "READY":
            raise RegistryError(f"version id {version_id} is READY; nothing to retry")
        return self._update(version_id, "status = 'PENDING', reason = NULL")

    def update_meta(self, version_id: int, meta: Mapping[str, Any]) -> VersionRow:
        """Merge ``meta`` into the version's metadata (keys in ``meta`` win)."""
        with self._lock:
            return self._update(version_id, "meta = ?", canonical_json({**self.get(version_id).meta, **meta}))

    def _update(self, version_id: int, assignments: str, *args: object) -> VersionRow:
        # ``assignments`` is fixed text from this class; values are bound.
        with self._lock, self._tx() as db:
            cur = db.execute(f"UPDATE versions SET {assignments}, updated = ? WHERE id = ?",
                             (*args, time.time(), version_id))
            if cur.rowcount != 1:
                raise RegistryError(f"no skill version with id {version_id}")
            return self._get(db, version_id)

    def get(self, version_id: int) -> VersionRow:
        """The version with this id; :class:`RegistryError` if there is none."""
        with self._lock:
            return self._get(self._db(), version_id)

    @staticmethod
    def _get(db: sqlite3.Connection, version_id: int) -> VersionRow:
        row = db.execute("SELECT * FROM versions WHERE id = ?", (version_id,)).fetchone()
        if row is None:
            raise RegistryError(f"no skill version with id {version_id}")
        return VersionRow.from_sql(row)

    def versions(self, skill: str | None = None, status: str | None = None) -> list[VersionRow]:
        """Versions, optionally of one skill and/or in one status, ordered by skill then version."""
        if status is not None and status not in STATUSES:
            raise RegistryError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        skill = None if skill is None else _skill_name(skill)
        # Only fixed clause text is joined here; every value goes in as a parameter.
        where = [c for c, v in (("skill = ?", skill), ("status = ?", status)) if v is not None]
        args = [v for v in (skill, status) if v is not None]
        sql = "SELECT * FROM versions" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY skill, version"
        with self._lock:
            return [VersionRow.from_sql(r) for r in self._db().execute(sql, args)]

    def skills(self) -> list[SkillState]:
        """Every known skill, by name."""
        with self._lock:
            rows = self.versions()
            settings = {r["skill"]: r for r in self._db().execute("SELECT * FROM settings")}
        by_skill: dict[str, list[VersionRow]] = {}
        for r in rows:
            by_skill.setdefault(r.skill, []).append(r)
        out = []
        for name in sorted(by_skill.keys() | settings.keys()):
            vs, s = by_skill.get(name, []), settings.get(name)
            ready = [v for v in vs if v.status == "READY"]
            out.append(SkillState(name, enabled=bool(s["enabled"]) if s else True, pinned=s["pinned"] if s else None,
                                  latest_ready=ready[-1] if ready else None, versions=vs))
        return out

    def skill(self, name: str) -> SkillState:
        """One skill's state; :class:`RegistryError` if the name is unknown."""
        for s in self.skills():
            if s.name == name:
                return s
        raise RegistryError(f"unknown skill {name!r}", key=name)

    def active_version(self, skill: str) -> VersionRow | None:
        """The version that should serve: the pinned one if READY, else the latest READY; ``None`` if none."""
        try:
            return self.skill(skill).active
        except RegistryError:
            return None

    def set_enabled(self, skill: str, enabled: bool) -> None:
        """Switch a known skill on or off (its versions are kept either way)."""
        with self._lock:
            self.skill(skill)
            self._setting(skill, "enabled", int(enabled))

    def set_pinned(self, skill: str, version: int | None) -> None:
        """Pin a skill to one READY version (rollback), or unpin it with ``None``."""
        with self._lock:
            state = self.skill(skill)
            if version is not None:
                row = next((v for v in state.versions if v.version == version), None)
                if row is None:
                    raise RegistryError(f"skill {skill!r} has no version {version}", key=skill)
                if row.status != "READY":
                    raise RegistryError(f"{row.ref!r} is {row.status}; only READY versions can be pinned", key=skill)
            self._setting(skill, "pinned", version)

    def _setting(self, skill: str, column: str, value: int | None) -> None:
        # ``column`` is fixed text from this class; values are bound.
        with self._tx() as db:
            db.execute(f"INSERT INTO settings (skill, {column}) VALUES (?, ?) "
                       f"ON CONFLICT (skill) DO UPDATE SET {column} = excluded.{column}", (skill, value))

    def remove_skill(self, skill: str) -> int:
        """Forget a skill: delete its versions and settings, then its now unreferenced mask files."""
        with self._lock:
            with self._tx() as db:
                db.execute("INSERT OR REPLACE INTO removed_masks (mask_sha, removed) SELECT DISTINCT mask_sha, ? "
                           "FROM versions WHERE skill = ? AND mask_sha IS NOT NULL", (time.time(), skill))
                gone = [VersionRow.from_sql(r) for r in db.execute("SELECT * FROM versions WHERE skill = ?", (skill,))]
                n = db.execute("DELETE FROM versions WHERE skill = ?", (skill,)).rowcount
                s = db.execute("DELETE FROM settings WHERE skill = ?", (skill,)).rowcount
                if n == 0 and s == 0:
                    raise RegistryError(f"unknown skill {skill!r}", key=skill)
            self.gc()
            self._drop_unused_files(gone)
            return n

    def _drop_unused_files(self, gone: list[VersionRow]) -> None:
        """After rows were deleted: remove their staged checkpoints, heads and examples that no remaining row uses."""
        rows = self.versions()
        staged = {r.source_path for r in rows if r.source_path}
        heads = {r.meta.get("head") for r in rows}
        examples = {r.meta.get("examples") for r in rows}
        for row in gone:
            if row.source_path and row.source_path not in staged:
                self.discard_staged(Path(row.source_path))
            head = row.meta.get("head")
            if isinstance(head, str) and head not in heads and SHA_RE.fullmatch(head):
                self.head_path(head).unlink(missing_ok=True)
            ex = row.meta.get("examples")
            if isinstance(ex, str) and ex not in examples and SHA_RE.fullmatch(ex):
                self.examples_path(ex).unlink(missing_ok=True)

    def gc(self) -> int:
        """Remove mask files that no version references; return how many."""
        with self._lock:
            return len(self._gc())

    def _gc(self) -> list[Path]:
        self._writable()
        referenced = {r[0] for r in self._db().execute("SELECT DISTINCT mask_sha FROM versions "
                                                       "WHERE mask_sha IS NOT NULL")}
        removed = []
        for sha, path in self._mask_files().items():
            if sha not in referenced:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def recover(self) -> RecoveryReport:
        """Make the folder consistent after a crash (the daemon runs this at start-up, before any other work).

        Removes temp debris in ``masks/`` and ``staging/``; marks READY rows whose mask file is gone FAILED; removes
        orphan mask files; reports PENDING rows, which the caller retries or fails.
        """
        with self._lock:
            self._writable()
            debris = self._remove_debris(self._inflight)
            failed = [self.mark_failed(r.id, MISSING_MASK_REASON) for r in self.versions(status="READY")
                      if r.mask_sha is None or not self.mask_path(r.mask_sha).is_file()]
            return RecoveryReport(removed_debris=debris, failed=failed, pending=self.versions(status="PENDING"),
                                  removed_orphans=self._set_orphans_aside())

    def _set_orphans_aside(self) -> list[Path]:
        """Move mask files no row references into ``orphans/`` rather than deleting them at start-up.

        A crash between a mask's rename and its commit leaves one such file (it is rebuilt when the drop comes back);
        many of them mean the database lost rows (say, its ``-wal`` file was deleted), and then these files are the
        only copy of those masks: keep them for ``skillhub doctor`` and a restore (FAULTS C2, C5).
        """
        referenced = {r[0] for r in self._db().execute("SELECT DISTINCT mask_sha FROM versions "
                                                       "WHERE mask_sha IS NOT NULL")}
        moved = []
        for sha, path in self._mask_files().items():
            if sha not in referenced:
                aside = self.state_dir / "orphans"
                aside.mkdir(exist_ok=True)
                os.replace(path, aside / path.name)
                moved.append(aside / path.name)
        return moved

    def unknown_masks(self, masks: set[str]) -> set[str]:
        """The masks in ``masks`` that no version row names and that were never removed on purpose: a published
        version using them means this registry lost recent changes (its ``-wal`` file was deleted, say)."""
        with self._lock:
            db = self._db()
            known = {r[0] for r in db.execute("SELECT mask_sha FROM versions WHERE mask_sha IS NOT NULL")}
            known |= {r[0] for r in db.execute("SELECT mask_sha FROM removed_masks")}
        return set(masks) - known

    def integrity_check(self) -> list[str]:
        """Problems found, as lines (empty = healthy): SQLite's integrity check, and every READY version's mask file
        is present and still hashes to its name."""
        with self._lock:
            problems = [r[0] for r in self._db().execute("PRAGMA integrity_check") if r[0] != "ok"]
            ready = self.versions(status="READY")
        for row in ready:  # hashing runs outside the lock: mask files are immutable
            path = self.mask_path(row.mask_sha) if row.mask_sha else None
            if path is None or not path.is_file():
                problems.append(f"{row.ref!r} (id {row.id}) is READY but its mask file {path} is missing")
            elif sha256_file(path) != row.mask_sha:
                problems.append(f"{row.ref!r} (id {row.id}): mask file {path} does not match its sha256")
        return problems

