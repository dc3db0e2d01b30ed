"""Intake: the only code that watches the inbox (DESIGN §3-§4; FAULTS A1-A12, B10, C4).

A drop is a regular file ``NAME.safetensors`` or a folder ``NAME/`` (``model.safetensors``, or shards named by one
``*.index.json``) directly in the inbox, with an optional TOML sidecar ``NAME.toml`` (``NAME/skill.toml``). Once a
drop has stopped changing it is copied to a private staging folder while it is hashed, its safetensors headers are
checked on the copy, and the copy is handed to the caller's ``on_arrival``. The source is then deleted, left pending
(:class:`RetryLater`), or moved to ``inbox/.rejected/`` beside a ``<name>.reason.txt`` saying why and what to do.

Arrival rule (DESIGN §4): a drop is ready once its signature (size, mtime, ctime, inode of every file, and of a
file's sidecar) has not changed for ``stable_seconds``, or for 0.1 s after a close-write or a rename inside the inbox
(watchdog reports a move in from another folder as a create, which takes the ``stable_seconds`` path). A staged copy
whose header promises more bytes than it has sends the drop back to pending; it is rejected as truncated only once it
has stayed so, unchanged, for max(5 × ``stable_seconds``, 5 s).

Threading: watchdog's handler only records names and wakes the worker; every filesystem operation runs in the one
worker thread, so a drop is never processed twice at once. Nothing in the inbox is memory-mapped (a truncation would
be SIGBUS), followed through a symlink, or opened in a way that can block (a FIFO).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
import struct
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import structlog
from watchdog.events import FileClosedEvent, FileClosedNoWriteEvent, FileOpenedEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from skillhub.checkpoint import MAX_HEADER_BYTES, fsync_dir, read_header
from skillhub.errors import CheckpointError, SkillhubError

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".incomplete", ".toml")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
SETTLE_SECONDS = 0.1  # quiet time after a close-write or move-in event
TICK_SECONDS = 0.25  # longest sleep of the worker while something is pending
HEALTH_SECONDS = 1.0  # how often the worker checks that the inbox is still there
MAX_SIDECAR_BYTES = 1 << 20
MAX_INDEX_BYTES = 64 << 20
GIB = 1 << 30
TODO = ("What to do: fix the problem above, then drop the corrected file or folder into the inbox again "
        "(nothing in .rejected/ is ever read); delete this file when done.")


@dataclass(frozen=True)
class Arrival:
    """A drop that has stopped changing and has been copied to staging, ready for the caller."""

    name: str  # the drop's name in the inbox (file or folder name), for messages
    stem: str  # NAME of NAME.safetensors / folder NAME/ (the default skill name)
    source: Path  # the path in the inbox (file or folder)
    staged: Path  # private copy: staging/<sha256>.safetensors, or a folder staging/<sha256>/ with the same layout
    sha256: str  # of the file; of a folder: sha256 over sorted "relative name\0file sha256\n" lines
    size: int  # bytes (of the checkpoint files only)
    sidecar: dict[str, Any] | None  # parsed NAME.toml (NAME/skill.toml), else None


class RetryLater(Exception):
    """``on_arrival`` raises this to leave the drop pending and try again later (after ``stable_seconds``)."""


class _Wait(Exception):
    """Keep the drop pending without complaint; look again at ``due``."""

    def __init__(self, due: float) -> None:
        self.due = due


class _Transient(Exception):
    """Keep the drop pending and log why (once); retry later."""


class _Changed(Exception):
    """The drop changed while it was being read (FAULTS A6): wait for it to be stable again."""


class _Truncated(Exception):
    """The staged copy's header describes more data than there is: the writer may not be done (FAULTS A1)."""


@dataclass
class _Entry:
    name: str
    kind: str = ""
    sig: object = None  # last observed signature of the drop (and its sidecar)
    since: float = 0.0  # monotonic time at which ``sig`` was first observed
    hinted: bool = False  # a close-write or move-in was the last event: a short settle suffices
    due: float = 0.0
    truncated: object = None  # signature at which the staged copy looked truncated
    error: str | None = None  # last transient error logged, so that each is logged once
    held: Arrival | None = None  # staged copy kept across RetryLater while the source is unchanged


def _show(text: str) -> str:
    """A name safe to log: control characters, escapes and undecodable bytes escaped (FAULTS A11)."""
    return text if text.isprintable() else text.encode("unicode_escape", "backslashreplace").decode("ascii")


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


def _sig(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _open_source(path: Path) -> int:
    """Open a file in the inbox for reading: never follows a final symlink, never blocks on a FIFO."""
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


def _copy_stream(src: int, out: Any, digest: Any, stop: threading.Event) -> int:
    """Copy the open file ``src`` into ``out`` while hashing it; abandon on ``stop``. Returns the bytes copied."""
    total = 0
    while block := os.read(src, 1 << 22):
        if stop.is_set():
            raise _Transient("stopping")
        digest.update(block)
        out.write(block)
        total += len(block)
    return total


def _read_small(path: Path, limit: int) -> bytes:
    fd = _open_source(path)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Changed()
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def _walk(root: Path) -> dict[str, os.stat_result]:
    """Everything under ``root`` by relative POSIX name, without following symlinks."""
    out: dict[str, os.stat_result] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            for de in it:
                r = f"{rel}/{de.name}" if rel else de.name
                out[r] = de.stat(follow_symlinks=False)
                if stat.S_ISDIR(out[r].st_mode):
                    stack.append(r)
    return out


def _truncation(path: Path) -> str | None:
    """Why the staged safetensors file looks cut short, or ``None`` if it does not (it may still be malformed)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _special(st: os.stat_result) -> str | None:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "is a symbolic link: only regular files and folders inside the inbox are read"
    for test, what in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {what}, not a regular file"
    return None


class _Handler(FileSystemEventHandler):
    """Runs in watchdog's thread: only records names and wakes the worker."""

    def __init__(self, intake: Intake) -> None:
        self._intake = intake

    def dispatch(self, event: Any) -> None:
        try:
            self._intake._on_event(event)
        except Exception:  # noqa: BLE001 - never raise into watchdog's thread
            pass


class Intake:
    """Watch ``inbox`` and hand each finished drop, copied to ``staging``, to ``on_arrival`` in one worker thread.

    ``on_arrival`` returning normally consumes the drop (the source is deleted); raising :class:`RetryLater` keeps
    it pending; raising a :class:`SkillhubError` (or anything else, logged as an internal error) rejects it into
    ``inbox/.rejected/``. The staged copy belongs to the caller once ``on_arrival`` has returned normally.
    """

    def __init__(self, inbox: Path, staging: Path, on_arrival: Callable[[Arrival], None], *,
                 stable_seconds: float = 1.0, rescan_seconds: float = 30.0, poll: bool = False,
                 shard_timeout_seconds: float = 600.0, max_bytes: int | None = None, logger: Any = None) -> None:
        self.inbox, self.staging = Path(inbox), Path(staging)
        self.on_arrival = on_arrival
        self.stable_seconds, self.rescan_seconds = stable_seconds, rescan_seconds
        self.poll, self.shard_timeout_seconds, self.max_bytes = poll, shard_timeout_seconds, max_bytes
        self.log = logger if logger is not None else structlog.get_logger("skillhub.intake")
        self._lock = threading.Lock()
        self._obs_lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._events: dict[str, bool | None] = {}  # name -> last hint (None: no hint), from watchdog's thread
        self._scan_requested, self._check_root, self._idle = True, False, False
        self._entries: dict[str, _Entry] = {}  # worker-only from here on
        self._dead: dict[str, object] = {}  # drops we could neither consume nor move away, by signature
        self._consumed: dict[str, None] = {}  # recently consumed stems, to explain late sidecars
        self._owned: dict[Path, int] = {}  # staged copies we made and have not handed over, with holders
        self._observer: Any = None
        self._watch_key: tuple[int, int] | None = None
        self._health = (False, "not started")
        self._worker: threading.Thread | None = None

    # ---- public API -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the observer (inotify, or polling if ``poll`` or inotify fails) and the worker; scan at once."""
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
            probe = self.staging / f".probe-{secrets.token_hex(4)}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise SkillhubError(f"staging folder is not writable ({e.strerror or e})", path=self.staging,
                                hint="fix its permissions or free space, or point the state folder elsewhere") from e
        self._check_inbox()
        self._worker = threading.Thread(target=self._run, name="skillhub-intake", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 10) -> None:
        """Stop the worker (abandoning a copy in flight, removing its temp) and the observer."""
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout)
        self._stop_observer()
        self._health = (False, "stopped")
        if self._worker is not None and self._worker.is_alive():
            self.log.warning("intake_stop_timeout", seconds=timeout)  # on_arrival is still running
            return
        for e in self._entries.values():
            self._drop_held(e)

    def rescan(self) -> None:
        """Request a full scan of the inbox now (thread-safe)."""
        with self._lock:
            self._scan_requested, self._idle = True, False
        self._wake.set()

    @property
    def health(self) -> tuple[bool, str]:
        return self._health

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued, pending or in progress (for tests); False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._idle:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    # ---- watching ---------------------------------------------------------------------------------------------
    def _on_event(self, event: Any) -> None:
        if isinstance(event, (FileOpenedEvent, FileClosedNoWriteEvent)) or event.event_type == "opened":
            return  # our own reads cause these
        root = os.fspath(self.inbox)
        hint = True if isinstance(event, FileClosedEvent) else (None if event.event_type == "deleted" else False)
        paths = [(os.fsdecode(event.src_path), hint)]
        if event.event_type == "moved":
            paths = [(paths[0][0], None), (os.fsdecode(event.dest_path), True)]
        with self._lock:
            for p, h in paths:
                if p == root and event.event_type in ("deleted", "moved"):
                    self._check_root = True
                elif os.path.dirname(p) == root:
                    name = os.path.basename(p)
                    if h is not None or name not in self._events:
                        self._events[name] = h
                else:
                    continue
                self._idle = False
        self._wake.set()

    def _check_inbox(self) -> None:
        """Keep ``health`` true to the inbox and (re)start the observer when it is (back) or has been replaced."""
        try:
            st = os.stat(self.inbox)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder")
            os.close(os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY))
        except OSError as e:
            lost = isinstance(e, (FileNotFoundError, NotADirectoryError))
            msg = f"inbox {'missing' if lost else 'unreadable (' + (e.strerror or str(e)) + ')'}: " \
                  f"{_show(str(self.inbox))}; retrying"
            if self._health != (False, msg):
                self.log.error("inbox_unavailable", problem=msg)
            self._stop_observer()
            self._health = (False, msg)
            return
        obs = self._observer
        alive = obs is not None and obs.is_alive() and all(em.is_alive() for em in obs.emitters)
        if alive and self._watch_key == (st.st_dev, st.st_ino):
            return
        self._stop_observer()
        if self._stop.is_set():
            return
        try:
            with self._obs_lock:
                self._observer = self._new_observer()
                self._watch_key = (st.st_dev, st.st_ino)
        except Exception as e:  # the folder went away between the stat and the watch
            self._health = (False, f"cannot watch the inbox {_show(str(self.inbox))} ({e}); retrying")
            return
        self._health = (True, f"watching {_show(str(self.inbox))}")
        self.log.info("inbox_watching", inbox=_show(str(self.inbox)), polling=isinstance(self._observer, PollingObserver))
        self.rescan()  # whatever arrived while we were blind

    def _new_observer(self) -> Any:
        """The one place that picks the watcher backend."""
        if not self.poll:
            obs = None
            try:
                obs = Observer()
                obs.schedule(_Handler(self), os.fspath(self.inbox), recursive=False)
                obs.start()
                return obs
            except Exception as e:  # inotify limits reached, or not supported here
                self.log.warning("inotify_unavailable", error=str(e), fallback="polling")
                if obs is not None:
                    with contextlib.suppress(Exception):
                        obs.stop()
        obs = PollingObserver(timeout=min(1.0, max(0.1, self.stable_seconds)))
        obs.schedule(_Handler(self), os.fspath(self.inbox), recursive=False)
        obs.start()
        return obs

    def _stop_observer(self) -> None:
        with self._obs_lock:
            obs, self._observer = self._observer, None
        if obs is not None:
            try:
                obs.stop()
                obs.join(5)
            except Exception as e:  # a dead watch may fail to close; we drop it anyway
                self.log.warning("observer_stop_failed", error=str(e))

    # ---- the worker -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_scan = next_health = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                with self._lock:
                    events, self._events = self._events, {}
                    scan, self._scan_requested = self._scan_requested, False
                    root, self._check_root = self._check_root, False
                if root or now >= next_health:
                    self._check_inbox()
                    next_health = now + min(HEALTH_SECONDS, self.rescan_seconds)
                if scan or now >= next_scan:
                    self._scan(now)
                    next_scan = now + self.rescan_seconds
                self._note(events, now)
                for name in sorted(n for n, e in self._entries.items() if e.due <= now):
                    if self._stop.is_set():
                        break
                    entry = self._entries[name]
                    try:
                        self._step(entry)
                    except Exception as e:  # a bug of ours: log it, keep the drop pending, keep going
                        self.log.error("intake_error", name=_show(name), error=repr(e), exc_info=True)
                        entry.due = time.monotonic() + max(self.stable_seconds, 5.0)
            except Exception as e:
                self.log.error("intake_error", error=repr(e), exc_info=True)
            with self._lock:
                self._idle = not (self._events or self._scan_requested or self._check_root or self._entries)
            now = time.monotonic()
            due = min((e.due for e in self._entries.values()), default=now + TICK_SECONDS)
            self._wake.wait(min(TICK_SECONDS, max(0.01, due - now), max(0.01, next_scan - now)))
            self._wake.clear()

    def _scan(self, now: float) -> None:
        try:
            names = os.listdir(self.inbox)
        except OSError:
            self._check_inbox()
            return
        for name in names:
            if not _ignored(name) and name not in self._entries:
                self._entries[name] = _Entry(name, due=now)

    def _note(self, events: dict[str, bool | None], now: float) -> None:
        for name, hint in events.items():
            if name.endswith(".toml") and not name.startswith("."):
                stem, ck = name[:-5], name[:-5] + ".safetensors"
                if ck in self._entries:
                    self._entries[ck].due = now  # a sidecar change makes its checkpoint unstable
                elif stem in self._consumed and os.path.lexists(self.inbox / name) and not os.path.lexists(self.inbox / ck):
                    del self._consumed[stem]
                    self.log.info("sidecar_left_alone", name=_show(name), why="its checkpoint was already consumed")
            if _ignored(name):
                continue
            e = self._entries.setdefault(name, _Entry(name))
            e.hinted = e.hinted if hint is None else hint
            e.due = now

    def _step(self, e: _Entry) -> None:
        """Look at one pending drop once: wait, stage and deliver it, reject it, or forget it."""
        now = time.monotonic()
        path = self.inbox / e.name
        try:
            st = os.lstat(path)
            if (why := _special(st)) is not None:
                raise CheckpointError(why, path=e.name, hint="copy the file itself into the inbox")
            e.kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
            if e.kind == "file" and e.name.lower().endswith(PICKLE_SUFFIXES):
                raise CheckpointError("pickle checkpoints are never opened on the watched path", path=e.name,
                                      hint="convert it with `skillhub convert` (weights only, in a subprocess) and "
                                           "drop the .safetensors file it writes")
            sig, tree = self._signature(path, st, e.kind)
            if self._dead.get(e.name) == sig:
                return self._forget(e)
            if sig != e.sig:
                self._drop_held(e)
                e.sig, e.since = sig, now
            trunc_quiet = max(5 * self.stable_seconds, 5.0)
            quiet = trunc_quiet if e.truncated == sig else SETTLE_SECONDS if e.hinted else self.stable_seconds
            if now - e.since < quiet:
                raise _Wait(now + min(TICK_SECONDS, e.since + quiet - now))
            if e.kind == "file" and not e.name.lower().endswith(".safetensors"):
                raise CheckpointError("not a safetensors checkpoint: name it NAME.safetensors", path=e.name,
                                      hint="or drop a folder NAME/ holding model.safetensors or shards and an index")
            if e.held is not None and not os.path.lexists(e.held.staged):
                self._drop_held(e)  # the caller took the staged copy away before asking us to retry
            arrival = e.held or self._prepare(e, path, st, tree, now)
        except _Wait as w:
            e.due = w.due
            return
        except FileNotFoundError:  # FAULTS A7: gone between the event and the open
            if not os.path.lexists(path):
                self.log.debug("drop_vanished", name=_show(e.name))
                self._dead.pop(e.name, None)
                return self._forget(e)
            e.sig, e.hinted, e.truncated, e.due = None, False, None, now + TICK_SECONDS  # a part of it went away
            return
        except _Changed:
            e.sig, e.hinted, e.truncated, e.due = None, False, None, now + TICK_SECONDS
            self.log.info("drop_changed_while_reading", name=_show(e.name))
            return
        except (_Transient, OSError) as x:
            msg = x.strerror if isinstance(x, OSError) and x.strerror else str(x)
            if msg != e.error and not self._stop.is_set():
                e.error = msg
                self.log.error("drop_waiting", name=_show(e.name), error=msg, retry_seconds=self.stable_seconds)
            e.due = now + max(self.stable_seconds, 0.05)
            return
        except _Truncated as t:
            if time.monotonic() - e.since >= max(5 * self.stable_seconds, 5.0):
                return self._reject(e, f"{_show(e.name)}: the file is truncated ({t}): the copy or download did not "
                                       "finish. Hint: drop the complete file again")
            e.truncated, e.hinted, e.due = e.sig, False, now + TICK_SECONDS
            self.log.info("drop_incomplete", name=_show(e.name), detail=str(t))
            return
        except CheckpointError as x:
            return self._reject(e, str(x))
        self._deliver(e, path, arrival)

    def _signature(self, path: Path, st: os.stat_result, kind: str) -> tuple[object, dict[str, os.stat_result]]:
        if kind == "dir":
            tree = _walk(path)
            return (_sig(st), tuple(sorted((r, _sig(s)) for r, s in tree.items()))), tree
        side = self.inbox / (path.name[:-12] + ".toml") if path.name.lower().endswith(".safetensors") else None
        try:
            sst = os.lstat(side) if side else None
        except FileNotFoundError:
            sst = None
        return (_sig(st), _sig(sst) if sst else None), {"": st}

    def _plan(self, e: _Entry, tree: dict[str, os.stat_result], now: float) -> list[str]:
        """The checkpoint files of a folder drop (index first); waits while shards are missing (FAULTS A3)."""
        top = [r for r in tree if "/" not in r and stat.S_ISREG(tree[r].st_mode)]
        indexes = sorted(r for r in top if r.endswith(".index.json"))
        waiting = None
        links = sorted(r for r in tree if "/" not in r and not stat.S_ISREG(tree[r].st_mode) and
                       (r.endswith((".safetensors", ".index.json")) or r == "skill.toml"))
        if links:
            raise CheckpointError(f"{links[0]} is not a regular file (a symlink?)", path=e.name,
                                  hint="copy the real files into the folder (cp -L), not links to them")
        if len(indexes) > 1:
            raise CheckpointError(f"several shard indexes: {', '.join(indexes)}", path=e.name, hint="keep one")
        if indexes:
            try:
                raw = _read_small(self.inbox / e.name / indexes[0], MAX_INDEX_BYTES)
                shards = set(json.loads(raw)["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                raise CheckpointError(f"unreadable shard index {indexes[0]}", path=e.name) from None
            for s in shards:
                if not isinstance(s, str) or not s or s.startswith("/") or ".." in PurePosixPath(s).parts:
                    raise CheckpointError(f"shard path {s!r} in {indexes[0]} leaves the folder", path=e.name,
                                          hint="shards must be plain file names inside the checkpoint folder")
            files = sorted({PurePosixPath(s).as_posix() for s in shards})
            bad = [s for s in files if s in tree and not stat.S_ISREG(tree[s].st_mode)]
            if bad:
                raise CheckpointError(f"shard {bad[0]!r} is not a regular file (a symlink?)", path=e.name)
            missing = [s for s in files if s not in tree]
            waiting = f"missing shards: {', '.join(missing)}" if missing else None
            files = [indexes[0], *files]
        elif "model.safetensors" in top or len(singles := [r for r in top if r.endswith(".safetensors")]) == 1:
            files = ["model.safetensors"] if "model.safetensors" in top else singles
        else:
            files, waiting = [], ("no model.safetensors or *.index.json in the folder" if not singles else
                                  "several .safetensors files but no *.index.json naming them")
        if waiting is None:
            return files
        if now - e.since < self.shard_timeout_seconds:
            raise _Wait(min(now + TICK_SECONDS, e.since + self.shard_timeout_seconds))
        raise CheckpointError(waiting, path=e.name, hint="copy every shard into a folder outside the inbox, then "
                                                         "move the whole folder in")

    def _prepare(self, e: _Entry, path: Path, st: os.stat_result, tree: dict[str, os.stat_result],
                 now: float) -> Arrival:
        """Check caps and space, read the sidecar, copy to staging while hashing, check the copy (A1, A6, B10)."""
        if e.kind == "dir":
            files, stem = self._plan(e, tree, now), e.name
            side = path / "skill.toml" if "skill.toml" in tree else None
        else:
            files, stem = [""], e.name[:-12]
            side = self.inbox / f"{stem}.toml"
        size = sum(tree[r].st_size for r in files)
        if self.max_bytes is not None and size > self.max_bytes:
            raise CheckpointError(f"larger than the cap of {self.max_bytes} bytes ({size} bytes)", path=e.name,
                                  hint="drop a finetune of the configured base model (same size as the base)")
        sidecar = self._read_sidecar(side, e) if side is not None else None
        self.staging.mkdir(parents=True, exist_ok=True)
        usage = shutil.disk_usage(self.staging)
        margin = min(GIB, usage.total // 10)
        if usage.free < size + margin:
            raise _Transient(f"not enough free space in {_show(str(self.staging))}: need {size} bytes plus a "
                             f"{margin}-byte margin")  # no free count: the message must not change, to log once
        tmp = self.staging / f".incoming-{secrets.token_hex(8)}.tmp"
        try:
            if e.kind == "dir":
                tmp.mkdir()
                lines = []
                for r in files:
                    (tmp / r).parent.mkdir(parents=True, exist_ok=True)
                    lines.append(f"{r}\0{self._copy_one(path / r, tree[r], tmp / r)}\n")
                sha = hashlib.sha256("".join(sorted(lines)).encode("utf-8", "surrogateescape")).hexdigest()
                for d in {(tmp / r).parent for r in files}:
                    fsync_dir(d)
            else:
                sha = self._copy_one(path, st, tmp)
            if self._signature(path, os.lstat(path), e.kind)[0] != e.sig:
                raise _Changed()  # FAULTS A6: rewritten while we copied
            for r in files:
                if r.endswith(".index.json"):
                    continue
                staged = tmp / r if r else tmp
                try:
                    read_header(staged)
                except CheckpointError as x:
                    if (why := _truncation(staged)) is not None:
                        raise _Truncated(f"{r}: {why}" if r else why) from None
                    raise CheckpointError(x.message, path=f"{e.name}/{r}" if r else e.name, hint=x.hint) from None
            final = self.staging / (sha if e.kind == "dir" else f"{sha}.safetensors")
            if os.path.lexists(final):
                _remove(tmp)  # same content already staged (FAULTS A4); never ours to delete unless we made it
                if final in self._owned:
                    self._owned[final] += 1
            else:
                os.rename(tmp, final)
                fsync_dir(self.staging)
                self._owned[final] = 1
        except BaseException:
            _remove(tmp)
            raise
        self.log.info("drop_staged", name=_show(e.name), sha256=sha, size=size)
        return Arrival(e.name, stem, path, final, sha, size, sidecar)

    def _copy_one(self, src: Path, expect: os.stat_result, dst: Path) -> str:
        try:
            fd = _open_source(src)
        except OSError as x:
            if x.errno in (errno.ELOOP, errno.ENXIO):
                raise _Changed() from None  # it became a symlink or a FIFO since we looked
            raise
        try:
            got = os.fstat(fd)
            if not stat.S_ISREG(got.st_mode) or (got.st_ino, got.st_dev) != (expect.st_ino, expect.st_dev):
                raise _Changed()
            digest = hashlib.sha256()
            try:
                with open(dst, "xb") as out:
                    _copy_stream(fd, out, digest, self._stop)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as x:
                raise _Transient(f"copy to staging failed: {x.strerror or x}") from x
        finally:
            os.close(fd)
        return digest.hexdigest()

    def _read_sidecar(self, side: Path, e: _Entry) -> dict[str, Any] | None:
        label = side.name if e.kind == "file" else f"{e.name}/{side.name}"
        try:
            st = os.lstat(side)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SIDECAR_BYTES:
            raise CheckpointError(f"sidecar {_show(label)} is not a regular file under 1 MiB", path=e.name)
        try:
            return tomllib.loads(_read_small(side, MAX_SIDECAR_BYTES).decode("utf-8"))
        except UnicodeDecodeError:
            raise CheckpointError(f"sidecar {_show(label)} is not UTF-8 text", path=e.name) from None
        except tomllib.TOMLDecodeError as x:
            raise CheckpointError(f"sidecar {_show(label)} is not valid TOML: {x}", path=e.name,
                                  hint="fix the TOML at that line and drop the sidecar again") from None

    # ---- outcomes ---------------------------------------------------------------------------------------------
    def _deliver(self, e: _Entry, path: Path, arrival: Arrival) -> None:
        try:
            self.on_arrival(arrival)
        except RetryLater:
            e.held, e.due = arrival, time.monotonic() + self.stable_seconds
            self.log.info("drop_retry_later", name=_show(e.name), retry_seconds=self.stable_seconds)
            return
        except SkillhubError as x:
            self._drop_held(e, arrival)
            return self._reject(e, str(x), check=True)
        except Exception as x:
            self.log.error("on_arrival_failed", name=_show(e.name), error=repr(x), exc_info=True)
            self._drop_held(e, arrival)
            return self._reject(e, f"internal error: {type(x).__name__}: {x}", check=True)
        e.held = None
        self._owned.pop(arrival.staged, None)  # the caller owns the staged copy now
        if not self._unchanged(e, path):
            e.sig = None  # replaced while the caller worked: the new content is a new drop
            return
        try:
            if e.kind == "dir":
                shutil.rmtree(path)
            else:
                path.unlink()
                (self.inbox / f"{arrival.stem}.toml").unlink(missing_ok=True)
        except OSError as x:
            self.log.error("drop_not_removed", name=_show(e.name), error=x.strerror or str(x))
            self._dead[e.name] = e.sig
        self._consumed[arrival.stem] = None
        while len(self._consumed) > 1000:
            del self._consumed[next(iter(self._consumed))]
        self.log.info("drop_consumed", name=_show(e.name), sha256=arrival.sha256)
        self._forget(e)

    def _unchanged(self, e: _Entry, path: Path) -> bool:
        try:
            return self._signature(path, os.lstat(path), e.kind)[0] == e.sig
        except OSError:
            return False

    def _reject(self, e: _Entry, reason: str, *, check: bool = False) -> None:
        """Move the drop (and a file's sidecar) to ``inbox/.rejected/`` with ``<name>.reason.txt``."""
        path, rejected = self.inbox / e.name, self.inbox / ".rejected"
        if check and not self._unchanged(e, path):
            e.sig = None
            return
        moves = [(path, rejected / e.name)]
        if e.kind == "file" and e.name.lower().endswith(".safetensors"):
            side = self.inbox / f"{e.name[:-12]}.toml"
            if os.path.lexists(side):
                moves.append((side, rejected / side.name))
        try:
            rejected.mkdir(exist_ok=True)
            for src, dst in moves:
                if os.path.lexists(dst):
                    _remove(dst)
                os.rename(src, dst)
            raw = os.fsencode(e.name)
            rname = raw if len(raw) <= 240 else raw[:200] + b"-" + hashlib.sha256(raw).hexdigest()[:12].encode()
            note = rejected / os.fsdecode(rname + b".reason.txt")
            tmp = rejected / f".{secrets.token_hex(8)}.tmp"
            tmp.write_text(f"{reason}\n{TODO}\n", encoding="utf-8", errors="backslashreplace")
            os.replace(tmp, note)
        except FileNotFoundError:
            self.log.debug("drop_vanished", name=_show(e.name))
        except OSError as x:
            self.log.error("reject_failed", name=_show(e.name), error=x.strerror or str(x), reason=reason)
            self._dead[e.name] = e.sig
        else:
            self.log.warning("drop_rejected", name=_show(e.name), reason=reason)
        self._forget(e)

    def _drop_held(self, e: _Entry, arrival: Arrival | None = None) -> None:
        """Release a staged copy we made and did not hand over; delete it when nobody else holds it."""
        arrival, e.held = arrival or e.held, None
        if arrival is not None and arrival.staged in self._owned:
            self._owned[arrival.staged] -= 1
            if self._owned[arrival.staged] <= 0:
                del self._owned[arrival.staged]
                _remove(arrival.staged)

    def _forget(self, e: _Entry) -> None:
        self._drop_held(e)
        self._entries.pop(e.name, None)
