"""The registry's handle on its state folder: the paths, the lock, the SQLite connection and its transactions, and the
read-only and files-only ways of opening it. :class:`skillhub.registry.Registry` builds its rows on this; the folders,
lock and schema themselves are :mod:`skillhub.statedir`'s.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from skillhub.errors import RegistryError
from skillhub.statedir import open_database, prepare_folders, take_lock, transaction
from skillhub.statefiles import StateFiles

DB_NAME = "registry.sqlite3"


class RegistryConnection(StateFiles):
    """An open (or, for :meth:`files_only`, unavailable) registry database beside the state folder's files; see
    :class:`~skillhub.registry.Registry` for the parameters. Every query goes through :meth:`_db`, every write
    through :meth:`_tx`, under ``_lock``."""

    def __init__(self, state_dir: str | Path, *, readonly: bool = False) -> None:
        self._paths(state_dir, readonly)
        try:
            if not readonly:
                prepare_folders((self.state_dir, self.masks_dir, self.staging_dir, self.models_dir))
                self._lock_fd = take_lock(self.state_dir)
            self._conn = open_database(self.db_path, readonly=readonly, count_masks=lambda: len(self._mask_files()))
        except BaseException:
            self.close()
            raise

    def _paths(self, state_dir: str | Path, readonly: bool) -> None:
        self.state_dir = Path(state_dir)
        self.readonly = readonly
        self.db_path = self.state_dir / DB_NAME
        self.masks_dir = self.state_dir / "masks"
        self.staging_dir = self.state_dir / "staging"
        self.models_dir = self.state_dir / "models"
        self._lock = threading.RLock()
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._inflight: set[str] = set()  # temp names of mask writes under way, which recover() must spare
        self._unavailable: RegistryError | None = None

    @classmethod
    def files_only(cls, state_dir: str | Path, lock_fd: int | None, reason: RegistryError) -> Self:
        """The mask and head files of a state folder whose database cannot be opened (FAULTS C5), or that a
        follower reads without writing (``lock_fd`` None: no lock taken): reads files by their hash; every query
        and mutation raises ``reason``. Owns ``lock_fd`` (the caller took the lock)."""
        self = cls.__new__(cls)
        self._paths(state_dir, True)
        self._lock_fd, self._unavailable = lock_fd, reason
        return self

    def close(self) -> None:
        """Close the database and release the lock. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise self._unavailable or RegistryError("registry is closed", path=self.db_path)
        return self._conn

    def _writable(self) -> None:
        if self._unavailable is not None:
            raise self._unavailable
        if self.readonly:
            raise RegistryError("registry is open read-only", path=self.db_path,
                                hint="stop the daemon, or ask it through the API")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._writable()
        try:
            with transaction(self._db()) as conn:
                yield conn
        except (sqlite3.Error, UnicodeEncodeError) as e:  # the latter: text with lone surrogates (non-UTF-8 names)
            raise RegistryError(f"registry write failed ({e}); nothing was changed", path=self.db_path) from e
