"""A drop as intake's caller sees it (DESIGN §3-§4): :class:`Arrival`, a finished drop copied to staging and handed
over; :class:`RetryLater`, the caller's "not yet"; and which names in the inbox are drops at all. Import these from
:mod:`skillhub.intake` as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class RetryLater(Exception):
    """``on_arrival`` raises this to leave the drop pending and try again later: after ``seconds`` (default
    ``stable_seconds``), or sooner when the caller calls :meth:`skillhub.intake.Intake.poke`. ``reason`` is logged."""

    def __init__(self, reason: str = "", *, seconds: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.seconds = reason, seconds


def ignored(name: str) -> bool:
    """Whether the inbox entry ``name`` is not a drop: hidden, or a name of :data:`IGNORED_SUFFIXES`."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)
