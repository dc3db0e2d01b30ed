"""A drop as intake's caller sees it (DESIGN §3-§4): :class:`Arrival`, a finished drop copied to staging and handed
over; :class:`RetryLater`, the caller's "not yet"; and which names in the inbox are drops at all. Import these from
:mod:`skillhub.intake` as well.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skillhub.errors import CheckpointError

#: names that are never a drop (besides hidden ones): partial downloads, temp files, sidecars (read with their drop)
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".incomplete", ".toml")
#: pickle checkpoints, refused on the watched path (``skillhub convert`` makes safetensors of them)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


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
    taken: Path | None = None  # where a drop moved, not copied, waits until consumed (skillhub.taking), else None


class RetryLater(Exception):
    """``on_arrival`` raises this to leave the drop pending and try again later: after ``seconds`` (default
    ``stable_seconds``), or sooner when the caller calls :meth:`skillhub.intake.Intake.poke`. ``reason`` is logged."""

    def __init__(self, reason: str = "", *, seconds: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.seconds = reason, seconds


def ignored(name: str) -> bool:
    """Whether the inbox entry ``name`` is not a drop: hidden, or a name of :data:`IGNORED_SUFFIXES`."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


def special_file(st: os.stat_result) -> str | None:
    """Why ``st`` is neither a regular file nor a folder (a symlink, FIFO, device or socket), else ``None``."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "is a symbolic link: only regular files and folders inside the inbox are read"
    for test, what in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {what}, not a regular file"
    return None


def refuse(name: str, st: os.stat_result) -> None:
    """Refuse the inbox entry ``name`` (its lstat ``st``) at once if it can never be a drop: a link, FIFO, device or
    socket, or a pickle checkpoint (which is never opened here).

    :raises CheckpointError: saying why and what to drop instead.
    """
    if (why := special_file(st)) is not None:
        raise CheckpointError(why, path=name, hint="copy the file itself into the inbox")
    if not stat.S_ISDIR(st.st_mode) and name.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError("pickle checkpoints are never opened on the watched path", path=name,
                              hint="convert it with `skillhub convert` (weights only, in a subprocess) and "
                                   "drop the .safetensors file it writes")
