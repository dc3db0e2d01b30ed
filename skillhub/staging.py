"""Staging: reading a drop out of the inbox into a private, checked copy (DESIGN §4; FAULTS A1, A3, A4, A6, A7, B10).

Owns every read of a drop's files: its signature (what the arrival rule in :mod:`skillhub.intake` watches), which
files a folder drop is made of, its TOML sidecar, and the copy to the staging folder made by :class:`Stager` while
hashing. The safetensors headers are checked on the copy, never on the source; a copy whose header promises more
bytes than it has raises :class:`Truncated` (the writer may not be done). :class:`Stager` also counts who holds each
copy it made until the copy is handed over to the caller or released.

Nothing in the inbox is memory-mapped (a truncation would be SIGBUS), followed through a symlink, or opened in a way
that can block (a FIFO). Drop names may hold anything (FAULTS A11): :func:`show_name` makes them safe to log.

A file drop nobody else holds open is moved, not copied (:mod:`skillhub.taking`): its header is checked under the
write lease that proves it, and it is hashed where it then lies, its own. Otherwise the copy reads each byte of the
drop once: a reflink clone where the file system has them (FICLONE: no data moves),
else ``copy_file_range`` (the kernel copies page cache to page cache), else ``read``/``write``; the sha256 is taken
of the staged copy (our own file, which nobody else can truncate) in a second thread while the next chunk is copied.
Staged copies are not fsynced (see :meth:`Stager.check_after_reboot` for why that is safe).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import struct
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from skillhub.atomic import fsync_dir
from skillhub.copying import Changed, Transient, _copy_stream, _walk, hash_file, staged_sha256, stat_sig
from skillhub.errors import CheckpointError, SkillhubError, printable
from skillhub.header import MAX_HEADER_BYTES, read_header
from skillhub.taking import give_back, take

MAX_SIDECAR_BYTES = 1 << 20
MAX_INDEX_BYTES = 64 << 20
GIB = 1 << 30
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # changes at every boot (Linux)
BOOT_MARK = ".boot-id"  # in the staging folder: the boot in which its copies were last known good
_STAGED_NAME = re.compile(r"[0-9a-f]{64}(\.safetensors)?")


class Truncated(Exception):
    """The staged copy's header describes more data than there is: the writer may not be done (FAULTS A1)."""


show_name = printable  # the intake's name for it


def _open_source(path: Path) -> int:
    """Open a file in the inbox for reading: never follows a final symlink, never blocks on a FIFO."""
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


def _open_drop(path: Path) -> int:
    """:func:`_open_source` for a drop's checkpoint file, which was a regular file when looked at.

    :raises Changed: it became a symlink or a FIFO since.
    """
    try:
        return _open_source(path)
    except OSError as x:
        if x.errno in (errno.ELOOP, errno.ENXIO):
            raise Changed() from None
        raise


def _read_small(path: Path, limit: int) -> bytes:
    fd = _open_source(path)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Changed()
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def drop_signature(inbox: Path, path: Path, st: os.stat_result,
                   kind: str) -> tuple[object, dict[str, os.stat_result]]:
    """``(signature, tree)`` of the drop at ``path`` (``st`` is its lstat, ``kind`` is "dir" or "file").

    The signature covers mode, size, mtime, ctime and inode of every file under a folder, or of a file and its
    sidecar ``NAME.toml`` in ``inbox``; ``tree`` holds the lstat of everything under a folder by relative name
    (``{"": st}`` for a file).
    """
    if kind == "dir":
        tree = _walk(path)
        return (stat_sig(st), tuple(sorted((r, stat_sig(s)) for r, s in tree.items()))), tree
    side = inbox / (path.name[:-12] + ".toml") if path.name.lower().endswith(".safetensors") else None
    try:
        sst = os.lstat(side) if side else None
    except FileNotFoundError:
        sst = None
    return (stat_sig(st), stat_sig(sst) if sst else None), {"": st}


def remove_path(path: Path) -> None:
    """Delete a file, a symlink or a whole folder; whatever is already gone is no error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _truncation(path: Path, fd: int | None = None) -> str | None:
    """Why the staged safetensors file (or the open file ``fd``) looks cut short, or ``None`` if it does not (it may
    still be malformed)."""
    with open(path, "rb") if fd is None else os.fdopen(os.dup(fd), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        head = f.read(8)
        if len(head) < 8:
            return f"only {size} bytes"
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            return None
        if 8 + n > size:
            return f"the header needs {8 + n} bytes but the file has {size}"
        try:
            obj = json.loads(f.read(n))
        except (ValueError, RecursionError):
            return None
    ends = [e["data_offsets"][1] for e in obj.values() if isinstance(e, dict) and isinstance(e.get("data_offsets"), list)
            and len(e["data_offsets"]) == 2 and isinstance(e["data_offsets"][1], int)] if isinstance(obj, dict) else []
    need = 8 + n + max(ends, default=0)
    return f"the header describes {need} bytes but the file has {size}" if need > size else None


def folder_plan(folder: Path, name: str, tree: dict[str, os.stat_result]) -> tuple[list[str], str | None]:
    """``(files, waiting)`` for the folder drop ``name`` at ``folder``: its checkpoint files (index first), and
    what it still lacks (missing shards, no checkpoint file yet), or ``None`` when it is complete (FAULTS A3).

    :raises CheckpointError: the folder can never make a checkpoint (links, several indexes, a bad index).
    """
    top = [r for r in tree if "/" not in r and stat.S_ISREG(tree[r].st_mode)]
    indexes = sorted(r for r in top if r.endswith(".index.json"))
    waiting = None
    links = sorted(r for r in tree if "/" not in r and not stat.S_ISREG(tree[r].st_mode) and
                   (r.endswith((".safetensors", ".index.json")) or r == "skill.toml"))
    if links:
        raise CheckpointError(f"{links[0]} is not a regular file (a symlink?)", path=name,
                              hint="copy the real files into the folder (cp -L), not links to them")
    if len(indexes) > 1:
        raise CheckpointError(f"several shard indexes: {', '.join(indexes)}", path=name, hint="keep one")
    if indexes:
        try:
            raw = _read_small(folder / indexes[0], MAX_INDEX_BYTES)
            shards = set(json.loads(raw)["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise CheckpointError(f"unreadable shard index {indexes[0]}", path=name) from None
        for s in shards:
            if not isinstance(s, str) or not s or s.startswith("/") or ".." in PurePosixPath(s).parts:
                raise CheckpointError(f"shard path {s!r} in {indexes[0]} leaves the folder", path=name,
                                      hint="shards must be plain file names inside the checkpoint folder")
        files = sorted({PurePosixPath(s).as_posix() for s in shards})
        bad = [s for s in files if s in tree and not stat.S_ISREG(tree[s].st_mode)]
        if bad:
            raise CheckpointError(f"shard {bad[0]!r} is not a regular file (a symlink?)", path=name)
        missing = [s for s in files if s not in tree]
        waiting = f"missing shards: {', '.join(missing)}" if missing else None
        files = [indexes[0], *files]
    elif "model.safetensors" in top or len(singles := [r for r in top if r.endswith(".safetensors")]) == 1:
        files = ["model.safetensors"] if "model.safetensors" in top else singles
    else:
        files, waiting = [], ("no model.safetensors or *.index.json in the folder" if not singles else
                              "several .safetensors files but no *.index.json naming them")
    return (files + example_files(tree) if files else files), waiting


#: a folder drop's few-shot examples (README "Service"): copied with the model, never read as part of it
EXAMPLES_FILE, EXAMPLES_DIR, EXAMPLE_SUFFIXES = "examples.safetensors", "examples", (".png", ".jpg", ".jpeg")


def example_files(tree: dict[str, os.stat_result]) -> list[str]:
    """The few-shot example files of a folder drop: ``examples.safetensors`` and ``examples/<class>/*.png|jpg``
    (regular files only; links and anything else are left behind)."""
    out = [EXAMPLES_FILE] if EXAMPLES_FILE in tree and stat.S_ISREG(tree[EXAMPLES_FILE].st_mode) else []
    for r, st in sorted(tree.items()):
        parts = PurePosixPath(r).parts
        if (len(parts) == 3 and parts[0] == EXAMPLES_DIR and stat.S_ISREG(st.st_mode)
                and r.lower().endswith(EXAMPLE_SUFFIXES) and not any(p.startswith(".") for p in parts)):
            out.append(r)
    return out


def read_sidecar(side: Path, name: str, kind: str) -> dict[str, Any] | None:
    """The parsed TOML sidecar ``side`` of the drop ``name`` (``kind`` "dir" or "file"); ``None`` if it is absent."""
    label = side.name if kind == "file" else f"{name}/{side.name}"
    try:
        st = os.lstat(side)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SIDECAR_BYTES:
        raise CheckpointError(f"sidecar {show_name(label)} is not a regular file under 1 MiB", path=name)
    try:
        return tomllib.loads(_read_small(side, MAX_SIDECAR_BYTES).decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"sidecar {show_name(label)} is not UTF-8 text", path=name) from None
    except tomllib.TOMLDecodeError as x:
        raise CheckpointError(f"sidecar {show_name(label)} is not valid TOML: {x}", path=name,
                              hint="fix the TOML at that line and drop the sidecar again") from None


def _boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


class Stager:
    """Copies drops from ``inbox`` into the private ``staging`` folder, and keeps count of the copies it made.

    A copy is named by its content: ``staging/<sha256>.safetensors``, or a folder ``staging/<sha256>/`` with the
    drop's layout. Only the intake's worker thread calls this; ``stop`` abandons a copy in flight.
    """

    def __init__(self, inbox: Path, staging: Path, stop: threading.Event) -> None:
        self.inbox, self.staging, self._stop = inbox, staging, stop
        self._owned: dict[Path, int] = {}  # staged copies we made and have not handed over, with holders
        # Without a boot id nothing tells a copy that may have been lost in a crash from a good one: fsync then.
        self.fsync = _boot_id() is None

    def check_writable(self) -> None:
        """Create the staging folder and prove it writable by writing to it.

        :raises SkillhubError: it is not.
        """
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
            probe = self.staging / f".probe-{secrets.token_hex(4)}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise SkillhubError(f"staging folder is not writable ({e.strerror or e})", path=self.staging,
                                hint="fix its permissions or free space, or point the state folder elsewhere") from e

    def check_after_reboot(self, log: Callable[..., None] | None = None) -> list[Path]:
        """After the machine restarted, hash every staged copy again and delete those whose bytes no longer match
        their name (returned). On any other start this reads one small file.

        Why staged copies are not fsynced: a drop leaves the inbox (or ``.taken/``, where a moved drop waits) only
        once its mask is durable in the registry;
        the staged copy then only serves a later re-localization (a config edit) and the "same bytes already
        staged" shortcut. Within one boot every process reads it from the page cache exactly as written, whatever
        became of the daemon; only a crash of the machine can lose unwritten pages (a short, zero-filled or absent
        file). A boot id in ``staging/.boot-id`` other than the kernel's says that may have happened, and then every
        copy is verified before anything uses it. Without boot ids (not Linux), copies are fsynced as before.
        """
        boot = _boot_id()
        if boot is None:
            return []
        mark = self.staging / BOOT_MARK
        try:
            seen: str | None = mark.read_text().strip()
        except (OSError, UnicodeDecodeError):
            seen = None  # first start here, or unreadable: verify
        if seen == boot:
            return []
        bad = []
        for entry in sorted(self.staging.iterdir()):
            if not _STAGED_NAME.fullmatch(entry.name):
                continue
            try:
                good = staged_sha256(entry) == entry.name.removesuffix(".safetensors")
            except (OSError, Changed):
                good = False
            if not good:
                remove_path(entry)
                bad.append(entry)
                if log is not None:
                    log("staged_copy_lost", path=show_name(str(entry)),
                        why="unwritten when the machine stopped; re-localizing this skill needs the drop again")
        tmp = self.staging / f".boot-id-{secrets.token_hex(4)}.tmp"
        tmp.write_text(boot + "\n")
        os.replace(tmp, mark)  # not fsynced: if it is lost, the next start only verifies again
        return bad

    def stage(self, name: str, kind: str, path: Path, st: os.stat_result, tree: dict[str, os.stat_result],
              files: list[str], size: int, sig: object) -> tuple[Path, str, Path | None]:
        """Stage the drop ``name`` (at ``path``, with signature ``sig``) and check it; return ``(staged, sha256,
        taken)``. A file drop nobody else can write is moved, not copied (:func:`skillhub.taking.take`): ``taken``
        is then its place in ``staging/.taken/`` until it is consumed; else ``taken`` is ``None`` and the drop is
        copied while hashed. ``files`` are its checkpoint files (``[""]`` for a file drop), ``size`` their bytes. The
        sha256 of a folder is over sorted "relative name\\0file sha256\\n" lines.

        :raises Transient: not enough free space, the copy failed, or stopping.
        :raises Changed: the drop changed while it was read (FAULTS A6).
        :raises Truncated: a copied file's header describes more data than it has (FAULTS A1).
        :raises CheckpointError: a copied file is not a valid safetensors file (FAULTS B10).
        """
        self.staging.mkdir(parents=True, exist_ok=True)
        if kind == "file" and (taken := take(path, st, self.staging, lambda fd: self._check(name, "", path, fd),
                                             opener=_open_drop, fsync=self.fsync)) is not None:
            try:
                return (*self._name_by_content(taken, kind, hash_file(taken, self._stop), link=True), taken)
            except BaseException:
                with contextlib.suppress(OSError):  # else it stays taken and goes back at the next start
                    give_back(taken, path)
                raise
        usage = shutil.disk_usage(self.staging)
        margin = min(GIB, usage.total // 10)
        if usage.free < size + margin:
            raise Transient(f"not enough free space in {show_name(str(self.staging))}: need {size} bytes plus a "
                            f"{margin}-byte margin")  # no free count: the message must not change, to log once
        tmp = self.staging / f".incoming-{secrets.token_hex(8)}.tmp"
        try:
            if kind == "dir":
                tmp.mkdir()
                lines = []
                for r in files:
                    (tmp / r).parent.mkdir(parents=True, exist_ok=True)
                    lines.append(f"{r}\0{self._copy_one(path / r, tree[r], tmp / r)}\n")
                sha = hashlib.sha256("".join(sorted(lines)).encode("utf-8", "surrogateescape")).hexdigest()
                for d in {(tmp / r).parent for r in files} if self.fsync else ():
                    fsync_dir(d)
            else:
                sha = self._copy_one(path, st, tmp)
            if drop_signature(self.inbox, path, os.lstat(path), kind)[0] != sig:
                raise Changed()  # FAULTS A6: rewritten while we copied
            for r in files:
                self._check(name, r, tmp / r if r else tmp)
            return (*self._name_by_content(tmp, kind, sha, link=False), None)
        except BaseException:
            remove_path(tmp)
            raise

    @staticmethod
    def _check(name: str, r: str, staged: Path, fd: int | None = None) -> None:
        """Check the header of the checkpoint file ``r`` of drop ``name``, at ``staged`` (or open as ``fd``)."""
        if r.endswith(".index.json") or r.startswith(EXAMPLES_DIR + "/"):
            return  # an index is JSON, example images are images: the family reads those
        try:
            read_header(staged, fd=fd)
        except CheckpointError as x:
            if (why := _truncation(staged, fd)) is not None:
                raise Truncated(f"{r}: {why}" if r else why) from None
            raise CheckpointError(x.message, path=f"{name}/{r}" if r else name, hint=x.hint) from None

    def _name_by_content(self, src: Path, kind: str, sha: str, *, link: bool) -> tuple[Path, str]:
        """Give the checked staged file or folder ``src`` its content name (hard-linked when ``link``, else moved);
        a copy already there under that name is kept instead (FAULTS A4)."""
        final = self.staging / (sha if kind == "dir" else f"{sha}.safetensors")
        if os.path.lexists(final):
            if not link:
                remove_path(src)  # same content already staged; never ours to delete unless we made it
            if final in self._owned:
                self._owned[final] += 1
        else:
            (os.link if link else os.rename)(src, final)
            if self.fsync:
                fsync_dir(self.staging)
            self._owned[final] = 1
        return final, sha

    def _copy_one(self, src: Path, expect: os.stat_result, dst: Path) -> str:
        fd = _open_drop(src)
        try:
            got = os.fstat(fd)
            if not stat.S_ISREG(got.st_mode) or (got.st_ino, got.st_dev) != (expect.st_ino, expect.st_dev):
                raise Changed()
            try:
                out = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                try:
                    digest = _copy_stream(fd, out, self._stop)
                    if self.fsync:
                        os.fsync(out)
                finally:
                    os.close(out)
            except OSError as x:
                raise Transient(f"copy to staging failed: {x.strerror or x}") from x
        finally:
            os.close(fd)
        return digest

    def hand_over(self, staged: Path) -> None:
        """The caller owns the staged copy now: never delete it."""
        self._owned.pop(staged, None)

    def release(self, staged: Path) -> None:
        """Drop one hold on a copy we made and did not hand over; delete it when nobody else holds it."""
        if staged in self._owned:
            self._owned[staged] -= 1
            if self._owned[staged] <= 0:
                del self._owned[staged]
                remove_path(staged)
