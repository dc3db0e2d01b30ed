"""Taking a drop out of the inbox instead of copying it (skillhub.taking): moved only when a write lease proves
nobody else holds it open and it has one name; given back on a failure, a stop, or after a crash; never when someone
opened it meanwhile. Real files, real leases, real other processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import skillhub.staging as staging_mod
from skillhub.copying import Changed
from skillhub.drops import Arrival, RetryLater
from skillhub.errors import CheckpointError
from skillhub.staging import _open_drop
from skillhub.taking import TAKEN, give_back_all, take
from test_intake import Env, ListLogger, env, sha, st_bytes, wait_for  # noqa: F401 (env: the fixture)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="write leases are Linux's")


def _no_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: int, dst: int, stop: threading.Event) -> str:
        raise AssertionError("copied a drop that nobody held open")

    monkeypatch.setattr(staging_mod, "_copy_stream", refuse)


def test_a_drop_nobody_holds_open_is_moved_not_copied(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_copy(monkeypatch)
    seen: list[tuple[int, bool]] = []
    env.rec.behaviour = lambda a: seen.append((os.stat(a.staged).st_ino, (env.inbox / a.name).exists()))
    it = env.start()
    data = st_bytes(101)
    tmp = env.inbox / ".moved.part"
    tmp.write_bytes(data)
    ino = os.stat(tmp).st_ino  # before the rename: the intake may take it at once
    os.rename(tmp, env.inbox / "moved.safetensors")
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    (a,) = env.rec.arrivals
    assert a.sha256 == sha(data) and a.taken == env.staging / TAKEN / "moved.safetensors"
    assert seen == [(ino, False)]  # the same inode, no longer reachable from the inbox while the caller works
    assert os.listdir(env.inbox) == [] and os.listdir(env.staging / TAKEN) == []
    assert env.staged() == [f"{sha(data)}.safetensors"] and (env.staging / env.staged()[0]).read_bytes() == data


def test_a_drop_held_open_for_writing_is_copied(env: Env) -> None:
    it = env.start()
    data = st_bytes(102)
    fd = env.drop_open("open.safetensors", data)
    try:
        wait_for(lambda: env.rec.arrivals)
        (a,) = env.rec.arrivals
        assert a.taken is None and os.stat(a.staged).st_ino != os.fstat(fd).st_ino
    finally:
        os.close(fd)
    env.settle(it)
    assert os.listdir(env.inbox) == [] and (env.staging / env.staged()[0]).read_bytes() == data


def test_a_drop_with_a_second_name_is_copied(env: Env, tmp_path: Path) -> None:
    it = env.start()
    data = st_bytes(103)
    src = tmp_path / "elsewhere.safetensors"
    src.write_bytes(data)
    os.link(src, env.inbox / "linked.safetensors")  # whoever holds the other name could still write these bytes
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    (a,) = env.rec.arrivals
    assert a.taken is None and os.stat(a.staged).st_ino != os.stat(src).st_ino
    assert src.read_bytes() == data


def test_someone_opening_it_while_it_is_taken_gets_it_back(tmp_path: Path) -> None:
    """A real other process opens the drop by its inbox path while the lease is held: its open waits for the lease,
    the lease shows the break, and the file goes back into the inbox; the break's signal does not end us."""
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    path = inbox / "x.safetensors"
    path.write_bytes(st_bytes(104))
    opener = textwrap.dedent(f"""
        import os, sys
        print("opening", flush=True)
        fd = os.open({str(path)!r}, os.O_RDWR)  # blocks until the lease holder lets go
        print("opened", flush=True)
        sys.stdin.read()
    """)
    child: list[subprocess.Popen[str]] = []

    def check(fd: int) -> None:
        p = subprocess.Popen([sys.executable, "-c", opener], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        child.append(p)
        assert p.stdout is not None and p.stdout.readline() == "opening\n"
        time.sleep(0.5)  # let it reach open(2) and wait on our lease

    with pytest.raises(Changed):
        take(path, os.lstat(path), staging, check, opener=_open_drop)
    p = child[0]
    try:
        assert p.stdout is not None and p.stdout.readline() == "opened\n"
        assert path.read_bytes() == st_bytes(104) and os.listdir(staging / TAKEN) == []
        # The other process holds it open (for writing): no lease, so no take; the caller copies instead.
        assert take(path, os.lstat(path), staging, lambda fd: None, opener=_open_drop) is None
    finally:
        p.communicate("")
    taken = take(path, os.lstat(path), staging, lambda fd: None, opener=_open_drop)
    assert taken == staging / TAKEN / "x.safetensors" and not path.exists()
    assert signal.getsignal(signal.SIGURG) == signal.SIG_DFL  # we never needed a handler


def test_a_drop_linked_elsewhere_while_it_is_taken_gets_it_back(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A link made while the lease is held breaks no lease, but the other name could still write the bytes."""
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    path = inbox / "l.safetensors"
    path.write_bytes(st_bytes(112))
    real_link = os.link

    def link_and_race(src: Any, dst: Any) -> None:
        real_link(src, dst)
        if Path(dst).parent.name == TAKEN:  # someone else links it just as we take it
            real_link(src, tmp_path / "other-name")

    monkeypatch.setattr(os, "link", link_and_race)
    with pytest.raises(Changed):
        take(path, os.lstat(path), staging, lambda fd: None, opener=_open_drop)
    monkeypatch.undo()
    assert path.read_bytes() == st_bytes(112) and os.listdir(staging / TAKEN) == []
    assert take(path, os.lstat(path), staging, lambda fd: None, opener=_open_drop) is None  # two names: copy it


def test_a_failed_check_leaves_the_drop_in_the_inbox(tmp_path: Path) -> None:
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    path = inbox / "bad.safetensors"
    path.write_bytes(b"not safetensors at all")

    def check(fd: int) -> None:
        raise CheckpointError("bad header", path=path.name)

    with pytest.raises(CheckpointError):
        take(path, os.lstat(path), staging, check, opener=_open_drop)
    assert path.read_bytes() == b"not safetensors at all"
    assert not (staging / TAKEN).exists() or os.listdir(staging / TAKEN) == []


def test_a_drop_written_after_it_was_judged_stable_is_not_taken(tmp_path: Path) -> None:
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    path = inbox / "y.safetensors"
    path.write_bytes(st_bytes(105))
    judged = os.lstat(path)
    time.sleep(0.01)
    with open(path, "ab") as f:
        f.write(b"more")
    with pytest.raises(Changed):
        take(path, judged, staging, lambda fd: None, opener=_open_drop)
    assert path.exists()


CRASHER = """
import os, signal, sys
sys.path[:0] = [{src!r}, {tests!r}]
from pathlib import Path
from skillhub.intake import Intake
def die(arrival):
    print("arrived", arrival.taken, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the service dies while the drop is localized
it = Intake(Path({inbox!r}), Path({staging!r}), die, stable_seconds=0.2)
it.start()
import time; time.sleep(30)
"""


def test_a_crash_while_localizing_loses_no_drop(env: Env) -> None:
    """A real service process is killed while the drop is out of the inbox: the next start puts it back, and it is
    delivered then (FAULTS A8)."""
    data = st_bytes(106)
    env.drop("crash.safetensors", data)
    src = str(Path(staging_mod.__file__).resolve().parents[1])
    code = CRASHER.format(src=src, tests=str(Path(__file__).parent), inbox=str(env.inbox), staging=str(env.staging))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGKILL and "arrived" in out.stdout and ".taken" in out.stdout, out.stderr
    assert os.listdir(env.inbox) == [] and os.listdir(env.staging / TAKEN) == ["crash.safetensors"]
    it = env.start()
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    assert [a.sha256 for a in env.rec.arrivals] == [sha(data)]
    assert os.listdir(env.inbox) == [] and os.listdir(env.staging / TAKEN) == []


def test_a_drop_given_back_after_a_newer_one_took_its_name_is_superseded(tmp_path: Path) -> None:
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    (staging / TAKEN).mkdir(parents=True)
    inbox.mkdir()
    (staging / TAKEN / "s.safetensors").write_bytes(b"old")
    (staging / TAKEN / "t.safetensors").write_bytes(b"only")
    (inbox / "s.safetensors").write_bytes(b"newer")
    log = ListLogger()
    assert give_back_all(staging, inbox, log) == ["s.safetensors", "t.safetensors"]
    events = [(ev, kw["name"]) for _, ev, kw in log.records]
    assert (inbox / "s.safetensors").read_bytes() == b"newer" and (inbox / "t.safetensors").read_bytes() == b"only"
    assert os.listdir(staging / TAKEN) == []
    assert events == [("taken_drop_superseded", "s.safetensors"), ("taken_drop_given_back", "t.safetensors")]


def test_a_drop_that_cannot_go_back_stays_taken_for_the_next_start(tmp_path: Path) -> None:
    """The inbox is gone at start-up (FAULTS A9): nothing raises, nothing is lost; it goes back once the inbox is."""
    staging, inbox = tmp_path / "staging", tmp_path / "inbox"
    (staging / TAKEN).mkdir(parents=True)
    (staging / TAKEN / "k.safetensors").write_bytes(b"kept")
    log = ListLogger()
    assert give_back_all(staging, inbox, log) == []
    events = [ev for _, ev, _ in log.records]
    assert events == ["taken_drop_kept"] and (staging / TAKEN / "k.safetensors").read_bytes() == b"kept"
    inbox.mkdir()
    assert give_back_all(staging, inbox, log) == ["k.safetensors"] and (inbox / "k.safetensors").read_bytes() == b"kept"


def test_a_taken_drop_the_caller_rejects_goes_to_rejected_whole(env: Env) -> None:
    def refuse(a: Arrival) -> None:
        raise CheckpointError("not a finetune of the base", path=a.staged, hint="drop a finetune of the base")

    env.rec.behaviour = refuse
    it = env.start()
    data = st_bytes(107)
    (env.inbox / "no.toml").write_text('skill = "no"\n')
    env.drop("no.safetensors", data)
    wait_for(lambda: "no.safetensors.reason.txt" in env.rejected())
    env.settle(it)
    assert env.rec.arrivals[0].taken is not None
    assert (env.inbox / ".rejected" / "no.safetensors").read_bytes() == data
    assert (env.inbox / ".rejected" / "no.toml").exists() and "not a finetune" in env.reason("no.safetensors")
    assert os.listdir(env.staging / TAKEN) == [] and env.staged() == []


def test_a_taken_drop_left_pending_goes_back_to_the_inbox_at_stop(env: Env) -> None:
    def later(a: Arrival) -> None:
        raise RetryLater("localizing", seconds=3600)

    env.rec.behaviour = later
    it = env.start()
    data = st_bytes(108)
    env.drop("wait.safetensors", data)
    wait_for(lambda: env.rec.arrivals)
    time.sleep(0.3)  # the inbox's own events about the move do not make it look again
    assert len(env.rec.arrivals) == 1 and not (env.inbox / "wait.safetensors").exists()
    it.poke("wait.safetensors")  # the caller's work is done: delivered again, the same staged copy
    wait_for(lambda: len(env.rec.arrivals) == 2)
    assert env.rec.arrivals[0].staged == env.rec.arrivals[1].staged
    it.stop()
    assert (env.inbox / "wait.safetensors").read_bytes() == data and os.listdir(env.staging / TAKEN) == []
    assert env.staged() == []


def test_a_new_drop_of_the_same_name_waits_for_the_taken_one(env: Env) -> None:
    calls: list[Arrival] = []

    def once_later(a: Arrival) -> None:
        calls.append(a)
        if len(calls) == 1:
            env.drop("same.safetensors", st_bytes(110))  # the dropper sends a new version meanwhile
            raise RetryLater("localizing", seconds=0.2)

    env.rec.behaviour = once_later
    it = env.start()
    env.drop("same.safetensors", st_bytes(109))
    wait_for(lambda: len(calls) == 3)
    env.settle(it)
    assert [a.sha256 for a in calls] == [sha(st_bytes(109))] * 2 + [sha(st_bytes(110))]
    assert os.listdir(env.inbox) == [] and os.listdir(env.staging / TAKEN) == []


def test_a_full_disk_does_not_hold_back_a_moved_drop(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    real = staging_mod.shutil.disk_usage
    monkeypatch.setattr(staging_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    it = env.start()
    env.drop("fits.safetensors", st_bytes(111))  # moving needs no space
    wait_for(lambda: env.rec.arrivals)
    env.settle(it)
    assert env.rec.arrivals[0].taken is not None
