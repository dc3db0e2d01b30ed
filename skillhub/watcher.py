"""Watching the inbox folder (DESIGN §4; FAULTS A8, A9): the one place that picks the watchdog backend.

:class:`InboxWatch` keeps one observer on the inbox: inotify, or polling when asked or when inotify cannot be had
(limits reached, unsupported file system). It keeps :attr:`InboxWatch.health` true to the folder: it notices the inbox
going missing, becoming unreadable or being replaced by another folder, and starts a new observer once it is back,
telling its caller to rescan for whatever arrived while nobody watched. Events reach the caller's callback in
watchdog's thread, which only records names (:mod:`skillhub.intake`); nothing is ever raised into that thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileClosedEvent, FileClosedNoWriteEvent, FileOpenedEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from skillhub.staging import show_name


def inbox_changes(event: Any, root: str) -> list[tuple[str | None, bool | None]] | None:
    """What a watchdog ``event`` says about the inbox folder ``root``; ``None`` for events our own reads cause.

    Each ``(name, hint)`` names an entry directly in the inbox, or the inbox itself (``None``) when it was deleted
    or moved away. ``hint`` is True after a close-write or a move in (a short settle suffices), None after a
    deletion or a move away, else False. Events about anything deeper in the tree are left out.
    """
    if isinstance(event, (FileOpenedEvent, FileClosedNoWriteEvent)) or event.event_type == "opened":
        return None  # our own reads cause these
    hint = True if isinstance(event, FileClosedEvent) else (None if event.event_type == "deleted" else False)
    paths = [(os.fsdecode(event.src_path), hint)]
    if event.event_type == "moved":
        paths = [(paths[0][0], None), (os.fsdecode(event.dest_path), True)]
    changes: list[tuple[str | None, bool | None]] = []
    for p, h in paths:
        if p == root and event.event_type in ("deleted", "moved"):
            changes.append((None, h))
        elif os.path.dirname(p) == root:
            changes.append((os.path.basename(p), h))
    return changes


class _Handler(FileSystemEventHandler):
    """Runs in watchdog's thread: hands every event to the callback, and never raises."""

    def __init__(self, on_event: Callable[[Any], None]) -> None:
        self._on_event = on_event

    def dispatch(self, event: Any) -> None:
        try:
            self._on_event(event)
        except Exception:  # noqa: BLE001 - never raise into watchdog's thread
            pass


class InboxWatch:
    """An observer on ``inbox`` that sends its events to ``on_event``, and the inbox's health.

    :param poll: use the polling observer, never inotify.
    :param poll_seconds: the polling observer's interval.
    :param stop: once set, no new observer is started.
    """

    def __init__(self, inbox: Path, on_event: Callable[[Any], None], *, poll: bool, poll_seconds: float,
                 stop: threading.Event, logger: Any) -> None:
        self.inbox, self.poll, self.poll_seconds = inbox, poll, poll_seconds
        self.log = logger
        self._on_event, self._stop = on_event, stop
        self._obs_lock = threading.Lock()
        self._observer: Any = None
        self._watch_key: tuple[int, int] | None = None
        self._health = (False, "not started")

    @property
    def health(self) -> tuple[bool, str]:
        """``(ok, detail)``: whether the inbox is being watched, and what is wrong when it is not."""
        return self._health

    def check(self) -> bool:
        """Keep ``health`` true to the inbox and (re)start the observer when it is (back) or has been replaced.

        Returns True when a new observer has just started: whatever arrived while nobody watched needs a rescan.
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
        obs = self._observer
        alive = obs is not None and obs.is_alive() and all(em.is_alive() for em in obs.emitters)
        if alive and self._watch_key == (st.st_dev, st.st_ino):
            return False
        self.stop()
        if self._stop.is_set():
            return False
        try:
            with self._obs_lock:
                self._observer = self._new_observer()
                self._watch_key = (st.st_dev, st.st_ino)
        except Exception as e:  # the folder went away between the stat and the watch
            self._health = (False, f"cannot watch the inbox {show_name(str(self.inbox))} ({e}); retrying")
            return False
        self._health = (True, f"watching {show_name(str(self.inbox))}")
        self.log.info("inbox_watching", inbox=show_name(str(self.inbox)),
                      polling=isinstance(self._observer, PollingObserver))
        return True

    def _new_observer(self) -> Any:
        """The one place that picks the watcher backend."""
        if not self.poll:
            obs = None
            try:
                obs = Observer()
                obs.schedule(_Handler(self._on_event), os.fspath(self.inbox), recursive=False)
                obs.start()
                return obs
            except Exception as e:  # inotify limits reached, or not supported here
                self.log.warning("inotify_unavailable", error=str(e), fallback="polling")
                if obs is not None:
                    with contextlib.suppress(Exception):
                        obs.stop()
        obs = PollingObserver(timeout=self.poll_seconds)
        obs.schedule(_Handler(self._on_event), os.fspath(self.inbox), recursive=False)
        obs.start()
        return obs

    def stop(self, health: str | None = None) -> None:
        """Stop the observer, if any; with ``health``, report that as the reason nothing is watched."""
        with self._obs_lock:
            obs, self._observer = self._observer, None
        if obs is not None:
            try:
                obs.stop()
                obs.join(5)
            except Exception as e:  # a dead watch may fail to close; we drop it anyway
                self.log.warning("observer_stop_failed", error=str(e))
        if health is not None:
            self._health = (False, health)
