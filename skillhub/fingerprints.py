"""Fingerprints: the sha256 that names a checkpoint (a base, a finetune, a staged drop), computed once per file.

A fingerprint is the sha256 of a checkpoint's file, or of a sharded checkpoint's shard names and shard hashes. The
process keeps one :class:`FingerprintCache` (:data:`FINGERPRINTS`), keyed by each file's identity and kept across
processes in a small JSON store (``~/.cache/skillhub``, or ``$SKILLHUB_CACHE_DIR``; ``""`` = memory only), so that
a multi-GB base is not read again just to be named. Files are opened by :mod:`skillhub.checkpoint`; this module only
hashes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from skillhub.atomic import sha256_file

if TYPE_CHECKING:
    from skillhub.checkpoint import Checkpoint


class FingerprintCache:
    """sha256 of checkpoints, cached by each file's identity; thread-safe.

    A file's identity is (resolved path, size, mtime_ns, inode, ctime_ns): a change of content changes its ctime,
    which no user can set back. A sharded checkpoint's fingerprint is the sha256 of its shard names and shard
    hashes. The process has one, :data:`FINGERPRINTS`: a file hashed once is known everywhere in it (a staged drop's
    hash, computed while it is copied, is handed to the ingest with the drop instead); with a ``store`` (a JSON
    file) hashes also outlive the process, so that neither
    ``skillhub localize`` nor a service start reads a multi-GB base again just to name it.
    """

    MAX_STORED = 4096

    def __init__(self, store: Path | None = None) -> None:
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()
        self._store = store
        self._loaded = store is None

    @staticmethod
    def _key(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}"

    def _load(self) -> None:
        if self._loaded or self._store is None:
            return
        self._loaded = True
        try:
            data = json.loads(self._store.read_text())
            if isinstance(data, dict):
                self._cache.update({k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)})
        except (OSError, ValueError):
            pass  # no store yet, or an unreadable one: hashes are computed again, never trusted from a bad file

    def _save(self) -> None:
        if self._store is None:
            return
        try:
            self._store.parent.mkdir(parents=True, exist_ok=True)
            items = list(self._cache.items())[-self.MAX_STORED:]
            tmp = self._store.with_name(f".{self._store.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(dict(items)))
            os.replace(tmp, self._store)  # atomic; concurrent writers lose entries at worst, never corrupt it
        except OSError:
            pass  # a read-only home or a full disk only costs a hash next time

    def file(self, path: Path, *, persist: bool = True) -> str:
        """sha256 of one file (read once per identity). ``persist=False`` keeps it out of the store (files that
        live briefly, such as staged drops)."""
        key = self._key(path)
        with self._lock:
            self._load()
            known = self._cache.get(key)
        if known is None:
            known = sha256_file(path)
            with self._lock:
                self._cache[key] = known
                if persist:
                    self._save()
        return known

    def checkpoint(self, ckpt: Checkpoint, *, persist: bool = True) -> str:
        if len(ckpt.files) == 1 and ckpt.path.is_file():
            return self.file(ckpt.files[0].path, persist=persist)
        h = hashlib.sha256()
        for f in ckpt.files:
            h.update(f"{f.path.name}\0{self.file(f.path, persist=persist)}\n".encode())
        return h.hexdigest()


def _store_path() -> Path | None:
    """Where fingerprints outlive the process: ``$SKILLHUB_CACHE_DIR``, else ``$XDG_CACHE_HOME/skillhub``, else
    ``~/.cache/skillhub``; ``SKILLHUB_CACHE_DIR=""`` keeps them in memory only."""
    explicit = os.environ.get("SKILLHUB_CACHE_DIR")
    if explicit is not None:
        return Path(explicit) / "fingerprints.json" if explicit else None
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "skillhub" / "fingerprints.json"


#: the process's fingerprint cache (the only one)
FINGERPRINTS = FingerprintCache(_store_path())


def fingerprint(ckpt: Checkpoint) -> str:
    """sha256 of a checkpoint (of its file, or of its shards' names and hashes), cached for the process."""
    return FINGERPRINTS.checkpoint(ckpt)
