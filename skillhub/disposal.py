"""The inbox's end of a drop, once intake has decided (DESIGN §3; FAULTS A1-A12): a consumed drop is deleted with its
sidecar; a rejected one is moved to ``inbox/.rejected/`` (with a file's sidecar) beside ``<name>.reason.txt``, which
says why and what to do. Nothing in ``.rejected/`` is ever read again.

Both raise :class:`OSError` (:class:`FileNotFoundError` when the drop went away meanwhile) for
:class:`skillhub.intake.Intake` to log; neither follows a symlink.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path

from skillhub.staging import remove_path

#: the second line of every ``<name>.reason.txt``
TODO = ("What to do: fix the problem above, then drop the corrected file or folder into the inbox again "
        "(nothing in .rejected/ is ever read); delete this file when done.")


def remove_consumed(inbox: Path, path: Path, kind: str, stem: str) -> None:
    """Delete the consumed drop at ``path`` (a folder when ``kind`` is ``"dir"``), and a file's sidecar
    ``inbox/<stem>.toml``."""
    if kind == "dir":
        shutil.rmtree(path)
    else:
        path.unlink()
        (inbox / f"{stem}.toml").unlink(missing_ok=True)


def move_to_rejected(inbox: Path, name: str, kind: str, reason: str, *, source: Path | None = None) -> None:
    """Move the drop ``name`` (from ``source`` when it was taken out of the inbox; and a file's sidecar, unless a newer
    drop of that name is in the inbox) to ``inbox/.rejected/``, replacing what is there under the same names, then
    write ``<name>.reason.txt`` (``reason`` and :data:`TODO`) atomically; a name too long for the file system is
    shortened with a hash."""
    path, rejected = inbox / name, inbox / ".rejected"
    moves = [(source or path, rejected / name)]
    if kind == "file" and name.lower().endswith(".safetensors") and not (source and os.path.lexists(path)):
        side = inbox / f"{name[:-12]}.toml"
        if os.path.lexists(side):
            moves.append((side, rejected / side.name))
    rejected.mkdir(exist_ok=True)
    for src, dst in moves:
        if os.path.lexists(dst):
            remove_path(dst)
        os.rename(src, dst)
    raw = os.fsencode(name)
    rname = raw if len(raw) <= 240 else raw[:200] + b"-" + hashlib.sha256(raw).hexdigest()[:12].encode()
    note = rejected / os.fsdecode(rname + b".reason.txt")
    tmp = rejected / f".{secrets.token_hex(8)}.tmp"
    tmp.write_text(f"{reason}\n{TODO}\n", encoding="utf-8", errors="backslashreplace")
    os.replace(tmp, note)
