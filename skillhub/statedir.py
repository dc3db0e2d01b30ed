"""Opening a state folder (FAULTS C5, C6): its folders, the owner's lock, and its SQLite database.

Owns what :class:`~skillhub.registry.Registry` does before it reads or writes anything: create the folders and prove
them writable by writing to them, take the ``flock`` that makes one process the folder's only writer, and open
``registry.sqlite3`` only if it is really ours: an SQLite file of our schema version that passes ``quick_check``, in
WAL mode with ``synchronous=FULL``. A missing database next to existing mask files is refused rather than recreated
(every mask would become an orphan). Also owns :func:`transaction`, the one way the registry writes.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from skillhub.errors import RegistryCorruptError, RegistryError, StateLockedError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_CORRUPT_HINT = ("it was left untouched; run `skillhub doctor`, or restore registry.sqlite3 (with its -wal file) "
                 "from a backup")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS versions (id INTEGER PRIMARY KEY AUTOINCREMENT, skill TEXT NOT NULL, "
    "version INTEGER NOT NULL, source_sha TEXT NOT NULL, strategy TEXT NOT NULL, params TEXT NOT NULL, "
    "status TEXT NOT NULL CHECK (status IN ('PENDING', 'READY', 'FAILED')), reason TEXT, mask_sha TEXT, nnz INTEGER, "
    "source_path TEXT, meta TEXT NOT NULL DEFAULT '{}', created REAL, updated REAL, "
    "UNIQUE (skill, version), UNIQUE (source_sha, strategy, params))",
    "CREATE TABLE IF NOT EXISTS settings (skill TEXT PRIMARY KEY, enabled INTEGER NOT NULL DEFAULT 1, pinned INTEGER)",
    "CREATE INDEX IF NOT EXISTS versions_status ON versions (status)",
    # Masks of removed skills: lets start-up tell "removed on purpose" from "the registry lost rows" (FAULTS C5).
    "CREATE TABLE IF NOT EXISTS removed_masks (mask_sha TEXT PRIMARY KEY, removed REAL NOT NULL)",
)


def prepare_folders(folders: Iterable[Path]) -> None:
    """Create each folder (with its parents) and prove it writable.

    :raises RegistryError: a folder cannot be created or written to.
    """
    for d in folders:
        try:
            d.mkdir(parents=True, exist_ok=True)
            # os.access() lies for root and on some mounts: the only honest test is to write.
            (probe := d / f".write-probe-{os.getpid()}.tmp").write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise RegistryError(f"state folder is not writable ({e.strerror or e})", path=d,
                                hint="fix its owner or permissions, or point --state at a writable folder") from None


def take_lock(state_dir: Path) -> int:
    """Lock ``state_dir/lock`` for this process and write our pid into it; return its descriptor (closing it
    releases the lock).

    :raises StateLockedError: another live process holds the lock.
    :raises RegistryError: the lock file cannot be opened or locked.
    """
    # flock, not a pid file: the OS releases it when the owner dies, however it dies (FAULTS C6).
    path, fd = state_dir / "lock", -1
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise StateLockedError(state_dir, int(text) if text.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        return fd
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        if isinstance(e, OSError):
            raise RegistryError(f"cannot lock the state folder ({e.strerror or e})", path=path) from None
        raise


def open_database(db_path: Path, *, readonly: bool, count_masks: Callable[[], int]) -> sqlite3.Connection:
    """Open the registry database at ``db_path``, creating it and its schema unless ``readonly``.

    :param count_masks: how many mask files the state folder holds; asked only when the database is missing.
    :raises RegistryError: the file is not SQLite or is corrupt, is missing (``readonly``, or next to mask files),
        has another schema version, or SQLite refuses WAL mode.
    """
    if db_path.is_file() and db_path.stat().st_size > 0:
        with open(db_path, "rb") as f:
            if f.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
                raise RegistryCorruptError("registry is corrupt (not an SQLite database)", path=db_path,
                                    hint=_CORRUPT_HINT)
    elif readonly:
        raise RegistryError("no registry here", path=db_path,
                            hint="start the daemon once to create it, or check --state")
    elif masks := count_masks():
        # A fresh registry over these masks would silently forget every skill (FAULTS C5).
        raise RegistryCorruptError(f"registry is missing but masks/ holds {masks} mask files", path=db_path,
                            hint="restore registry.sqlite3 from a backup, or move masks/ aside to start empty")
    target = f"file:{quote(str(db_path.resolve()))}?mode=ro" if readonly else str(db_path)
    # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE) and span exactly one method.
    conn = sqlite3.connect(target, uri=readonly, check_same_thread=False, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")  # a constant, not a value from outside
        problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise RegistryCorruptError(f"registry is corrupt ({'; '.join(problems[:3])})", path=db_path,
                                hint=_CORRUPT_HINT)
        conn.execute("PRAGMA foreign_keys = ON")
        if readonly:
            conn.execute("PRAGMA query_only = ON")
        else:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RegistryError(f"SQLite refused WAL mode (got {mode!r})", path=db_path,
                                    hint="put the state folder on a local file system")
            conn.execute("PRAGMA synchronous = FULL")
            with transaction(conn):
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                             (str(SCHEMA_VERSION),))
        (found,) = conn.execute("SELECT max(value) FROM meta WHERE key = 'schema_version'").fetchone()
        if found != str(SCHEMA_VERSION):
            raise RegistryError(f"registry schema is version {found}, this skillhub reads {SCHEMA_VERSION}",
                                path=db_path, hint="use the skillhub version that created it")
    except sqlite3.Error as e:
        conn.close()
        code = (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            raise RegistryCorruptError(f"registry is corrupt ({e})", path=db_path, hint=_CORRUPT_HINT) from None
        raise RegistryError(f"cannot open the registry ({e})", path=db_path) from None
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception (a failed COMMIT included)."""
    # IMMEDIATE takes the write lock up front, so read-then-write (next version number) cannot race.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a failed COMMIT (disk full) leaves the transaction open
            conn.execute("ROLLBACK")
        raise
