"""Watching the inbox folder (DESIGN §4; FAULTS A8, A9): the one place that picks the watcher backend.

:class:`InboxWatch` keeps one watch on the inbox: our own inotify reader on Linux, watchdog's observer elsewhere,
or watchdog's polling observer when asked or when inotify cannot be had (limits reached, unsupported file system).
It keeps :attr:`InboxWatch.health` true to the folder: it notices the inbox going missing, becoming unreadable or
being replaced by another folder, and starts a new watch once it is back, telling its caller to rescan for whatever
arrived while nobody watched. Changes reach the caller's callback in the watch's thread, which only records names
(:mod:`skillhub.intake`); nothing is ever raised into that thread.

Why not watchdog's inotify observer: it holds every IN_MOVED_FROM for half a second
(``InotifyMoveEventGrouper.delay``) to pair it with its IN_MOVED_TO, so a rename inside the inbox, the usual way to
finish a drop, reached us 0.5 s late, with every event queued behind it; and a move in from another folder came as
a plain creation, indistinguishable from a file still being written. The intake needs no pairing: a name moved in
is complete (:data:`MOVED_IN`), a name moved away is gone. inotify reports both at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import stat
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileClosedEvent, FileClosedNoWriteEvent, FileOpenedEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from skillhub.staging import show_name

# What a change says about a name in the inbox (``None``, GONE: deleted or moved away).
GONE: str | None = None
CHANGED = "changed"  # created, written, attributes changed: still settling, maybe being written
CLOSED = "closed"  # closed after writing: likely complete, a short settle suffices
MOVED_IN = "moved-in"  # renamed into place: complete by definition (FAULTS A2)

Change = tuple[str | None, str | None]  # (name in the inbox, or None for the inbox itself; what happened)


def inbox_changes(event: Any, root: str) -> list[Change] | None:
    """What a watchdog ``event`` says about the inbox folder ``root``; ``None`` for events our own reads cause.

    Each ``(name, what)`` names an entry directly in the inbox, or the inbox itself (``None``) when it was deleted
    or moved away; ``what`` is one of :data:`GONE`, :data:`CHANGED`, :data:`CLOSED`, :data:`MOVED_IN`. Events about
    anything deeper in the tree are left out.
    """
    if isinstance(event, (FileOpenedEvent, FileClosedNoWriteEvent)) or event.event_type == "opened":
        return None  # our own reads cause these
    what = CLOSED if isinstance(event, FileClosedEvent) else (GONE if event.event_type == "deleted" else CHANGED)
    paths = [(os.fsdecode(event.src_path), what)]
    if event.event_type == "moved":
        paths = [(paths[0][0], GONE), (os.fsdecode(event.dest_path), MOVED_IN)]
    changes: list[Change] = []
    for p, w in paths:
        if p == root and event.event_type in ("deleted", "moved"):
            changes.append((None, w))
        elif os.path.dirname(p) == root:
            changes.append((os.path.basename(p), w))
    return changes


class _Handler(FileSystemEventHandler):
    """Runs in watchdog's thread: hands every event's changes on, and never raises."""

    def __init__(self, root: str, deliver: Callable[[list[Change]], None]) -> None:
        self._root, self._deliver = root, deliver

    def dispatch(self, event: Any) -> None:
        try:
            if changes := inbox_changes(event, self._root):
                self._deliver(changes)
        except Exception:  # noqa: BLE001 - never raise into watchdog's thread
            pass


class _Observed:
    """A watchdog observer on the inbox (polling, or the platform's own backend off Linux)."""

    def __init__(self, observer: Any, root: str, deliver: Callable[[list[Change]], None]) -> None:
        self.polling = isinstance(observer, PollingObserver)
        self._obs = observer
        try:
            observer.schedule(_Handler(root, deliver), root, recursive=False)
            observer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                observer.stop()
            raise

    def alive(self) -> bool:
        return self._obs.is_alive() and all(em.is_alive() for em in self._obs.emitters)

    def close(self) -> None:
        self._obs.stop()
        self._obs.join(5)


_IN = {"MODIFY": 0x2, "ATTRIB": 0x4, "CLOSE_WRITE": 0x8, "MOVED_FROM": 0x40, "MOVED_TO": 0x80, "CREATE": 0x100,
       "DELETE": 0x200, "DELETE_SELF": 0x400, "MOVE_SELF": 0x800, "UNMOUNT": 0x2000, "Q_OVERFLOW": 0x4000,
       "IGNORED": 0x8000, "ONLYDIR": 0x01000000, "DONT_FOLLOW": 0x02000000, "EXCL_UNLINK": 0x04000000}
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name


class _Inotify:
    """Our own inotify watch on one folder (Linux): every event as the kernel gives it, with no move pairing.

    Only what the intake needs is asked for (no IN_OPEN, IN_ACCESS or IN_CLOSE_NOWRITE: our own reads of a drop
    would flood the queue). Each read(2) of the queue becomes one ``deliver`` call; a queue overflow calls
    ``overflow`` (the caller rescans, FAULTS A8); the folder itself deleted, moved or unmounted reports
    ``(None, GONE)`` and ends the watch, which :meth:`InboxWatch.check` then replaces.
    """

    polling = False
    MASK = sum(_IN[k] for k in ("MODIFY", "ATTRIB", "CLOSE_WRITE", "MOVED_FROM", "MOVED_TO", "CREATE", "DELETE",
                                "DELETE_SELF", "MOVE_SELF", "ONLYDIR", "DONT_FOLLOW", "EXCL_UNLINK"))

    def __init__(self, root: str, deliver: Callable[[list[Change]], None], overflow: Callable[[], None]) -> None:
        self._deliver, self._overflow = deliver, overflow
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        try:
            add = libc.inotify_add_watch
            add.argtypes, add.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int
            if add(self._fd, os.fsencode(root), self.MASK) < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", root)
            self._wake_r, self._wake_w = os.pipe()
        except BaseException:
            os.close(self._fd)
            raise
        self._thread = threading.Thread(target=self._run, name="skillhub-inotify", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(5)
        for fd in (self._fd, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            if any(fd == self._wake_r for fd, _ in poller.poll()):
                return
            try:
                buf = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                return  # the watch is broken: alive() says so and the health check starts a new one
            changes, ended = self._parse(buf)
            try:
                if changes:
                    self._deliver(changes)
            except Exception:  # noqa: BLE001 - the callback's problem, never the watch's end
                pass
            if ended:
                return

    def _parse(self, buf: bytes) -> tuple[list[Change], bool]:
        changes: list[Change] = []
        ended, off = False, 0
        while off + _EVENT.size <= len(buf):
            _, mask, _, n = _EVENT.unpack_from(buf, off)
            name = os.fsdecode(buf[off + _EVENT.size:off + _EVENT.size + n].rstrip(b"\0"))
            off += _EVENT.size + n
            if mask & _IN["Q_OVERFLOW"]:
                with contextlib.suppress(Exception):
                    self._overflow()
            elif not name:  # the inbox itself
                if mask & (_IN["DELETE_SELF"] | _IN["MOVE_SELF"] | _IN["UNMOUNT"] | _IN["IGNORED"]):
                    changes.append((None, GONE))
                    ended = True
                else:
                    changes.append((None, CHANGED))  # chmod of the inbox (A9): look at its health now
            elif mask & _IN["MOVED_TO"]:
                changes.append((name, MOVED_IN))
            elif mask & _IN["CLOSE_WRITE"]:
                changes.append((name, CLOSED))
            elif mask & (_IN["MOVED_FROM"] | _IN["DELETE"]):
                changes.append((name, GONE))
            else:
                changes.append((name, CHANGED))
        return changes, ended


class InboxWatch:
    """A watch on ``inbox`` that sends lists of :data:`Change` to ``on_changes``, and the inbox's health.

    :param on_overflow: called when the kernel dropped events (the caller rescans).
    :param poll: use the polling observer, never inotify.
    :param poll_seconds: the polling observer's interval.
    :param stop: once set, no new watch is started.
    """

    def __init__(self, inbox: Path, on_changes: Callable[[list[Change]], None], *, on_overflow: Callable[[], None],
                 poll: bool, poll_seconds: float, stop: threading.Event, logger: Any) -> None:
        self.inbox, self.poll, self.poll_seconds = inbox, poll, poll_seconds
        self.log = logger
        self._on_changes, self._on_overflow, self._stop = on_changes, on_overflow, stop
        self._obs_lock = threading.Lock()
        self._watch: Any = None
        self._watch_key: tuple[int, int] | None = None
        self._health = (False, "not started")

    @property
    def health(self) -> tuple[bool, str]:
        """``(ok, detail)``: whether the inbox is being watched, and what is wrong when it is not."""
        return self._health

    @property
    def polling(self) -> bool:
        """Whether the current watch polls (no inotify)."""
        return bool(self._watch is not None and self._watch.polling)

    def check(self) -> bool:
        """Keep ``health`` true to the inbox and (re)start the watch when it is (back) or has been replaced.

        Returns True when a new watch has just started: whatever arrived while nobody watched needs a rescan.
        """
        try:
            st = os.stat(self.inbox)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder")
            os.close(os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY))
        except OSError as e:
            lost = isinstance(e, (FileNotFoundError, NotADirectoryError))
            msg = f"inbox {'missing' if lost else 'unreadable (' + (e.strerror or str(e)) + ')'}: " \
                  f"{show_name(str(self.inbox))}; retrying"
            if self._health != (False, msg):
                self.log.error("inbox_unavailable", problem=msg)
            self.stop()
            self._health = (False, msg)
            return False
        watch = self._watch
        if watch is not None and watch.alive() and self._watch_key == (st.st_dev, st.st_ino):
            return False
        self.stop()
        if self._stop.is_set():
            return False
        try:
            with self._obs_lock:
                self._watch = self._new_watch()
                self._watch_key = (st.st_dev, st.st_ino)
        except Exception as e:  # the folder went away between the stat and the watch
            self._health = (False, f"cannot watch the inbox {show_name(str(self.inbox))} ({e}); retrying")
            return False
        self._health = (True, f"watching {show_name(str(self.inbox))}")
        self.log.info("inbox_watching", inbox=show_name(str(self.inbox)), polling=self.polling)
        return True

    def _deliver(self, changes: list[Change]) -> None:
        """Every backend's changes pass here, in the backend's thread."""
        self._on_changes(changes)

    def _new_watch(self) -> Any:
        """The one place that picks the watcher backend."""
        root = os.fspath(self.inbox)
        if not self.poll:
            try:
                if sys.platform.startswith("linux"):
                    return _Inotify(root, self._deliver, self._on_overflow)
                return _Observed(Observer(), root, self._deliver)
            except Exception as e:  # inotify limits reached, or not supported here
                if not os.path.isdir(root):
                    raise
                self.log.warning("inotify_unavailable", error=str(e), fallback="polling")
        return _Observed(PollingObserver(timeout=self.poll_seconds), root, self._deliver)

    def stop(self, health: str | None = None) -> None:
        """Stop the watch, if any; with ``health``, report that as the reason nothing is watched."""
        with self._obs_lock:
            watch, self._watch = self._watch, None
        if watch is not None:
            try:
                watch.close()
            except Exception as e:  # a dead watch may fail to close; we drop it anyway
                self.log.warning("observer_stop_failed", error=str(e))
        if health is not None:
            self._health = (False, health)
