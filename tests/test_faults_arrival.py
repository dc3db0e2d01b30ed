"""FAULTS A1-A12 against the real service: `skillhub run` as a subprocess watching a real inbox, files written into
it by other processes (writer children and this test process), its real SQLite registry and HTTP port.

Every case checks the promise of FAULTS.md: what must be refused is refused with a reason naming the problem and the
fix, nothing already stored is lost (earlier READY rows and their mask files), and the model being served keeps
being served (``/readyz``, the same version and weights, equal to an independent float64 stitch). One service is
shared by the independent cases; A9 (the inbox itself goes away) has its own, and A12's refused start runs
``skillhub run`` on a state folder it cannot write. The extra processes are spawned when the module starts, so that
their start-ups (a torch import each) overlap.

Permissions and root: tests run as root here, and root reads and writes whatever the mode bits say. The services
of this module are therefore started without the two capabilities that let root ignore file permissions
(``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``, dropped from the bounding set with ``setpriv``): still uid 0, but
bound by the mode bits like any user, so "unreadable input", "unreadable inbox" and "state folder not writable"
are real. Run as an ordinary user, the services start unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors

from harness import (TOKEN, Service, World, assert_kept, assert_weights_equal, drop, make_world, model,
                     new_rejections, reference, rows, serving_a, snapshot)


def permission_bound_prefix() -> list[str] | None:
    """The command prefix that makes a child obey file permissions: nothing for an ordinary user; for root,
    ``setpriv`` dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH; ``None`` when root cannot drop them here."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    caps = "-dac_override,-dac_read_search"
    probe = subprocess.run([setpriv, "--bounding-set", caps, "--inh-caps", caps, "--", "true"], capture_output=True)
    return [setpriv, "--bounding-set", caps, "--inh-caps", caps, "--"] if probe.returncode == 0 else None


PREFIX = permission_bound_prefix()
NEEDS_PERMISSIONS = pytest.mark.skipif(PREFIX is None, reason="running as root without a way to drop "
                                                              "CAP_DAC_OVERRIDE (no setpriv): mode bits bind nobody")


class BoundService(Service):
    """The harness's service, started through :func:`permission_bound_prefix` (see the module docstring)."""

    def spawn(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        full = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}
        full["SKILLHUB_TOKEN"] = TOKEN
        full.update(env or {})
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*(PREFIX or []), sys.executable, "-m", "skillhub", "run", "--config",
                                          str(self.root / "config.toml")],
                                         cwd=self.root, env=full, stdout=subprocess.DEVNULL, stderr=log)
        return self.proc

    def health(self) -> dict:
        """The inbox part of ``GET /healthz`` (no token: liveness), ``{}`` when there is no answer."""
        try:
            r = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=10)
        except httpx.HTTPError:
            return {}
        return r.json()["inbox"] if r.status_code == 200 else {}


def by_source(state: Path, data: bytes) -> list[tuple]:
    """(skill, version, status) of the registry rows whose source is these bytes."""
    conn = sqlite3.connect(f"file:{state / 'registry.sqlite3'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT skill, version, status FROM versions WHERE source_sha = ? ORDER BY id",
                            (hashlib.sha256(data).hexdigest(),)).fetchall()
    finally:
        conn.close()


def skill_rows(w: World, skill: str) -> list[tuple]:
    return [r[:3] for r in rows(w.state) if r[0] == skill]


def arrival_world(root: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], BoundService]:
    root, base, fts, svc = make_world(root)
    cfg = root / "config.toml"
    cfg.write_text(cfg.read_text().replace("rescan_seconds = 2", "rescan_seconds = 2\nshard_timeout_seconds = 2"))
    return root, base, fts, BoundService(root, svc.port)


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory):
    """A12's refused start: ``skillhub run`` on a state folder it may not write (mode 0555, the daemon bound by mode
    bits: see the module docstring). As root without a way to drop CAP_DAC_OVERRIDE, a state folder that cannot
    exist (its parent is a regular file) is used instead, which binds root as well. Spawned at module start-up, so
    that its torch import overlaps the services' start-ups; the test collects its exit code and stderr."""
    root, *_ = make_world(tmp_path_factory.mktemp("refused"))
    if PREFIX is not None:
        name, state, prefix = "read-only", root / "state", PREFIX
        state.mkdir(mode=0o555)
    else:
        name, state, prefix = "not-a-folder", root / "blocker" / "state", []
        (root / "blocker").write_text("a file, not a folder\n")
        cfg = root / "config.toml"
        cfg.write_text(cfg.read_text().replace('dir = "state"', 'dir = "blocker/state"'))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")} | {"SKILLHUB_TOKEN": TOKEN}
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "skillhub", "run", "--config", str(root / "config.toml")],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield name, root, str(state), proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def a9(tmp_path_factory: pytest.TempPathFactory, refused):
    """A9's own service (its inbox is deleted): spawned without waiting, before the shared one (``w`` asks for this
    fixture), so that the two start-ups overlap."""
    root, base, fts, svc = arrival_world(tmp_path_factory.mktemp("a9"))
    svc.spawn()
    yield World(root, base, svc), fts
    if svc.proc is not None and svc.proc.poll() is None:
        svc.proc.kill()
        svc.proc.wait()


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory, a9):
    root, base, fts, svc = arrival_world(tmp_path_factory.mktemp("arrival"))
    yield from serving_a(World(root, base, svc), fts)


# --- A1, A2 --------------------------------------------------------------------------------------------------------


def test_a1_slow_writer_ingested_once_after_it_completes(w: World) -> None:
    before = snapshot(w)
    ft = model(101, w.base)
    data = save_safetensors(ft)
    (w.root / "slow.src").write_bytes(data)
    writer = drop(w.root, "slow", "slow")  # 40%, a 1.5 s pause, then the rest (harness WRITER)
    # The daemon looks at the 40% file once it has been still for stable_seconds, and holds it back.
    w.svc.wait(lambda: w.events("drop_incomplete", "slow.safetensors"), "partial file looked at and held back")
    assert skill_rows(w, "slow") == [] and new_rejections(w, before) == []
    assert w.svc.model()["version"] == before.version
    assert writer.wait(30) == 0
    w.svc.wait(lambda: "slow" in w.skills(), "slow served")
    w.served["slow"] = ft
    assert skill_rows(w, "slow") == [("slow", 1, "READY")] and by_source(w.state, data) == [("slow", 1, "READY")]
    assert new_rejections(w, before) == [] and not (w.inbox / "slow.safetensors").exists()
    assert len(w.events("drop_consumed", "slow.safetensors")) == 1
    assert_kept(w, before, same_version=False)


TEMP_NAMES = [".hidden.safetensors", "temp.safetensors.tmp", "temp.safetensors.part", "temp.partial",
              "temp.incomplete"]


def test_a2_temp_names_ignored_until_the_rename_triggers_intake(w: World) -> None:
    before = snapshot(w)
    ft = model(102, w.base)
    data = save_safetensors(ft)
    for name in TEMP_NAMES:
        (w.inbox / name).write_bytes(data)
    time.sleep(1.0)  # > 3 × stable_seconds
    assert by_source(w.state, data) == [] and new_rejections(w, before) == []
    assert all((w.inbox / n).exists() for n in TEMP_NAMES)
    assert not [r for r in w.log() if any(n in json.dumps(r) for n in TEMP_NAMES)]  # not even looked at
    assert_kept(w, before)
    os.rename(w.inbox / "temp.safetensors.part", w.inbox / "temp.safetensors")
    w.svc.wait(lambda: "temp" in w.skills(), "renamed file served")
    w.served["temp"] = ft
    assert by_source(w.state, data) == [("temp", 1, "READY")] and new_rejections(w, before) == []
    for name in TEMP_NAMES:
        (w.inbox / name).unlink(missing_ok=True)
    assert_kept(w, before, same_version=False)


# --- A3 ------------------------------------------------------------------------------------------------------------

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def build_sharded(folder: Path, ft: dict[str, torch.Tensor], *, shard2: bool = True,
                  weight_map: dict[str, str] | None = None) -> None:
    folder.mkdir()
    (folder / SHARD1).write_bytes(save_safetensors({k: ft[k] for k in ("enc.weight", "enc.bias")}))
    if shard2:
        (folder / SHARD2).write_bytes(save_safetensors({"head.weight": ft["head.weight"]}))
    wm = weight_map or {"enc.weight": SHARD1, "enc.bias": SHARD1, "head.weight": SHARD2}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def test_a3_shards_arriving_one_by_one_are_waited_for(w: World) -> None:
    before = snapshot(w)
    ft = model(103, w.base)
    build_sharded(w.root / "build-shards", ft, shard2=False)
    os.rename(w.root / "build-shards", w.inbox / "shards")
    time.sleep(0.8)  # > 2 × stable_seconds, < shard_timeout_seconds
    assert skill_rows(w, "shards") == [] and new_rejections(w, before) == []
    assert_kept(w, before)
    tmp = w.inbox / "shards" / ".shard2.tmp"
    tmp.write_bytes(save_safetensors({"head.weight": ft["head.weight"]}))
    os.rename(tmp, w.inbox / "shards" / SHARD2)
    w.svc.wait(lambda: "shards" in w.skills(), "sharded skill served")
    w.served["shards"] = ft
    assert skill_rows(w, "shards") == [("shards", 1, "READY")]
    assert not (w.inbox / "shards").exists() and new_rejections(w, before) == []
    assert_kept(w, before, same_version=False)


def test_a3_missing_shard_rejected_after_the_timeout(w: World) -> None:
    before = snapshot(w)
    build_sharded(w.root / "build-partial", model(104, w.base), shard2=False)
    t0 = time.monotonic()
    os.rename(w.root / "build-partial", w.inbox / "partial")
    reason = w.reason("partial")
    assert time.monotonic() - t0 >= 2.0 * 0.9  # shard_timeout_seconds of this world
    assert f"partial: missing shards: {SHARD2}" in reason, reason
    assert "Hint: copy every shard into a folder outside the inbox, then move the whole folder in" in reason
    assert (w.inbox / ".rejected" / "partial" / SHARD1).is_file()
    assert skill_rows(w, "partial") == []
    assert_kept(w, before)


def test_a3_index_naming_a_path_outside_the_folder_rejected(w: World) -> None:
    before = snapshot(w)
    outside = w.root / "outside.safetensors"  # a real, valid shard outside the inbox: must never be read
    outside.write_bytes(save_safetensors({"head.weight": model(105, w.base)["head.weight"]}))
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    for name, target in (("dotdot", "../../outside.safetensors"), ("absolute", str(outside))):
        wm = {"enc.weight": SHARD1, "enc.bias": SHARD1, "head.weight": target}
        build_sharded(w.root / f"build-{name}", model(105, w.base), shard2=False, weight_map=wm)
        os.rename(w.root / f"build-{name}", w.inbox / name)
    for name, target in (("dotdot", "../../outside.safetensors"), ("absolute", str(outside))):
        reason = w.reason(name)
        assert f"shard path {target!r} in model.safetensors.index.json leaves the folder" in reason, reason
        assert "Hint: shards must be plain file names inside the checkpoint folder" in reason
        assert skill_rows(w, name) == []
    assert hashlib.sha256(outside.read_bytes()).hexdigest() == digest
    assert_kept(w, before)


# --- A4, A8 --------------------------------------------------------------------------------------------------------


def test_a4_same_bytes_under_two_names_and_repeated_events_register_once(w: World) -> None:
    before = snapshot(w)
    ft = model(106, w.base)
    data = save_safetensors(ft)
    path = w.put("twin1.safetensors", data)
    for _ in range(20):  # duplicate events for unchanged content: open for writing and close, no write
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except FileNotFoundError:
            break  # already consumed
    w.svc.wait(lambda: "twin1" in w.skills(), "twin1 served")
    w.served["twin1"] = ft
    version = w.svc.model()["version"]
    assert version == before.version + 1  # one rebuild
    w.put("twin2.safetensors", data)  # the same bytes under another name
    w.svc.wait(lambda: not (w.inbox / "twin2.safetensors").exists(), "twin2 consumed")
    assert w.events("already_registered") and w.events("already_registered")[-1]["skill"] == "twin1"
    time.sleep(0.5)
    assert by_source(w.state, data) == [("twin1", 1, "READY")]  # one entry per content hash
    assert "twin2" not in w.skills() and new_rejections(w, before) == []
    assert w.svc.model()["version"] == version  # no second rebuild
    assert_kept(w, before, same_version=False)


def test_a4_a8_restart_rescan_ingests_what_arrived_while_down_nothing_twice(w: World) -> None:
    before = snapshot(w)
    assert w.svc.stop() == 0
    # While the daemon is down (no events at all): a new skill arrives, and bytes already registered arrive again.
    late = model(107, w.base)
    w.put("late.safetensors", save_safetensors(late))
    known = (w.root / "a.src").read_bytes()
    w.put("a-again.safetensors", known)
    ready_events = len(w.events("daemon_ready"))
    w.svc.start()
    w.svc.wait(lambda: "late" in w.skills(), "late served after the start-up rescan")
    w.served["late"] = late
    w.svc.wait(lambda: not (w.inbox / "a-again.safetensors").exists(), "known bytes consumed")
    assert w.events("daemon_ready")[ready_events]["version"] == before.version  # the same version replayed first
    time.sleep(0.5)
    assert by_source(w.state, known) == [("a", 1, "READY")] and "a-again" not in w.skills()
    assert w.svc.model()["version"] == before.version + 1  # one rebuild: for late only
    assert new_rejections(w, before) == [] and os.listdir(w.inbox) in ([], [".rejected"])
    assert_kept(w, before, same_version=False)


# --- A5 ------------------------------------------------------------------------------------------------------------


def test_a5_new_content_for_a_known_skill_is_a_new_version_old_serves_until_ready_rollback(w: World) -> None:
    v1, v2 = model(108, w.base), model(109, w.base)
    w.serve_new("five", v1)
    before = snapshot(w)
    seen: list[tuple[int, int | None]] = []
    stop = threading.Event()

    def watch() -> None:  # what a client sees while version 2 is localized and stitched
        while not stop.is_set():
            ready = w.svc.get("/readyz").status_code
            skill = w.svc.model().get("skills", {}).get("five")
            seen.append((ready, skill["version"] if skill else None))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        w.put("five.safetensors", save_safetensors(v2))  # the same name, new content
        w.svc.wait(lambda: w.skills().get("five", {}).get("version") == 2, "five@2 served")
    finally:
        stop.set()
        watcher.join(30)
    assert seen and all(ready == 200 for ready, _ in seen)
    versions = [v for _, v in seen]
    assert set(versions) <= {1, 2} and versions == sorted(versions), versions  # 1 until 2 is ready, never absent
    w.served["five"] = v2
    assert skill_rows(w, "five") == [("five", 1, "READY"), ("five", 2, "READY")]
    assert_kept(w, before, same_version=False)
    # rollback over HTTP, and back
    assert w.svc.post("/v1/skills/five/pin", json={"version": 1}).status_code == 200
    w.svc.wait(lambda: w.skills()["five"]["version"] == 1, "rolled back to five@1")
    w.served["five"] = v1
    assert_weights_equal(w.svc.weights()[1], w.expected())
    assert w.svc.post("/v1/skills/five/pin", json={"version": None}).status_code == 200
    w.svc.wait(lambda: w.skills()["five"]["version"] == 2, "five@2 again")
    w.served["five"] = v2
    assert_kept(w, before, same_version=False)


# --- A6, A7 --------------------------------------------------------------------------------------------------------

HOSTILE_WRITER = r"""
import os, random, sys, time
data, dest = open(sys.argv[1], "rb").read(), sys.argv[2]
rnd = random.Random(0)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    cut = rnd.randrange(1, len(data))
    op = rnd.choice(["cut", "rewrite", "grow"])
    try:
        if op == "cut":  # truncated under the reader's feet
            os.truncate(dest, cut)
        elif op == "rewrite":  # the same bytes written again in place (new mtime, same size)
            with open(dest, "r+b") as f:
                f.write(data[:cut]); f.flush(); time.sleep(0.002); f.write(data[cut:])
        else:  # rewritten from scratch, in two pieces
            with open(dest, "wb") as f:
                f.write(data[:cut]); f.flush(); time.sleep(0.002); f.write(data[cut:])
    except FileNotFoundError:  # the daemon took a complete copy and removed it: write it again
        with open(dest, "wb") as f:
            f.write(data[:cut])
    time.sleep(rnd.choice([0.0, 0.01, 0.05, 0.15, 0.35]))
with open(dest, "wb") as f:
    f.write(data)
"""


def test_a6_file_truncated_and_rewritten_while_read_never_kills_the_service(w: World) -> None:
    before = snapshot(w)
    ft = model(110, w.base)
    data = save_safetensors(ft)
    (w.root / "six.src").write_bytes(data)
    (w.inbox / "six.safetensors").write_bytes(data[:100])
    statuses: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            statuses.append(w.svc.get("/readyz").status_code)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        writer = subprocess.Popen([sys.executable, "-c", HOSTILE_WRITER, str(w.root / "six.src"),
                                   str(w.inbox / "six.safetensors"), "1.5"])
        assert writer.wait(60) == 0
        w.svc.wait(lambda: "six" in w.skills() and not (w.inbox / "six.safetensors").exists(), "six served")
    finally:
        stop.set()
        prober.join(30)
    assert w.svc.proc is not None and w.svc.proc.poll() is None  # no SIGBUS, no crash
    assert statuses and set(statuses) == {200}
    w.served["six"] = ft
    assert by_source(w.state, data) == [("six", 1, "READY")]  # only the complete bytes, once
    assert skill_rows(w, "six") == [("six", 1, "READY")] and new_rejections(w, before) == []
    assert_kept(w, before, same_version=False)


FLASHER = r"""
import os, sys, time
data, inbox = open(sys.argv[1], "rb").read(), sys.argv[2]
for i in range(30):
    p = os.path.join(inbox, f"flash{i}.safetensors")
    f = open(p, "wb")  # left open (no close-write): the daemon waits stable_seconds (0.3 s) before opening it
    f.write(data)
    f.flush()
    time.sleep((i % 6) * 0.01)  # the daemon has its events by now
    os.unlink(p)  # ... and the file is gone before it opens it
    f.close()
"""


def test_a7_file_deleted_between_event_and_open_skipped_quietly(w: World) -> None:
    before = snapshot(w)
    data = save_safetensors(model(111, w.base))
    (w.root / "flash.src").write_bytes(data)
    lines = len(w.log())
    assert subprocess.run([sys.executable, "-c", FLASHER, str(w.root / "flash.src"), str(w.inbox)],
                          timeout=60).returncode == 0
    time.sleep(0.6)  # 2 × stable_seconds
    assert by_source(w.state, data) == [] and new_rejections(w, before) == []
    noise = [r for r in w.log()[lines:] if "flash" in json.dumps(r) and r.get("level") in ("warning", "error")]
    assert noise == []  # skipped quietly
    assert_kept(w, before)


# --- A9 ------------------------------------------------------------------------------------------------------------


def test_a9_inbox_deleted_or_unreadable_keeps_serving_and_resumes(a9) -> None:
    w, fts = a9
    w.svc.wait(lambda: w.svc.get("/readyz").status_code == 200, "a9 service ready")
    w.serve_new("a", fts["a"])
    before = snapshot(w)
    mask_files = sorted((w.state / "masks").iterdir())

    shutil.rmtree(w.inbox)
    w.svc.wait(lambda: w.svc.health().get("ok") is False, "health reports the inbox missing")
    assert w.svc.health()["detail"] == "inbox missing: [watch] dir; retrying"
    time.sleep(0.5)
    assert_kept(w, before)  # a folder going away removes no skill
    assert sorted((w.state / "masks").iterdir()) == mask_files
    w.inbox.mkdir()
    w.svc.wait(lambda: w.svc.health().get("ok") is True, "watching again")
    assert w.svc.health()["detail"] == "watching [watch] dir"
    w.serve_new("b", fts["b"])

    if PREFIX is not None:  # unreadable (mode bits bind the daemon: see the module docstring)
        before = snapshot(w)
        os.chmod(w.inbox, 0)
        try:
            w.svc.wait(lambda: w.svc.health().get("ok") is False, "health reports the inbox unreadable")
            assert w.svc.health()["detail"] == "inbox unreadable (Permission denied): [watch] dir; retrying"
            assert_kept(w, before)
        finally:
            os.chmod(w.inbox, 0o755)
        w.svc.wait(lambda: w.svc.health().get("ok") is True, "watching again")
        w.serve_new("c", fts["c"])
    assert_kept(w, before, same_version=False)


# --- A10, A11 ------------------------------------------------------------------------------------------------------


def test_a10_symlink_fifo_device_socket_rejected_never_blocking(w: World) -> None:
    before = snapshot(w)
    target = w.root / "target.safetensors"
    target.write_bytes(save_safetensors(model(112, w.base)))
    (w.root / "target-dir").mkdir()
    (w.root / "target-dir" / "model.safetensors").write_bytes(target.read_bytes())
    os.symlink(target, w.inbox / "link.safetensors")
    os.symlink(w.root / "target-dir", w.inbox / "linkdir")
    os.mkfifo(w.inbox / "pipe.safetensors")  # opening it for reading would block without a writer
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(w.inbox / "sock.safetensors"))
    expect = {"link.safetensors": "is a symbolic link: only regular files and folders inside the inbox are read",
              "linkdir": "is a symbolic link: only regular files and folders inside the inbox are read",
              "pipe.safetensors": "is a named pipe (FIFO), not a regular file",
              "sock.safetensors": "is a socket, not a regular file"}
    try:
        os.mknod(w.inbox / "dev.safetensors", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
        expect["dev.safetensors"] = "is a character device, not a regular file"
    except PermissionError:
        pass  # not root (no CAP_MKNOD): the other special files still make the case
    beside = model(113, w.base)
    try:
        w.put("beside.safetensors", save_safetensors(beside))  # arrives with them: nothing may block its intake
        for name, why in expect.items():
            reason = w.reason(name)
            assert f"{name}: {why}" in reason and "Hint: copy the file itself into the inbox" in reason, reason
        w.svc.wait(lambda: "beside" in w.skills(), "the regular file beside them served")
    finally:
        sock.close()
    w.served["beside"] = beside
    assert target.read_bytes() == (w.root / "target-dir" / "model.safetensors").read_bytes()  # targets untouched
    assert by_source(w.state, target.read_bytes()) == []  # never followed
    assert_kept(w, before, same_version=False)


HOSTILE = {  # stem -> accepted as a skill name (printable, no '/', at most 200 characters)
    "new\nline": False,
    "esc\x1b[31mred": False,
    os.fsdecode(b"bad\xff\xfebytes"): False,
    "b" * 220: False,
    "-rf --no-preserve-root": True,
    "$(touch PWNED); `touch PWNED2`": True,
    "ünï€ødé ☃": True,
}


def test_a11_hostile_names_keyed_by_content_escaped_in_logs_and_api(w: World) -> None:
    before = snapshot(w)
    fts = {stem: model(120 + i, w.base) for i, stem in enumerate(HOSTILE)}
    for stem, ft in fts.items():
        w.put(os.fsencode(stem) + b".safetensors", save_safetensors(ft))
    for stem, ok in HOSTILE.items():
        if ok:
            w.svc.wait(lambda: stem in w.skills(), f"{stem!r} served")
            w.served[stem] = fts[stem]
            assert by_source(w.state, save_safetensors(fts[stem])) == [(stem, 1, "READY")]
        else:
            reason = w.reason(f"{stem}.safetensors")
            first = reason.splitlines()[0]
            assert "unusable skill name" in first and 'Hint: set `skill = "name"` in a sidecar NAME.toml' in first
            assert "\x1b" not in reason and by_source(w.state, save_safetensors(fts[stem])) == []
    # the API carries the names as data (JSON-escaped), and routes take them back URL-encoded
    listed = {s["name"] for s in w.svc.get("/v1/skills").json()}
    assert {s for s, ok in HOSTILE.items() if ok} <= listed
    odd = "$(touch PWNED); `touch PWNED2`"
    assert w.svc.post(f"/v1/skills/{quote(odd, safe='')}/disable").status_code == 200
    w.svc.wait(lambda: odd not in w.skills(), "disabled by its hostile name")
    assert w.svc.post(f"/v1/skills/{quote(odd, safe='')}/enable").status_code == 200
    w.svc.wait(lambda: odd in w.skills(), "enabled again")
    # no shell, no path interpolation anywhere
    assert not [p for p in w.root.rglob("PWNED*")] and not Path("PWNED").exists()
    # the log: one JSON object per line, names escaped (no raw newline or ESC forging a line)
    raw = w.svc.log.read_bytes()
    assert b"\x1b" not in raw
    for line in raw.splitlines():
        json.loads(line)
    names = {r.get("name") for r in w.log()}
    assert "new\\nline.safetensors" in names and "esc\\x1b[31mred.safetensors" in names
    # the fix the reason names works: a sidecar gives the file a usable skill name
    bad = "new\nline"
    (w.inbox / f"{bad}.toml").write_text('skill = "newline"\n')
    w.put(f"{bad}.safetensors", save_safetensors(fts[bad]))
    w.svc.wait(lambda: "newline" in w.skills(), "renamed by its sidecar")
    w.served["newline"] = fts[bad]
    assert_kept(w, before, same_version=False)


# --- A12 -----------------------------------------------------------------------------------------------------------


@NEEDS_PERMISSIONS
def test_a12_unreadable_input_waits_with_a_clear_error_others_go_on(w: World) -> None:
    before = snapshot(w)
    locked, other = model(130, w.base), model(131, w.base)
    w.put("locked.safetensors", save_safetensors(locked), mode=0)
    w.put("other.safetensors", save_safetensors(other))
    w.svc.wait(lambda: "other" in w.skills(), "the readable drop served")
    w.served["other"] = other
    w.svc.wait(lambda: w.events("drop_waiting", "locked.safetensors"), "the unreadable drop logged")
    event = w.events("drop_waiting", "locked.safetensors")[-1]
    assert event["level"] == "error" and event["error"] == "Permission denied" and event["retry_seconds"] == 0.3
    assert (w.inbox / "locked.safetensors").exists() and new_rejections(w, before) == []  # kept, to retry
    assert skill_rows(w, "locked") == []
    assert_kept(w, before, same_version=False)
    os.chmod(w.inbox / "locked.safetensors", 0o644)  # fixed: picked up on a retry, no new event needed
    w.svc.wait(lambda: "locked" in w.skills(), "the fixed drop served")
    w.served["locked"] = locked
    assert new_rejections(w, before) == []
    assert_kept(w, before, same_version=False)


def test_a12_state_folder_not_writable_refuses_to_start_with_a_precise_message(refused) -> None:
    name, root, state, proc = refused
    _, err = proc.communicate(timeout=120)
    why = {"read-only": "Permission denied", "not-a-folder": "Not a directory"}[name]
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("skillhub: error: ") and state in last, last
    assert f"state folder is not writable ({why})" in last, last
    assert "Hint: fix its owner or permissions, or point --state at a writable folder" in last
    assert "Traceback" not in err
    port = int(re.search(r"port = (\d+)", (root / "config.toml").read_text()).group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # it never started serving
    assert not Path(state).exists() or list(Path(state).iterdir()) == []  # nothing written there
