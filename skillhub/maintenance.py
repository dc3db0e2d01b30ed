"""Operations on a state folder: ``skillhub doctor``, ``backup`` and ``restore``.

- **doctor** checks, without taking the lock (it is safe while the service runs): the registry's SQLite integrity,
  every READY skill's mask file present and matching its sha256, orphan mask files, the served version's manifest,
  free disk space, and who holds the lock; every finding comes with what to do.
- **backup** copies a consistent snapshot while the service runs: the registry through SQLite's online backup API
  (a transaction-consistent copy even with a writer active), then the mask and head files that snapshot references
  (they are immutable and content-addressed, so copying them afterwards is safe).
- **restore** puts a backup into a state folder that no process holds, refusing to overwrite an existing registry
  unless asked to.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from skillhub.atomic import sha256_file
from skillhub.errors import RegistryError
from skillhub.modelfolder import INDEX_NAME
from skillhub.registry import Registry

DB_NAME = "registry.sqlite3"
LOW_DISK_BYTES = 1 << 30


@dataclass
class Report:
    """What ``doctor`` found: ``problems`` need action, ``notes`` are informational."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


def lock_owner(state: Path) -> int | None:
    """The pid of the live process holding the state folder, or ``None`` (a dead owner's lock is released)."""
    try:
        fd = os.open(state / "lock", os.O_RDWR)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def doctor(state: Path) -> Report:
    """Check a state folder; never changes it."""
    report = Report()
    if not (state / DB_NAME).is_file():
        report.problems.append(f"no registry at {state / DB_NAME}: start `skillhub run` once, or restore a backup "
                               "with `skillhub restore BACKUP`")
        return report
    owner = lock_owner(state)
    report.notes.append(f"lock: held by pid {owner}" if owner else "lock: free (no service running)")
    try:
        with Registry(state, readonly=True) as reg:
            report.problems += [f"registry: {p} — restore the mask by dropping the skill's checkpoint again, or "
                                "restore a backup" for p in reg.integrity_check()]
            referenced = {r.mask_sha for r in reg.versions() if r.mask_sha}
            ready = len(reg.versions(status="READY"))
            failed = reg.versions(status="FAILED")
    except RegistryError as e:
        report.problems.append(f"{e} — stop the service, move {state / DB_NAME} aside and `skillhub restore` the "
                               "latest backup")
        return report
    report.notes.append(f"skills: {ready} READY versions, {len(failed)} FAILED")
    for row in failed[:10]:
        report.notes.append(f"  FAILED {row.ref!r}: {row.reason}")
    orphans = [p for p in (state / "masks").glob("*.mask.safetensors")
               if p.name.removesuffix(".mask.safetensors") not in referenced]
    if orphans:
        report.notes.append(f"{len(orphans)} orphan mask files (no registry row); the service moves them into "
                            "orphans/ at start")
    aside = sorted((state / "orphans").glob("*.mask.safetensors"))
    if aside:
        report.notes.append(f"orphans/ holds {len(aside)} mask files set aside at a start-up (no registry row named "
                            "them); if skills went missing, restore registry.sqlite3 from a backup, else delete them")
    current = state / "models" / "current"
    if current.exists():
        try:
            n = int(current.read_text().strip())
            json.loads((state / "models" / str(n) / "manifest.json").read_text())
            folder = state / "models" / str(n)  # one file, or (a model-folder base) shards and their index
            written = (folder / "model.safetensors").exists() or (folder / INDEX_NAME).exists()
            report.notes.append(f"served version {n}" + ("" if written else
                                                          " (weights file not written yet; rebuilt from the registry)"))
        except (OSError, ValueError):
            report.problems.append("models/current points to a missing or unreadable manifest — restart the service:"
                                   " it rebuilds the version from the registry")
    free = shutil.disk_usage(state).free
    (report.problems if free < LOW_DISK_BYTES else report.notes).append(
        f"free disk: {free / 2**30:.1f} GiB" + (" — free some space: drops and versions need room" if
                                                free < LOW_DISK_BYTES else ""))
    return report


def backup(state: Path, dest: Path) -> dict[str, int]:
    """Copy a consistent snapshot of ``state`` (registry, masks, heads, examples) into the new folder ``dest``."""
    if dest.exists() and any(dest.iterdir()):
        raise RegistryError("backup folder exists and is not empty", path=dest, hint="choose a new folder")
    if not (state / DB_NAME).is_file():
        raise RegistryError("no registry to back up", path=state)
    dest.mkdir(parents=True, exist_ok=True)
    src = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True)
    dst = sqlite3.connect(dest / DB_NAME)
    try:
        src.backup(dst)  # SQLite's online backup: consistent even while the service writes
        rows = dst.execute("SELECT mask_sha, meta FROM versions").fetchall()
    finally:
        src.close()
        dst.close()
    masks = {m for m, _ in rows if m}
    heads = {json.loads(meta).get("head") for _, meta in rows} - {None}
    examples = {json.loads(meta).get("examples") for _, meta in rows} - {None}
    copied = {"masks": 0, "heads": 0, "examples": 0}
    for kind, names, suffix in (("masks", masks, ".mask.safetensors"), ("heads", heads, ".safetensors"),
                                ("examples", examples, ".safetensors")):
        (dest / kind).mkdir(exist_ok=True)
        for sha in sorted(names):
            src_file = state / kind / f"{sha}{suffix}"
            if src_file.is_file():
                shutil.copyfile(src_file, dest / kind / src_file.name)
                copied[kind] += 1
    return copied


def restore(backup_dir: Path, state: Path, *, force: bool = False) -> dict[str, int]:
    """Put a backup into ``state``. Refuses while a process holds the folder, or over an existing registry
    unless ``force`` (the existing one is then kept as ``registry.sqlite3.before-restore``)."""
    if not (backup_dir / DB_NAME).is_file():
        raise RegistryError("not a skillhub backup (no registry.sqlite3)", path=backup_dir)
    owner = lock_owner(state) if state.exists() else None
    if owner:
        raise RegistryError(f"state folder is in use by pid {owner}", path=state, hint="stop the service first")
    state.mkdir(parents=True, exist_ok=True)
    if (state / DB_NAME).exists():
        if not force:
            raise RegistryError("a registry exists here", path=state / DB_NAME,
                                hint="pass --force to replace it (it is kept as registry.sqlite3.before-restore)")
        os.replace(state / DB_NAME, state / f"{DB_NAME}.before-restore")
        for side in ("-wal", "-shm"):
            (state / f"{DB_NAME}{side}").unlink(missing_ok=True)
    counts = {"masks": 0, "heads": 0, "examples": 0}
    for kind in counts:
        (state / kind).mkdir(exist_ok=True)
        for f in sorted((backup_dir / kind).glob("*.safetensors")) if (backup_dir / kind).is_dir() else []:
            name = f.name.split(".")[0]
            if sha256_file(f) != name:
                raise RegistryError(f"backup file does not match its hash: {f.name}", path=f)
            shutil.copyfile(f, state / kind / f.name)
            counts[kind] += 1
    shutil.copyfile(backup_dir / DB_NAME, state / DB_NAME)
    return counts
