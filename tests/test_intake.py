"""Intake against a real watchdog observer on a real folder (FAULTS A1-A12, B2, B10): real files, some written by a
child process; every wait is a poll with a deadline."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import skillhub.staging as staging_mod
import skillhub.watcher as watcher_mod
from skillhub.errors import CheckpointError
from skillhub.intake import Arrival, Intake, RetryLater

STABLE = 0.3


def st_bytes(seed: int, n: int = 2048) -> bytes:
    """A valid little safetensors file: one F32 tensor of ``n`` values."""
    rnd = random.Random(seed)
    data = struct.pack(f"<{n}f", *(rnd.uniform(-1, 1) for _ in range(n)))
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_sha(files: dict[str, bytes]) -> str:
    lines = sorted(f"{name}\0{sha(data)}\n" for name, data in files.items())
    return sha("".join(lines).encode())


def staged_sha(path: Path) -> str:
    if path.is_dir():
        return folder_sha({p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()})
    return sha(path.read_bytes())


def wait_for(pred: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {pred}")


class Recorder:
    """``on_arrival`` that records arrivals and checks the staged copy against the arrival's hash."""

    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self.behaviour: Callable[[Arrival], None] | None = None
        self.lock = threading.Lock()

    def __call__(self, a: Arrival) -> None:
        assert staged_sha(a.staged) == a.sha256  # never an arrival with inconsistent content
        with self.lock:
            self.arrivals.append(a)
        if self.behaviour is not None:
            self.behaviour(a)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.arrivals]


class Env:
    def __init__(self, root: Path) -> None:
        self.inbox, self.staging = root / "inbox", root / "state" / "staging"
        self.inbox.mkdir()
        self.rec = Recorder()
        self.intakes: list[Intake] = []

    def start(self, **kw: Any) -> Intake:
        kw.setdefault("stable_seconds", STABLE)
        it = Intake(self.inbox, self.staging, self.rec, **kw)
        self.intakes.append(it)
        it.start()
        return it

    def drop(self, name: str, data: bytes) -> Path:
        """Write a file atomically into the inbox (write beside it under a temp name, then rename into place)."""
        tmp = self.inbox / ".incoming.tmp"
        tmp.write_bytes(data)
        os.rename(tmp, self.inbox / name)
        return self.inbox / name

    def drop_open(self, name: str, data: bytes) -> int:
        """Like :meth:`drop`, but the dropper keeps the file open for writing (the returned fd, the caller closes it):
        then intake must copy it, never move it (skillhub.taking)."""
        tmp = self.inbox / ".incoming.tmp"
        tmp.write_bytes(data)
        fd = os.open(tmp, os.O_WRONLY)
        os.rename(tmp, self.inbox / name)
        return fd

    def reason(self, name: str) -> str:
        return (self.inbox / ".rejected" / f"{name}.reason.txt").read_text()

    def staged(self) -> list[str]:
        """The staged copies (names in the staging folder, without our bookkeeping dot-files)."""
        return sorted(p.name for p in self.staging.iterdir() if not p.name.startswith("."))

    def rejected(self) -> list[str]:
        d = self.inbox / ".rejected"
        return sorted(os.listdir(d)) if d.exists() else []

    def settle(self, it: Intake) -> None:
        it.rescan()
        assert it.wait_idle(10)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    for it in e.intakes:
        it.stop()
    assert not [p for p in e.staging.iterdir() if p.name.endswith(".tmp")] if e.staging.exists() else True


def test_file_with_sidecar_arrives_once_and_is_consumed(env: Env) -> None:
    it = env.start()
    data = st_bytes(1)
    (env.inbox / "cats.toml").write_text('skill = "cats"\nclasses = ["tabby", "lion"]\n')
    env.drop("cats.safetensors", data)
    wait_for(lambda: env.rec.arrivals)
    a = env.rec.arrivals[0]
    assert (a.name, a.stem, a.sha256, a.size) == ("cats.safetensors", "cats", sha(data), len(data))
    assert a.sidecar == {"skill": "cats", "classes": ["tabby", "lion"]}
    assert a.staged == env.staging / f"{sha(data)}.safetensors" and a.staged.read_bytes() == data
    wait_for(lambda: not (env.inbox / "cats.safetensors").exists() and not (env.inbox / "cats.toml").exists())
    env.settle(it)
    assert len(env.rec.arrivals) == 1 and env.rejected() == []
    assert it.health == (True, f"watching {env.inbox}")


SLOW_WRITER = """
import sys, time
path, data, close_between = sys.argv[1], open(sys.argv[2], "rb").read(), sys.argv[3] == "1"
cut = len(data) * 4 // 10
f = open(path, "wb"); f.write(data[:cut]); f.flush()
if close_between:
    f.close()
time.sleep(1.5)
if close_between:
    f = open(path, "ab")
f.write(data[cut:]); f.close()
"""


@pytest.mark.parametrize("close_between", [False, True], ids=["open", "close-reopen"])
def test_a1_slow_writer_ingested_once_complete(env: Env, tmp_path: Path, close_between: bool) -> None:
    it = env.start()
    data = st_bytes(2, n=100_000)
    src = tmp_path / "full.bin"
    src.write_bytes(data)
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(env.inbox / "slow.safetensors"), str(src),
                              "1" if close_between else "0"])
    try:
        wait_for(lambda: env.rec.arrivals, timeout=15)
    finally:
        assert child.wait(10) == 0
    env.settle(it)
    assert [a.sha256 for a in env.rec.arrivals] == [sha(data)]
    assert env.rejected() == []


def test_a2_temp_names_ignored_until_renamed(env: Env) -> None:
    it = env.start()
    data = st_bytes(3)
    for name in ("x.safetensors.part", ".x.safetensors", "x.tmp", "x.partial", "x.incomplete", "lonely.toml"):
        (env.inbox / name).write_bytes(data)
    env.settle(it)
    time.sleep(2 * STABLE)
    env.settle(it)
    assert env.rec.arrivals == [] and env.rejected() == []
    os.rename(env.inbox / "x.safetensors.part", env.inbox / "x.safetensors")
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    assert env.rec.names == ["x.safetensors"] and env.rec.arrivals[0].sha256 == sha(data)
    assert (env.inbox / ".x.safetensors").exists() and (env.inbox / "lonely.toml").exists()


def write_folder(folder: Path, shards: dict[str, bytes], index: dict[str, str] | None, **extra: bytes) -> None:
    folder.mkdir()
    for name, data in shards.items():
        (folder / name).write_bytes(data)
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    for name, data in extra.items():
        (folder / name.replace("_", ".")).write_bytes(data)


def test_a3_missing_shard_rejected_after_timeout(env: Env, tmp_path: Path) -> None:
    env.start(shard_timeout_seconds=1.0)
    outside = tmp_path / "build"
    write_folder(outside, {"a.safetensors": st_bytes(4)}, {"x": "a.safetensors", "y": "b.safetensors"})
    os.rename(outside, env.inbox / "sharded")
    t0 = time.monotonic()
    wait_for(lambda: (env.inbox / ".rejected" / "sharded.reason.txt").exists())
    assert time.monotonic() - t0 >= 0.9
    assert "missing shards: b.safetensors" in env.reason("sharded")
    assert (env.inbox / ".rejected" / "sharded" / "a.safetensors").exists() and env.rec.arrivals == []


def test_a3_shards_arriving_late_are_waited_for(env: Env) -> None:
    it = env.start(shard_timeout_seconds=30)
    folder = env.inbox / "late"
    write_folder(folder, {"a.safetensors": st_bytes(5)}, {"x": "a.safetensors", "y": "b.safetensors"})
    time.sleep(4 * STABLE)
    assert env.rec.arrivals == [] and env.rejected() == []
    (folder / "b.safetensors").write_bytes(st_bytes(6))
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    assert env.rec.names == ["late"] and not folder.exists()


def test_a3_complete_folder_moved_in(env: Env, tmp_path: Path) -> None:
    it = env.start()
    shards = {"a.safetensors": st_bytes(7), "b.safetensors": st_bytes(8)}
    index = {"x": "a.safetensors", "y": "b.safetensors"}
    outside = tmp_path / "build"
    write_folder(outside, shards, index, skill_toml=b'skill = "dogs"\n', README_md=b"not staged")
    os.rename(outside, env.inbox / "dogs")
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    [a] = env.rec.arrivals
    files = {**shards, "model.safetensors.index.json": (env.staging / a.sha256 / "model.safetensors.index.json")
             .read_bytes()}
    assert (a.name, a.stem, a.sidecar, a.sha256) == ("dogs", "dogs", {"skill": "dogs"}, folder_sha(files))
    assert a.staged == env.staging / a.sha256 and sorted(os.listdir(a.staged)) == sorted(files)
    assert a.size == sum(len(v) for v in files.values())
    assert not (env.inbox / "dogs").exists() and env.rejected() == []


def test_a3_single_model_safetensors_folder(env: Env) -> None:
    it = env.start()
    write_folder(env.inbox / "plain", {"model.safetensors": st_bytes(9)}, None)
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    assert os.listdir(env.rec.arrivals[0].staged) == ["model.safetensors"]


def test_a_folder_drops_examples_are_staged_with_it(env: Env, tmp_path: Path) -> None:
    # README: a folder drop may bring examples.safetensors or examples/<class>/*.png|jpg; staging copied only the
    # model files, so the trained strategy never saw them.
    src = tmp_path / "cats"
    write_folder(src, {"model.safetensors": st_bytes(11), "examples.safetensors": st_bytes(12)}, None)
    (src / "examples" / "tabby").mkdir(parents=True)
    (src / "examples" / "tabby" / "0.png").write_bytes(b"\x89PNG not really")
    (src / "examples" / "tabby" / "notes.txt").write_text("left behind")
    it = env.start()
    os.rename(src, env.inbox / "cats")
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    staged = env.rec.arrivals[0].staged
    assert sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()) == [
        "examples.safetensors", "examples/tabby/0.png", "model.safetensors"]
    assert env.rejected() == []


@pytest.mark.parametrize("shard", ["../evil.safetensors", "/etc/evil.safetensors"])
def test_a3_shard_path_leaving_folder_rejected(env: Env, tmp_path: Path, shard: str) -> None:
    env.start()
    outside = tmp_path / "build"
    write_folder(outside, {"a.safetensors": st_bytes(10)}, {"x": "a.safetensors", "y": shard})
    os.rename(outside, env.inbox / "escape")
    wait_for(lambda: "escape.reason.txt" in env.rejected())
    assert "leaves the folder" in env.reason("escape") and env.rec.arrivals == []


def test_a4_same_bytes_under_two_names(env: Env) -> None:
    it = env.start()
    data = st_bytes(11)
    env.drop("one.safetensors", data)
    env.drop("two.safetensors", data)
    wait_for(lambda: len(env.rec.arrivals) == 2)
    env.settle(it)
    assert sorted(env.rec.names) == ["one.safetensors", "two.safetensors"]
    assert {a.sha256 for a in env.rec.arrivals} == {sha(data)}  # dedup by hash is the caller's job


def test_a4_duplicate_events_and_rescans_process_once(env: Env) -> None:
    it = env.start()
    data = st_bytes(12)
    path = env.drop("dup.safetensors", data)

    def slow(a: Arrival) -> None:  # while we process: more events and rescans for the same path
        for _ in range(5):
            with open(path, "ab"):
                pass
            it.rescan()
            time.sleep(0.05)

    env.rec.behaviour = slow
    for _ in range(5):
        with open(path, "ab"):
            pass
        it.rescan()
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    assert env.rec.names == ["dup.safetensors"]


def test_a6_rewritten_during_copy(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = st_bytes(13), st_bytes(14)
    real = staging_mod._copy_stream
    calls: list[int] = []

    def racing(src: int, dst: int, stop: threading.Event) -> str:
        digest = real(src, dst, stop)
        if not calls:  # the writer rewrites the file while we are reading it
            (env.inbox / "race.safetensors").write_bytes(second)
        calls.append(digest)
        return digest

    monkeypatch.setattr(staging_mod, "_copy_stream", racing)
    it = env.start()
    fd = env.drop_open("race.safetensors", first)  # the writer still holds it: copied, and rewritten meanwhile
    wait_for(lambda: env.rec.arrivals)
    os.close(fd)
    env.settle(it)
    assert len(calls) >= 2
    assert [a.sha256 for a in env.rec.arrivals] == [sha(second)] and env.rejected() == []


def test_a7_deleted_between_event_and_open(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    real = staging_mod._open_source

    def vanish_first(path: Path) -> int:
        if path.name == "gone.safetensors":
            path.unlink(missing_ok=True)
        return real(path)

    monkeypatch.setattr(staging_mod, "_open_source", vanish_first)
    it = env.start()
    for i in range(5):
        p = env.inbox / f"flash{i}.safetensors"
        p.write_bytes(st_bytes(15))
        p.unlink()
    env.drop("gone.safetensors", st_bytes(16))
    env.settle(it)
    time.sleep(2 * STABLE)
    env.settle(it)
    assert env.rec.arrivals == [] and env.rejected() == []


def test_a8_files_present_before_start(env: Env) -> None:
    env.drop("early.safetensors", st_bytes(17))
    it = env.start(rescan_seconds=3600)
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    assert env.rec.names == ["early.safetensors"]


def test_a8_rescan_finds_what_a_blind_observer_missed(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watcher_mod.InboxWatch, "_deliver", lambda self, changes: None)
    it = env.start(rescan_seconds=3600)
    assert it.wait_idle(5)
    env.drop("missed.safetensors", st_bytes(18))
    time.sleep(3 * STABLE)
    assert it.wait_idle(5) and env.rec.arrivals == []
    it.rescan()
    wait_for(lambda: env.rec.arrivals)
    assert env.rec.names == ["missed.safetensors"]


@pytest.mark.parametrize("poll", [False, True], ids=["inotify", "polling"])
def test_a9_inbox_deleted_and_recreated(env: Env, poll: bool) -> None:
    it = env.start(poll=poll, rescan_seconds=3600)
    assert it.health[0]
    shutil.rmtree(env.inbox)
    wait_for(lambda: not it.health[0])
    assert it.health == (False, f"inbox missing: {env.inbox}; retrying")
    env.inbox.mkdir()
    wait_for(lambda: it.health[0])
    env.drop("back.safetensors", st_bytes(19))
    wait_for(lambda: env.rec.arrivals)
    assert env.rec.names == ["back.safetensors"] and it.health == (True, f"watching {env.inbox}")


def test_a9_missing_at_start_does_not_crash(env: Env) -> None:
    shutil.rmtree(env.inbox)
    it = env.start()
    assert it.health[0] is False and "inbox missing" in it.health[1]
    env.inbox.mkdir()
    wait_for(lambda: it.health[0])


def test_a10_symlink_and_fifo_rejected_without_blocking(env: Env, tmp_path: Path) -> None:
    target = tmp_path / "real.safetensors"
    target.write_bytes(st_bytes(20))
    (tmp_path / "realdir").mkdir()
    it = env.start()
    os.symlink(target, env.inbox / "link.safetensors")
    os.symlink(tmp_path / "realdir", env.inbox / "linkdir")
    os.mkfifo(env.inbox / "pipe.safetensors")
    wait_for(lambda: {"link.safetensors.reason.txt", "pipe.safetensors.reason.txt", "linkdir.reason.txt"}
             <= set(env.rejected()))
    env.settle(it)
    assert "symbolic link" in env.reason("link.safetensors") and "symbolic link" in env.reason("linkdir")
    assert "FIFO" in env.reason("pipe.safetensors")
    assert target.exists() and (tmp_path / "realdir").is_dir() and env.rec.arrivals == []


NAMES = ["new\nline", "ünï€ødé ☃", "-rf --no-preserve-root", "a" * 200, os.fsdecode(b"bad\xff\xfebytes")]


def test_a11_hostile_names(env: Env) -> None:
    it = env.start()
    for i, stem in enumerate(NAMES):
        env.drop(f"{stem}.safetensors", st_bytes(30 + i))
    wait_for(lambda: len(env.rec.arrivals) == len(NAMES))
    env.settle(it)
    assert sorted(a.stem for a in env.rec.arrivals) == sorted(NAMES)
    assert os.listdir(env.inbox) == []


def test_a11_hostile_names_rejected_with_reason(env: Env) -> None:
    def refuse(a: Arrival) -> None:
        raise CheckpointError("does not match the base model", path=a.name)

    env.rec.behaviour = refuse
    it = env.start()
    long = "b" * 250  # with ".reason.txt" this would exceed NAME_MAX
    for stem in ("new\nline", long):
        env.drop(f"{stem}.safetensors" if len(stem) < 240 else stem, st_bytes(40))
    wait_for(lambda: len(env.rejected()) == 4)
    env.settle(it)
    assert "new\\nline.safetensors: does not match" in env.reason("new\nline.safetensors")
    assert long in env.rejected() and any(n.startswith("b" * 200 + "-") for n in env.rejected())


def test_a12_permission_denied_retried_others_go_on(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    real = staging_mod._open_source
    denied = threading.Event()
    denied.set()
    attempts: list[str] = []

    def guarded(path: Path) -> int:
        if path.name == "locked.safetensors" and denied.is_set():
            attempts.append(path.name)
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(staging_mod, "_open_source", guarded)
    it = env.start()
    env.drop("locked.safetensors", st_bytes(50))
    env.drop("open.safetensors", st_bytes(51))
    wait_for(lambda: env.rec.names == ["open.safetensors"])
    wait_for(lambda: len(attempts) >= 2)  # retried, still pending, not rejected
    assert env.rejected() == [] and not it.wait_idle(0.1)
    denied.clear()
    wait_for(lambda: len(env.rec.arrivals) == 2)
    env.settle(it)
    assert env.rejected() == []


def test_b2_pickle_rejected_at_once_never_opened(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real = staging_mod._open_source

    def spy(p: Path) -> int:
        opened.append(p.name)
        return real(p)

    monkeypatch.setattr(staging_mod, "_open_source", spy)
    it = env.start()
    for name in ("evil.pt", "evil.bin", "evil.pkl"):
        (env.inbox / name).write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")
    wait_for(lambda: len(env.rejected()) == 6)
    env.settle(it)
    assert "skillhub convert" in env.reason("evil.pt") and opened == []


def test_unknown_extension_and_bad_content_rejected(env: Env) -> None:
    it = env.start()
    (env.inbox / "notes.txt").write_text("hello")
    env.drop("pointer.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    wait_for(lambda: len(env.rejected()) == 4)
    env.settle(it)
    assert "not a safetensors checkpoint: name it NAME.safetensors" in env.reason("notes.txt")
    assert "git-lfs pointer" in env.reason("pointer.safetensors") and "What to do" in env.reason("notes.txt")
    assert env.rec.arrivals == []


def test_on_arrival_error_rejects_with_reason_and_removes_staged(env: Env) -> None:
    def refuse(a: Arrival) -> None:
        raise CheckpointError("shape mismatch: w [3] vs base [4]", path=a.name, hint="drop a finetune of the base")

    env.rec.behaviour = refuse
    it = env.start()
    (env.inbox / "bad.toml").write_text("skill = 'bad'\n")
    env.drop("bad.safetensors", st_bytes(60))
    wait_for(lambda: "bad.safetensors.reason.txt" in env.rejected())
    env.settle(it)
    reason = env.reason("bad.safetensors")
    assert "shape mismatch: w [3] vs base [4]" in reason and "drop a finetune of the base" in reason
    assert set(env.rejected()) == {"bad.safetensors", "bad.toml", "bad.safetensors.reason.txt"}
    assert env.staged() == [] and os.listdir(env.inbox) == [".rejected"]


def test_on_arrival_crash_is_an_internal_error_and_worker_survives(env: Env) -> None:
    def crash(a: Arrival) -> None:
        if a.name == "boom.safetensors":
            raise ZeroDivisionError("oops")

    env.rec.behaviour = crash
    it = env.start()
    env.drop("boom.safetensors", st_bytes(61))
    wait_for(lambda: "boom.safetensors.reason.txt" in env.rejected())
    assert "internal error: ZeroDivisionError: oops" in env.reason("boom.safetensors")
    env.drop("fine.safetensors", st_bytes(62))
    wait_for(lambda: "fine.safetensors" in env.rec.names)
    env.settle(it)


def test_rejected_entry_replaces_an_older_one(env: Env) -> None:
    it = env.start()
    (env.inbox / "dup.txt").write_text("one")
    wait_for(lambda: "dup.txt.reason.txt" in env.rejected())
    (env.inbox / "dup.txt").write_text("two")
    wait_for(lambda: (env.inbox / ".rejected" / "dup.txt").read_text() == "two")
    env.settle(it)
    assert env.rejected() == ["dup.txt", "dup.txt.reason.txt"]


def test_retry_later_keeps_pending_then_delivers(env: Env) -> None:
    calls: list[float] = []

    def busy(a: Arrival) -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise RetryLater()

    env.rec.behaviour = busy
    it = env.start()
    data = st_bytes(63)
    env.drop("later.safetensors", data)
    wait_for(lambda: len(calls) == 3)
    env.settle(it)
    assert calls[1] - calls[0] >= STABLE * 0.9 and len({a.staged for a in env.rec.arrivals}) == 1
    assert not (env.inbox / "later.safetensors").exists() and env.rejected() == []
    assert env.staged() == [f"{sha(data)}.safetensors"]


def test_max_bytes_cap_rejects_before_copying(env: Env) -> None:
    it = env.start(max_bytes=1000)
    env.drop("huge.safetensors", st_bytes(64))
    wait_for(lambda: "huge.safetensors.reason.txt" in env.rejected())
    env.settle(it)
    assert "larger than the cap of 1000 bytes" in env.reason("huge.safetensors")
    assert env.staged() == []


def test_disk_full_keeps_pending_until_space_returns(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage
    full = threading.Event()
    full.set()

    def usage(path: Any) -> Any:
        u = real(path)
        return u._replace(free=10) if full.is_set() else u

    monkeypatch.setattr(staging_mod.shutil, "disk_usage", usage)
    it = env.start()
    fd = env.drop_open("wait.safetensors", st_bytes(65))  # held open, so it must be copied: that needs space
    time.sleep(4 * STABLE)
    assert env.rec.arrivals == [] and env.rejected() == [] and not it.wait_idle(0.1)
    full.clear()
    wait_for(lambda: env.rec.arrivals)
    os.close(fd)
    env.settle(it)


def test_bad_sidecar_toml_rejected_naming_it(env: Env) -> None:
    it = env.start()
    (env.inbox / "side.toml").write_text('skill = "ok"\nclasses = [1, 2\n')
    env.drop("side.safetensors", st_bytes(66))
    wait_for(lambda: "side.safetensors.reason.txt" in env.rejected())
    env.settle(it)
    reason = env.reason("side.safetensors")
    assert "side.toml" in reason and "line" in reason and env.rec.arrivals == []


def test_sidecar_after_consumption_left_alone(env: Env) -> None:
    it = env.start()
    env.drop("solo.safetensors", st_bytes(67))
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    (env.inbox / "solo.toml").write_text("skill = 'solo'\n")
    env.settle(it)
    assert (env.inbox / "solo.toml").exists() and env.rejected() == []


def test_truncated_file_rejected_only_after_staying_truncated(env: Env) -> None:
    it = env.start()
    data = st_bytes(68)
    (env.inbox / "cut.safetensors").write_bytes(data[: len(data) // 2])
    t0 = time.monotonic()
    wait_for(lambda: "cut.safetensors.reason.txt" in env.rejected(), timeout=15)
    assert time.monotonic() - t0 >= 4.5
    assert "truncated" in env.reason("cut.safetensors") and env.rec.arrivals == []
    env.settle(it)


def test_stop_during_copy_leaves_no_temp(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    real = staging_mod._copy_stream
    copying = threading.Event()

    def slow(src: int, dst: int, stop: threading.Event) -> str:
        copying.set()
        stop.wait(10)
        return real(src, dst, stop)

    monkeypatch.setattr(staging_mod, "_copy_stream", slow)
    it = env.start()
    fd = env.drop_open("big.safetensors", st_bytes(69))  # seen open, so copied
    assert copying.wait(10)
    os.close(fd)
    it.stop()
    assert env.staged() == [] and it.health == (False, "stopped")
    assert (env.inbox / "big.safetensors").exists() and env.rec.arrivals == []


class ListLogger:
    """A structlog-style logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **kw: self.records.append((level, event, kw))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [kw for _, ev, kw in self.records if ev == name]


def test_a11_names_escaped_in_logs(env: Env) -> None:
    log = ListLogger()
    it = env.start(logger=log)
    env.drop("evil\n[error] forged line\x1b[31m.safetensors", st_bytes(70))
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    logged = [kw["name"] for _, _, kw in log.records if "name" in kw]
    assert logged and all("\n" not in n and "\x1b" not in n for n in logged)
    assert "evil\\n[error] forged line\\x1b[31m.safetensors" in logged


def test_sidecar_after_consumption_is_logged_and_left_alone(env: Env) -> None:
    log = ListLogger()
    it = env.start(logger=log)
    env.drop("late.safetensors", st_bytes(71))
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    (env.inbox / "late.toml").write_text("skill = 'late'\n")
    wait_for(lambda: log.events("sidecar_left_alone"))
    env.settle(it)
    assert (env.inbox / "late.toml").exists() and env.rejected() == []


def test_inotify_failure_falls_back_to_polling(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_inotify(*args: Any) -> Any:
        raise OSError(24, "inotify instance limit reached")

    monkeypatch.setattr(watcher_mod, "_Inotify", no_inotify)
    monkeypatch.setattr(watcher_mod, "Observer", no_inotify)
    log = ListLogger()
    it = env.start(logger=log)
    assert it.health[0] and log.events("inotify_unavailable")
    env.drop("polled.safetensors", st_bytes(72))
    wait_for(lambda: env.rec.arrivals)
    assert env.rec.names == ["polled.safetensors"]


def test_folder_with_symlinked_shard_rejected(env: Env, tmp_path: Path) -> None:
    env.start()
    outside = tmp_path / "build"
    write_folder(outside, {"a.safetensors": st_bytes(73)}, {"x": "a.safetensors", "y": "b.safetensors"})
    (tmp_path / "elsewhere.safetensors").write_bytes(st_bytes(74))
    os.symlink(tmp_path / "elsewhere.safetensors", outside / "b.safetensors")
    os.rename(outside, env.inbox / "linky")
    wait_for(lambda: "linky.reason.txt" in env.rejected())
    assert "b.safetensors is not a regular file" in env.reason("linky") and env.rec.arrivals == []
