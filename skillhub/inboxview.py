"""The inbox as an operator sees it: the drops waiting there (:func:`skillhub.drops.ignored` says which names are
drops) and the rejected ones in ``inbox/.rejected/`` with the reason :mod:`skillhub.disposal` wrote beside each.
Read-only: nothing here moves or opens a drop's contents."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from skillhub.disposal import TODO
from skillhub.drops import ignored

__all__ = ["inbox_view"]

REASON_SUFFIX = ".reason.txt"
MAX_REASON_CHARS = 2000  # a reason file is ours, but the folder is writable by anyone who may drop


def _size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        return path.lstat().st_size
    except OSError:
        return 0


def inbox_view(inbox: Path, *, taken: Path | None = None, limit: int = 100) -> dict[str, Any]:
    """``{"pending": [{"name", "bytes", "modified", "taken"}], "rejected": [{"name", "reason", "rejected"}]}``: the
    drops waiting (oldest first): those in the inbox, and those moved out of it into ``taken`` while they are
    localized (``"taken": true``, :mod:`skillhub.taking`); and the ``limit`` newest rejections (newest first); names
    only, never a path."""
    pending: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for folder, moved in [(inbox, False)] + ([(taken, True)] if taken is not None else []):
        try:
            names = os.listdir(folder)
        except OSError:
            names = []
        for name in names:
            if ignored(name):
                continue
            path = folder / name
            try:
                mtime = path.lstat().st_mtime
            except OSError:
                continue  # gone meanwhile: consumed
            pending.append({"name": name, "bytes": _size(path), "modified": mtime, "taken": moved})
    folder = inbox / ".rejected"
    try:
        notes = [n for n in os.listdir(folder) if n.endswith(REASON_SUFFIX) and not n.startswith(".")]
    except OSError:
        notes = []
    for note in notes:
        path = folder / note
        try:
            mtime = path.stat().st_mtime
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(MAX_REASON_CHARS)
        except OSError:
            continue
        reason = text.replace(TODO, "").strip()
        rejected.append({"name": note.removesuffix(REASON_SUFFIX), "reason": reason, "rejected": mtime})
    pending.sort(key=lambda d: (d["modified"], d["name"]))
    rejected.sort(key=lambda d: (-d["rejected"], d["name"]))
    return {"pending": pending, "rejected": rejected[:limit]}
