"""Taking a file drop out of the inbox instead of copying it, when nobody can write it any more (issue #9; FAULTS
A5-A7, A12).

A copy costs a checkpoint's size in fresh page cache, which on some machines is most of drop-to-served (a page
first touched costs ~2 µs per KiB on the VM of BENCHMARKS.md). A drop that nothing holds open and that has one
name is moved instead, into ``staging/.taken/<name>``: once it is there no path in the inbox reaches it, so the
dropper can no longer truncate or rewrite what the service maps (FAULTS A6), and no byte moves.

What proves "nothing holds it open" is a write lease (``F_SETLEASE F_WRLCK``): the kernel grants it only when no
other file description is open on the file, and any open or truncate by someone else while it is held breaks it
(the opener waits until we let go), which ``F_GETLEASE`` then shows. So: lease, check the file is still the one
the arrival rule judged stable and run the caller's check (the header), link it into ``.taken/``, unlink it from
the inbox, and keep it only if the lease is still whole. Anything else (another open, a second hard link, a file
owned by another user, another file system, no leases) answers ``None``, and the drop is copied as before.

``.taken/<name>`` stays the drop's durable place until it is consumed: a crash leaves it there, and
:func:`give_back_all` at the next start moves it back into the inbox, where the rescan finds it (FAULTS A8). A drop
given back whose name a newer drop took meanwhile is superseded, as an overwrite would have replaced it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skillhub.atomic import fsync_dir
from skillhub.copying import Changed, stat_sig
from skillhub.errors import printable

TAKEN = ".taken"  # in the staging folder
F_SETSIG, F_SETLEASE, F_GETLEASE = 10, 1024, 1025  # <fcntl.h>; Python's fcntl module names only some of them
# A lease break is signalled to its holder, SIGIO by default, whose default action ends the process. SIGURG's
# default action is to ignore it: we never wait for the signal, we ask F_GETLEASE.
BREAK_SIGNAL = signal.SIGURG
# Why a lease or a link cannot be had here: then the drop is copied instead. EAGAIN: someone has it open.
NO_TAKE = {errno.EAGAIN, errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY,
           errno.EXDEV, errno.EMLINK, errno.EBADF, errno.ETXTBSY, errno.EROFS}


def take(path: Path, expect: os.stat_result, staging: Path, check: Callable[[int], None], *,
         opener: Callable[[Path], int], fsync: bool = False) -> Path | None:
    """Move the file drop at ``path`` (whose lstat the arrival rule judged stable was ``expect``) to
    ``staging/.taken/<name>`` and return that path, or ``None`` with nothing changed when it cannot be proved that
    nobody else can write it (then copy it). ``check(fd)`` runs while nobody can write the file; what it raises
    leaves the drop where it was. ``opener`` opens a file in the inbox for reading (never following a link or
    blocking on a FIFO; raising :class:`Changed` if it is one now).

    :raises Changed: the file is not the one judged stable, or someone opened it while it was being taken.
    """
    fd = opener(path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Changed()
        if st.st_nlink != 1:
            return None  # another name reaches the same bytes: whoever holds it could still write them
        try:
            fcntl.fcntl(fd, F_SETSIG, BREAK_SIGNAL)
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_WRLCK)
        except OSError as x:
            if x.errno in NO_TAKE:
                return None
            raise
        try:
            check(fd)
            if stat_sig(os.fstat(fd)) != stat_sig(expect):
                raise Changed()  # not the file judged stable (nothing can write it from here on)
            folder = staging / TAKEN
            folder.mkdir(exist_ok=True)
            taken = folder / path.name
            if os.path.lexists(taken):
                return None  # an earlier take of this name could not be given back: never overwrite it
            try:
                os.link(path, taken)
            except OSError as x:
                if x.errno in NO_TAKE:
                    return None
                raise
            try:
                if fsync:  # no boot id to tell a copy lost in a crash (see Stager.check_after_reboot)
                    os.fsync(fd)
                    fsync_dir(folder)
                os.unlink(path)
            except BaseException:
                os.unlink(taken)
                raise
            if fcntl.fcntl(fd, F_GETLEASE) != fcntl.F_WRLCK or os.fstat(fd).st_nlink != 1:
                # Someone opened it meanwhile (they wait for us to let go), or linked it (a link breaks no lease):
                # they may write it, so it is theirs.
                give_back(taken, path)
                raise Changed()
            return taken
        finally:
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
    finally:
        os.close(fd)


def give_back(taken: Path, path: Path) -> bool:
    """Move the taken drop ``taken`` back to ``path`` in the inbox; ``False`` (and ``taken`` deleted) when a newer
    drop holds that name: the newer content replaces it, as an overwrite would have."""
    try:
        os.link(taken, path)
    except FileExistsError:
        os.unlink(taken)
        return False
    os.unlink(taken)
    return True


def return_taken(taken: Path, path: Path, log: Any) -> bool:
    """:func:`give_back`, logged on ``log`` (a structlog-style logger); ``False``, logged, when it cannot go back now
    (the inbox is missing or not writable, FAULTS A9, A12): it stays taken, for the next start."""
    try:
        back = give_back(taken, path)
    except OSError as x:
        log.warning("taken_drop_kept", name=printable(path.name), error=x.strerror or str(x),
                    why="given back at the next start")
        return False
    log.info("taken_drop_given_back" if back else "taken_drop_superseded", name=printable(path.name))
    return True


def give_back_all(staging: Path, inbox: Path, log: Any) -> list[str]:
    """At start-up: move every drop left in ``staging/.taken/`` by a crash back into the inbox (:func:`return_taken`);
    return the names gone from there."""
    try:
        names = sorted(os.listdir(staging / TAKEN))
    except FileNotFoundError:
        return []
    return [name for name in names if return_taken(staging / TAKEN / name, inbox / name, log)]


def consume_taken(taken: Path, path: Path, sidecar: object) -> None:
    """The taken drop ``taken`` (from ``path`` in the inbox) is consumed: delete it, and its sidecar ``NAME.toml``
    if that still has the signature ``sidecar`` it had when read (a newer one is left for a newer drop)."""
    taken.unlink(missing_ok=True)
    side = path.with_name(path.name[:-12] + ".toml")
    with contextlib.suppress(FileNotFoundError):
        if sidecar is not None and stat_sig(os.lstat(side)) == sidecar:
            side.unlink()
