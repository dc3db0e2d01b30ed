"""The fast arrival path (issue #9): a drop renamed into the inbox is staged without a stability wait, inotify events
come without watchdog's move pairing, the copy takes the fastest way the file system offers and hashes the staged
bytes, and the staged copy is not fsynced (it is verified after a reboot instead). Every check is on the intake's
decisions, events or calls, never on wall-clock time."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import skillhub.copying as copying_mod
import skillhub.staging as staging_mod
import skillhub.watcher as watcher_mod
from skillhub.intake import Intake
from skillhub.pending import quiet_after
from skillhub.staging import Stager, staged_sha256
from skillhub.watcher import CHANGED, CLOSED, GONE, MOVED_IN, InboxWatch
from test_intake import STABLE, Env, ListLogger, sha, st_bytes, wait_for

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify and boot ids are Linux's")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    for it in e.intakes:
        it.stop()


# --- no stability wait after a rename ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_moved_in_drop_is_staged_without_a_stability_wait(env: Env, tmp_path: Path, where: str) -> None:
    """With an hour-long stability window, only the move itself can make the drop ready."""
    log = ListLogger()
    env.start(stable_seconds=3600, logger=log)
    data = st_bytes(80)
    src = (env.inbox / ".moving.safetensors.part") if where == "inside" else (tmp_path / "built.safetensors")
    src.write_bytes(data)
    os.rename(src, env.inbox / "moved.safetensors")
    wait_for(lambda: env.rec.arrivals)
    assert [(a.name, a.sha256) for a in env.rec.arrivals] == [("moved.safetensors", sha(data))]
    [staged] = log.events("drop_staged")
    assert staged["ready_by"] == MOVED_IN
    wait_for(lambda: not (env.inbox / "moved.safetensors").exists())


def test_written_in_place_still_waits_for_stability(env: Env) -> None:
    """A file written in place (no rename) is not read while its stability window runs."""
    log = ListLogger()
    it = env.start(stable_seconds=3600, logger=log)
    with open(env.inbox / "inplace.safetensors", "wb") as f:  # open: no close-write yet
        f.write(st_bytes(81))
        f.flush()
        it.rescan()
        assert it.wait_idle(0.5) is False  # pending, not staged
        assert env.rec.arrivals == [] and log.events("drop_staged") == []


def test_moved_in_but_truncated_waits_then_takes_the_complete_file(env: Env, tmp_path: Path) -> None:
    """A rename of a file that is not complete after all (FAULTS A1) is held back, not rejected, and the complete
    file renamed over it later is the one staged."""
    log = ListLogger()
    env.start(logger=log)
    data = st_bytes(82, n=20_000)
    part = tmp_path / "part.safetensors"
    part.write_bytes(data[: len(data) // 2])
    os.rename(part, env.inbox / "cut.safetensors")
    wait_for(lambda: log.events("drop_incomplete"))
    assert env.rec.arrivals == [] and env.rejected() == []
    full = tmp_path / "full.safetensors"
    full.write_bytes(data)
    os.rename(full, env.inbox / "cut.safetensors")
    wait_for(lambda: env.rec.arrivals)
    assert [a.sha256 for a in env.rec.arrivals] == [sha(data)] and env.rejected() == []
    assert log.events("drop_staged")[-1]["ready_by"] == MOVED_IN


# --- the inotify backend ------------------------------------------------------------------------------------------


class Changes:
    def __init__(self) -> None:
        self.got: list[tuple[str | None, str | None]] = []
        self.overflows = 0
        self.lock = threading.Lock()

    def __call__(self, changes: list[tuple[str | None, str | None]]) -> None:
        with self.lock:
            self.got.extend(changes)

    def overflow(self) -> None:
        self.overflows += 1


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[tuple[InboxWatch, Changes, Path]]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    seen = Changes()
    w = InboxWatch(inbox, seen, on_overflow=seen.overflow, poll=False, poll_seconds=0.1, stop=threading.Event(),
                   logger=ListLogger())
    assert w.check() and not w.polling
    yield w, seen, inbox
    w.stop()


@LINUX
def test_inotify_reports_moves_without_pairing(watch: tuple[InboxWatch, Changes, Path], tmp_path: Path) -> None:
    """A rename inside the inbox is the source gone and the target moved in; a move from another folder is a move
    in too (watchdog's observer reported it as a creation, after holding the source half a second for pairing)."""
    w, seen, inbox = watch
    assert isinstance(w._watch, watcher_mod._Inotify)
    (inbox / ".a.part").write_bytes(b"x")
    os.rename(inbox / ".a.part", inbox / "a.safetensors")
    (tmp_path / "b.safetensors").write_bytes(b"y")
    os.rename(tmp_path / "b.safetensors", inbox / "b.safetensors")
    os.unlink(inbox / "b.safetensors")
    wait_for(lambda: ("b.safetensors", GONE) in seen.got)
    assert [c for c in seen.got if c[0] != ".a.part" or c[1] != CHANGED] == [
        (".a.part", CLOSED), (".a.part", GONE), ("a.safetensors", MOVED_IN), ("b.safetensors", MOVED_IN),
        ("b.safetensors", GONE)]


@LINUX
def test_inotify_never_reports_our_own_reads(watch: tuple[InboxWatch, Changes, Path]) -> None:
    _, seen, inbox = watch
    (inbox / "r.safetensors").write_bytes(b"z" * 100)
    wait_for(lambda: ("r.safetensors", CLOSED) in seen.got)
    n = len(seen.got)
    for _ in range(20):
        (inbox / "r.safetensors").read_bytes()
    (inbox / "marker").write_bytes(b"")
    wait_for(lambda: ("marker", CLOSED) in seen.got)
    assert [c for c in seen.got[n:] if c[0] != "marker"] == []


def _event(mask: int, name: bytes = b"", wd: int = 1) -> bytes:
    padded = name + b"\0" * (16 - len(name) % 16) if name else b""  # NUL-terminated, padded as the kernel does
    return struct.pack("iIII", wd, mask, 0, len(padded)) + padded


def test_inotify_parse_overflow_and_the_inbox_itself() -> None:
    calls: list[str] = []
    w = object.__new__(watcher_mod._Inotify)
    w._overflow = lambda: calls.append("overflow")
    IN = watcher_mod._IN
    buf = (_event(IN["Q_OVERFLOW"], wd=-1) + _event(IN["ATTRIB"]) + _event(IN["CREATE"], b"new.safetensors")
           + _event(IN["MOVED_TO"], b"m\xff.safetensors") + _event(IN["DELETE_SELF"]) + _event(IN["IGNORED"]))
    changes, ended = w._parse(buf)
    assert calls == ["overflow"] and ended
    assert changes == [(None, CHANGED), ("new.safetensors", CHANGED), (os.fsdecode(b"m\xff.safetensors"), MOVED_IN),
                       (None, GONE), (None, GONE)]


@LINUX
def test_inotify_ends_when_the_inbox_goes_and_check_notices(watch: tuple[InboxWatch, Changes, Path]) -> None:
    w, seen, inbox = watch
    inbox.rmdir()
    wait_for(lambda: (None, GONE) in seen.got)
    wait_for(lambda: not w._watch.alive())
    assert w.check() is False and w.health[0] is False
    inbox.mkdir()
    assert w.check() is True and w.health[0] is True


# --- the copy -----------------------------------------------------------------------------------------------------


def _copy(tmp_path: Path, data: bytes) -> tuple[str, bytes]:
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(data)
    dst.unlink(missing_ok=True)
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        digest = copying_mod._copy_stream(s, d, threading.Event())
    finally:
        os.close(s)
        os.close(d)
    return digest, dst.read_bytes()


def _no(err: int) -> Any:
    def refuse(*args: Any) -> Any:
        raise OSError(err, os.strerror(err))
    return refuse


@pytest.mark.parametrize("way", ["default", "no-reflink", "no-copy_file_range", "copy_file_range-says-0"])
def test_every_copy_way_gives_the_bytes_and_their_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       way: str) -> None:
    monkeypatch.setattr(copying_mod, "CHUNK", 4096)  # many chunks: the buffer ring is reused and hashing overlaps
    calls = {"cfr": 0, "pread": 0}
    real_cfr, real_preadv = os.copy_file_range, os.preadv

    def cfr(*a: Any) -> int:
        calls["cfr"] += 1
        return 0 if way == "copy_file_range-says-0" else real_cfr(*a)

    def preadv(*a: Any) -> int:
        calls["pread"] += 1
        return real_preadv(*a)

    if way != "default":
        monkeypatch.setattr(copying_mod.fcntl, "ioctl", _no(errno.EOPNOTSUPP))
    monkeypatch.setattr(copying_mod.os, "copy_file_range",
                        _no(errno.EXDEV) if way == "no-copy_file_range" else cfr)
    monkeypatch.setattr(copying_mod.os, "preadv", preadv)
    data = os.urandom(10 * 4096 + 123)
    digest, copied = _copy(tmp_path, data)
    assert copied == data and digest == hashlib.sha256(data).hexdigest()
    if way == "no-reflink":
        assert calls["cfr"] >= 10  # the kernel copied it, and we hashed what it wrote
    if way == "copy_file_range-says-0":
        assert calls["cfr"] == 1  # 0 at offset 0 is not trusted as the end of the file: read(2) decides


def test_a_source_that_ends_early_under_the_kernel_copy_is_a_change(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # The in-kernel copy sizes our copy to the source first; a source cut short meanwhile (FAULTS A6) must not
    # leave zeros hashed as if they were its bytes.
    monkeypatch.setattr(copying_mod, "CHUNK", 4096)
    monkeypatch.setattr(copying_mod.fcntl, "ioctl", _no(errno.EOPNOTSUPP))
    real_cfr, calls = os.copy_file_range, []

    def cfr(*a: Any) -> int:
        calls.append(a)
        return real_cfr(*a) if len(calls) < 3 else 0  # the file "ends" after two chunks
    monkeypatch.setattr(copying_mod.os, "copy_file_range", cfr)
    with pytest.raises(copying_mod.Changed):
        _copy(tmp_path, os.urandom(10 * 4096))


def test_copy_errors_other_than_unsupported_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(copying_mod.fcntl, "ioctl", _no(errno.EOPNOTSUPP))
    monkeypatch.setattr(copying_mod.os, "copy_file_range", _no(errno.ENOSPC))
    with pytest.raises(OSError) as x:
        _copy(tmp_path, b"abc" * 1000)
    assert x.value.errno == errno.ENOSPC


# --- no fsync of the staged copy; verified after a reboot instead -------------------------------------------------


def _fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(staging_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    return calls


@LINUX
def test_staged_copy_is_not_fsynced(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fsyncs(monkeypatch)
    it = env.start()
    env.drop("nosync.safetensors", st_bytes(83))
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    assert calls == []


def test_without_a_boot_id_the_staged_copy_is_fsynced(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setattr(staging_mod, "BOOT_ID", tmp_path / "no-such-boot-id")
    calls = _fsyncs(monkeypatch)
    it = env.start()
    env.drop("sync.safetensors", st_bytes(84))
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    assert len(calls) >= 2  # the file and the staging folder


def _fake_boot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, boot: str) -> None:
    path = tmp_path / f"boot-{boot}"
    path.write_text(boot + "\n")
    monkeypatch.setattr(staging_mod, "BOOT_ID", path)


def test_after_a_reboot_staged_copies_are_verified_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    good, lost = st_bytes(85), st_bytes(86)
    (staging / f"{sha(good)}.safetensors").write_bytes(good)
    (staging / f"{sha(lost)}.safetensors").write_bytes(b"\0" * len(lost))  # unwritten pages after a power cut
    folder = staging / ("0" * 64)  # a folder copy whose name does not match its files
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(good)
    (staging / "unrelated.txt").write_text("left alone")
    _fake_boot(monkeypatch, tmp_path, "boot-1")
    (staging / ".boot-id").write_text("boot-0\n")
    hashed: list[Path] = []
    real = staging_mod.staged_sha256
    monkeypatch.setattr(staging_mod, "staged_sha256", lambda p: (hashed.append(p), real(p))[1])
    log = ListLogger()
    stager = Stager(tmp_path / "inbox", staging, threading.Event())
    removed = stager.check_after_reboot(log.warning)
    assert sorted(removed) == sorted([staging / f"{sha(lost)}.safetensors", folder])
    assert sorted(p.name for p in staging.iterdir()) == sorted([".boot-id", f"{sha(good)}.safetensors",
                                                                "unrelated.txt"])
    assert len(log.events("staged_copy_lost")) == 2 and len(hashed) == 3
    hashed.clear()
    assert stager.check_after_reboot(log.warning) == [] and hashed == []  # same boot: nothing hashed


def test_intake_start_verifies_staged_copies_after_a_reboot(env: Env, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    env.staging.mkdir(parents=True)
    lost = st_bytes(87)
    (env.staging / f"{sha(lost)}.safetensors").write_bytes(lost[:100])
    (env.staging / ".boot-id").write_text("an-earlier-boot\n")
    _fake_boot(monkeypatch, tmp_path, "this-boot")
    it = env.start()
    assert env.staged() == []
    env.drop("again.safetensors", lost)  # the same bytes again: staged afresh, not taken from the lost copy
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    assert (env.staging / f"{sha(lost)}.safetensors").read_bytes() == lost


def test_staged_sha256_of_a_folder_matches_the_stager(env: Env, tmp_path: Path) -> None:
    it = env.start()
    outside = tmp_path / "build"
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(st_bytes(88))
    os.rename(outside, env.inbox / "folder")
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    [a] = env.rec.arrivals
    assert staged_sha256(a.staged) == a.sha256


def test_a_small_stable_window_still_applies_to_plain_writes(env: Env) -> None:
    """Sanity: the quiet time of a plain write is ``stable_seconds``, of a close-write the short settle."""
    it: Intake = env.start()
    quiet = functools.partial(quiet_after, stable_seconds=it.stable_seconds)
    assert quiet(None) == STABLE and quiet(CHANGED) == STABLE and quiet(MOVED_IN) == 0.0
    assert 0 < quiet(CLOSED) < STABLE
