"""Intake: the only code that watches the inbox (DESIGN §3-§4; FAULTS A1-A12, B10, C4).

A drop is a regular file ``NAME.safetensors`` or a folder ``NAME/`` (``model.safetensors``, or shards named by one
``*.index.json``) directly in the inbox, with an optional TOML sidecar ``NAME.toml`` (``NAME/skill.toml``). Once a
drop has stopped changing it is staged: a file nobody else holds open is moved out of the inbox
(:mod:`skillhub.taking`), anything else is copied to a private staging folder while it is hashed; its safetensors
headers are checked where nobody else can write them, and the staged file is handed to the caller's
``on_arrival``. The drop is then deleted, left pending (:class:`RetryLater`; a moved one waits in
``staging/.taken/``, and goes back into the inbox when the intake stops), or moved to ``inbox/.rejected/`` beside a
``<name>.reason.txt`` saying why and what to do.

This module owns the worker and those outcomes; :mod:`skillhub.pending` holds what the worker knows of a pending
drop and the arrival rule's waits, :mod:`skillhub.watcher` keeps the observer on the inbox and its health,
:mod:`skillhub.staging` reads a drop's files and makes the checked copy, and :mod:`skillhub.disposal` deletes a
consumed drop or moves a rejected one to ``inbox/.rejected/``.

The arrival rule (when a drop counts as finished, DESIGN §4; FAULTS A1-A3) is :mod:`skillhub.pending`'s.

Threading: the watch's thread only records names and wakes the worker; every filesystem operation runs in the one
worker thread, so a drop is never processed twice at once. Nothing in the inbox is memory-mapped (a truncation would
be SIGBUS), followed through a symlink, or opened in a way that can block (a FIFO).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skillhub.disposal import move_to_rejected, remove_consumed
from skillhub.drops import Arrival, RetryLater, ignored, refuse
from skillhub.errors import CheckpointError, SkillhubError
from skillhub.log import get_logger
from skillhub.pending import SETTLE_SECONDS, TICK_SECONDS, Pending, Wait, truncated_quiet
from skillhub.staging import (
    Changed,
    Stager,
    Transient,
    Truncated,
    drop_signature,
    folder_plan,
    read_sidecar,
    show_name,
)
from skillhub.taking import consume_taken, give_back_all, return_taken
from skillhub.watcher import Change, InboxWatch

HEALTH_SECONDS = 1.0  # how often the worker checks that the inbox is still there


class Intake:
    """Watch ``inbox`` and hand each finished drop, copied to ``staging``, to ``on_arrival`` in one worker thread.

    ``on_arrival`` returning normally consumes the drop (the source is deleted); raising :class:`RetryLater` keeps
    it pending; raising a :class:`SkillhubError` (or anything else, logged as an internal error) rejects it into
    ``inbox/.rejected/``. The staged copy belongs to the caller once ``on_arrival`` has returned normally.
    """

    def __init__(self, inbox: Path, staging: Path, on_arrival: Callable[[Arrival], None], *,
                 stable_seconds: float = 1.0, rescan_seconds: float = 30.0, poll: bool = False,
                 shard_timeout_seconds: float = 600.0, max_bytes: int | None = None, logger: Any = None,
                 on_reject: Callable[[str], None] | None = None) -> None:
        self.inbox, self.staging = Path(inbox), Path(staging)
        self.on_arrival = on_arrival
        self.on_reject = on_reject  # told the reason of every drop moved to .rejected/ (the service counts them)
        self.stable_seconds, self.rescan_seconds = stable_seconds, rescan_seconds
        self.poll, self.shard_timeout_seconds, self.max_bytes = poll, shard_timeout_seconds, max_bytes
        self.log = logger if logger is not None else get_logger("skillhub.intake")
        self._lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._events: dict[str, str | None] = {}  # name -> what its last event said, from the watch's thread
        self._poked: set[str] = set()  # names the caller asked to look at again (poke)
        self._scan_requested, self._check_root, self._idle = True, False, False
        self._working = self._settling = False
        self._entries: dict[str, Pending] = {}  # worker-only from here on
        self._dead: dict[str, object] = {}  # drops we could neither consume nor move away, by signature
        self._consumed: dict[str, None] = {}  # recently consumed stems, to explain late sidecars
        self._watch = InboxWatch(self.inbox, self._on_changes, on_overflow=self.rescan, poll=poll, logger=self.log,
                                 stop=self._stop, poll_seconds=min(1.0, max(0.1, stable_seconds)))
        self._stager = Stager(self.inbox, self.staging, self._stop)
        self._worker: threading.Thread | None = None

    # ---- public API -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the watch (inotify, or polling if ``poll`` or inotify fails) and the worker; scan at once. After a
        restart of the machine, first verify the staged copies (:meth:`Stager.check_after_reboot`)."""
        self._stager.check_writable()
        self._stager.check_after_reboot(self.log.warning)
        give_back_all(self.staging, self.inbox, self.log)  # drops taken before a crash: pending again
        self._check_inbox()
        self._worker = threading.Thread(target=self._run, name="skillhub-intake", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 10) -> None:
        """Stop the worker (abandoning a copy in flight, removing its temp) and the observer."""
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout)
        self._watch.stop(health="stopped")
        if self._worker is not None and self._worker.is_alive():
            self.log.warning("intake_stop_timeout", seconds=timeout)  # on_arrival is still running
            return
        for e in self._entries.values():
            self._drop_held(e)

    def rescan(self) -> None:
        """Request a full scan of the inbox now (thread-safe)."""
        with self._lock:
            self._scan_requested, self._idle = True, False
        self._wake.set()

    def poke(self, name: str) -> None:
        """Look at the drop ``name`` again now (thread-safe): the caller's work it waited for (:class:`RetryLater`)
        is done."""
        with self._lock:
            self._poked.add(name)
        self._on_changes([(name, None)])

    @property
    def health(self) -> tuple[bool, str]:
        return self._watch.health

    def arriving(self) -> bool:
        """Whether drops are arriving right now: events not yet looked at, a drop being staged or handed over, or
        one that changed within about a stability window. A drop stuck half-written for longer does not count,
        so it cannot hold back other changes (the daemon batches changes while this is true)."""
        with self._lock:
            return bool(self._events or self._scan_requested or self._working or self._settling)

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued, pending or in progress (for tests); False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._idle:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    # ---- watching ---------------------------------------------------------------------------------------------
    def _on_changes(self, changes: list[Change]) -> None:
        with self._lock:
            for name, hint in changes:
                if name is None:
                    self._check_root = True
                elif hint is not None or name not in self._events:
                    self._events[name] = hint
                self._idle = False
        self._wake.set()

    def _check_inbox(self) -> None:
        if self._watch.check():
            self.rescan()  # whatever arrived while we were blind

    # ---- the worker -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_scan = next_health = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                with self._lock:
                    events, self._events = self._events, {}
                    poked, self._poked = self._poked, set()
                    scan, self._scan_requested = self._scan_requested, False
                    root, self._check_root = self._check_root, False
                if root or now >= next_health:
                    self._check_inbox()
                    next_health = now + min(HEALTH_SECONDS, self.rescan_seconds)
                if scan or now >= next_scan:
                    self._scan(now)
                    next_scan = now + self.rescan_seconds
                self._note(events, now, poked)
                due_now = sorted(n for n, e in self._entries.items() if e.due <= now)
                with self._lock:
                    self._working = bool(due_now)
                for name in due_now:
                    if self._stop.is_set():
                        break
                    entry = self._entries[name]
                    try:
                        self._step(entry)
                    except Exception as e:  # a bug of ours: log it, keep the drop pending, keep going
                        self.log.error("intake_error", name=show_name(name), error=repr(e), exc_info=True)
                        entry.due = time.monotonic() + max(self.stable_seconds, 5.0)
            except Exception as e:
                self.log.error("intake_error", error=repr(e), exc_info=True)
            now = time.monotonic()
            with self._lock:
                self._idle = not (self._events or self._scan_requested or self._check_root or self._entries)
                self._working = False
                # Still arriving: changed within about one stability window (a stuck half-written file is not).
                self._settling = any(now - e.since < self.stable_seconds + SETTLE_SECONDS + 0.5
                                     for e in self._entries.values())
            due = min((e.due for e in self._entries.values()), default=now + TICK_SECONDS)
            self._wake.wait(min(TICK_SECONDS, max(0.01, due - now), max(0.01, next_scan - now)))
            self._wake.clear()

    def _scan(self, now: float) -> None:
        try:
            names = os.listdir(self.inbox)
        except OSError:
            self._check_inbox()
            return
        for name in names:
            if not ignored(name) and name not in self._entries:
                self._entries[name] = Pending(name, due=now)

    def _note(self, events: dict[str, str | None], now: float, poked: set[str]) -> None:
        for name, hint in events.items():
            if name.endswith(".toml") and not name.startswith("."):
                stem, ck = name[:-5], name[:-5] + ".safetensors"
                if ck in self._entries:
                    self._entries[ck].due = now  # a sidecar change makes its checkpoint unstable
                elif stem in self._consumed and os.path.lexists(self.inbox / name) and not os.path.lexists(self.inbox / ck):
                    del self._consumed[stem]
                    self.log.info("sidecar_left_alone", name=show_name(name), why="its checkpoint was already consumed")
            if ignored(name):
                continue
            e = self._entries.setdefault(name, Pending(name))
            e.hint = e.hint if hint is None else hint
            if e.held is None or e.held.taken is None or name in poked:  # the inbox's events are not a taken drop's
                e.due = now

    def _step(self, e: Pending) -> None:
        """Look at one pending drop once: wait, stage and deliver it, reject it, or forget it."""
        now = time.monotonic()
        path = self.inbox / e.name
        if e.held is not None and e.held.taken is not None:  # taken out of the inbox: nothing there to look at
            if os.path.lexists(e.held.staged):
                return self._deliver(e, path, e.held)
            self._drop_held(e)  # the caller took the staged copy away before asking us to retry
            return e.look_again(now)
        try:
            st = os.lstat(path)
            refuse(e.name, st)
            e.kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
            sig, tree = drop_signature(self.inbox, path, st, e.kind)
            if self._dead.get(e.name) == sig:
                return self._forget(e)
            if sig != e.sig:
                self._drop_held(e)
                e.sig, e.since = sig, now
            quiet = e.quiet(sig, self.stable_seconds)
            if now - e.since < quiet:
                raise Wait(now + min(TICK_SECONDS, e.since + quiet - now))
            if e.kind == "file" and not e.name.lower().endswith(".safetensors"):
                raise CheckpointError("not a safetensors checkpoint: name it NAME.safetensors", path=e.name,
                                      hint="or drop a folder NAME/ holding model.safetensors or shards and an index")
            if e.held is not None and not os.path.lexists(e.held.staged):
                self._drop_held(e)  # the caller took the staged copy away before asking us to retry
            arrival = e.held or self._prepare(e, path, st, tree, now)
        except Wait as w:
            e.due = w.due
            return
        except FileNotFoundError:  # FAULTS A7: gone between the event and the open
            if not os.path.lexists(path):
                self.log.debug("drop_vanished", name=show_name(e.name))
                self._dead.pop(e.name, None)
                return self._forget(e)
            e.look_again(now)  # a part of it went away
            return
        except Changed:
            e.look_again(now)
            self.log.info("drop_changed_while_reading", name=show_name(e.name))
            return
        except (Transient, OSError) as x:
            msg = x.strerror if isinstance(x, OSError) and x.strerror else str(x)
            if msg != e.error and not self._stop.is_set():
                e.error = msg
                self.log.error("drop_waiting", name=show_name(e.name), error=msg, retry_seconds=self.stable_seconds)
            e.due = now + max(self.stable_seconds, 0.05)
            return
        except Truncated as t:
            if time.monotonic() - e.since >= truncated_quiet(self.stable_seconds):
                return self._reject(e, f"{show_name(e.name)}: the file is truncated ({t}): the copy or download did "
                                       "not finish. Hint: drop the complete file again")
            e.truncated, e.hint, e.due = e.sig, None, now + TICK_SECONDS
            self.log.info("drop_incomplete", name=show_name(e.name), detail=str(t))
            return
        except CheckpointError as x:
            return self._reject(e, str(x))
        self._deliver(e, path, arrival)

    def _plan(self, e: Pending, tree: dict[str, os.stat_result], now: float) -> list[str]:
        """The checkpoint files of a folder drop (index first); waits while shards are missing (FAULTS A3)."""
        files, waiting = folder_plan(self.inbox / e.name, e.name, tree)
        if waiting is None:
            return files
        if now - e.since < self.shard_timeout_seconds:
            raise Wait(min(now + TICK_SECONDS, e.since + self.shard_timeout_seconds))
        raise CheckpointError(waiting, path=e.name, hint="copy every shard into a folder outside the inbox, then "
                                                         "move the whole folder in")

    def _prepare(self, e: Pending, path: Path, st: os.stat_result, tree: dict[str, os.stat_result],
                 now: float) -> Arrival:
        """Check the size cap, read the sidecar, copy to staging while hashing, check the copy (A1, A6, B10)."""
        if e.kind == "dir":
            files, stem = self._plan(e, tree, now), e.name
            side = path / "skill.toml" if "skill.toml" in tree else None
        else:
            files, stem = [""], e.name[:-12]
            side = self.inbox / f"{stem}.toml"
        size = sum(tree[r].st_size for r in files)
        if self.max_bytes is not None and size > self.max_bytes:
            raise CheckpointError(f"larger than the cap of {self.max_bytes} bytes ({size} bytes)", path=e.name,
                                  hint="drop a finetune of the configured base model (same size as the base)")
        sidecar = read_sidecar(side, e.name, e.kind) if side is not None else None
        final, sha, taken = self._stager.stage(e.name, e.kind, path, st, tree, files, size, e.sig)
        self.log.info("drop_staged", name=show_name(e.name), sha256=sha, size=size, ready_by=e.hint or "stable",
                      moved=taken is not None)
        return Arrival(e.name, stem, path, final, sha, size, sidecar, taken)

    # ---- outcomes ---------------------------------------------------------------------------------------------
    def _deliver(self, e: Pending, path: Path, arrival: Arrival) -> None:
        try:
            self.on_arrival(arrival)
        except RetryLater as x:
            wait = self.stable_seconds if x.seconds is None else x.seconds
            e.held, e.due = arrival, time.monotonic() + wait
            self.log.info("drop_retry_later", name=show_name(e.name), retry_seconds=wait,
                          **({"reason": x.reason} if x.reason else {}))
            return
        except SkillhubError as x:
            self._drop_held(e, arrival, give_back=False)
            if x.path is not None and Path(x.path) == Path(arrival.staged):
                x.path = Path(e.name)  # the reason names the user's drop, not our (now deleted) staged copy
            return self._reject(e, str(x), check=True, taken=arrival.taken)
        except Exception as x:
            self.log.error("on_arrival_failed", name=show_name(e.name), error=repr(x), exc_info=True)
            self._drop_held(e, arrival, give_back=False)
            return self._reject(e, f"internal error: {type(x).__name__}: {x}", check=True, taken=arrival.taken)
        e.held = None
        self._stager.hand_over(arrival.staged)  # the caller owns the staged copy now
        if arrival.taken is None and not self._unchanged(e, path):
            e.sig = None  # replaced while the caller worked: the new content is a new drop
            return
        try:
            if arrival.taken is not None:
                consume_taken(arrival.taken, path, e.sig[1] if isinstance(e.sig, tuple) else None)
            else:
                remove_consumed(self.inbox, path, e.kind, arrival.stem)
        except OSError as x:
            self.log.error("drop_not_removed", name=show_name(e.name), error=x.strerror or str(x))
            if arrival.taken is None:
                self._dead[e.name] = e.sig
        self.log.info("drop_consumed", name=show_name(e.name), sha256=arrival.sha256)
        if arrival.taken is not None and os.path.lexists(path):
            e.held, e.sig = None, None  # a new drop of the same name arrived meanwhile: look at it as such
            return
        self._consumed[arrival.stem] = None
        while len(self._consumed) > 1000:
            del self._consumed[next(iter(self._consumed))]
        self._forget(e)

    def _unchanged(self, e: Pending, path: Path) -> bool:
        try:
            return drop_signature(self.inbox, path, os.lstat(path), e.kind)[0] == e.sig
        except OSError:
            return False

    def _reject(self, e: Pending, reason: str, *, check: bool = False, taken: Path | None = None) -> None:
        """Move the drop (from ``taken`` if it was taken; and a file's sidecar) to ``inbox/.rejected/`` with
        ``<name>.reason.txt``. With ``check``, a drop in the inbox that changed meanwhile is left alone: it is new."""
        if check and taken is None and not self._unchanged(e, self.inbox / e.name):
            e.sig = None
            return
        try:
            move_to_rejected(self.inbox, e.name, e.kind, reason, source=taken)
        except FileNotFoundError:
            self.log.debug("drop_vanished", name=show_name(e.name))
        except OSError as x:
            self.log.error("reject_failed", name=show_name(e.name), error=x.strerror or str(x), reason=reason)
            self._dead[e.name] = e.sig
        else:
            self.log.warning("drop_rejected", name=show_name(e.name), reason=reason)
            if self.on_reject is not None:
                with contextlib.suppress(Exception):  # a counter never stops the intake
                    self.on_reject(reason)
        self._forget(e)

    def _drop_held(self, e: Pending, arrival: Arrival | None = None, *, give_back: bool = True) -> None:
        """Release a staged copy we made and did not hand over; delete it when nobody else holds it. A taken drop
        goes back into the inbox (unless ``give_back`` is false: the caller disposes of it)."""
        arrival, e.held = arrival or e.held, None
        if arrival is not None:
            self._stager.release(arrival.staged)
            if give_back and arrival.taken is not None and os.path.lexists(arrival.taken):
                return_taken(arrival.taken, self.inbox / e.name, self.log)
                e.sig = None

    def _forget(self, e: Pending) -> None:
        self._drop_held(e)
        self._entries.pop(e.name, None)
