"""FAULTS C1-C8, C10, C11 against the real service: crashes at named phases, a full disk, a corrupt or stale
registry, a second daemon, a failing smoke check, a device out of memory, churn and rollback.

Crash cases use the :mod:`skillhub.faultpoints` handshake: the child is started with ``stop:<point>``; when it
reaches the point it writes the point's name to a marker file and stops itself (SIGSTOP, so nothing else moves on
disk); the test sees the marker, sends SIGKILL, starts a fresh process on the same state folder and checks the
registry (``PRAGMA integrity_check``), the files and the served version.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import save as save_safetensors

from harness import (TOKEN, Service, assert_weights_equal, drop, integrity, make_world, model, reference, rows,
                     world)  # noqa: F401  (world is a fixture)


def debris(state: Path) -> list[Path]:
    """Temp files and directories left anywhere in the state folder."""
    return [p for p in state.rglob("*") if p.name.endswith(".tmp")]


def assert_consistent(state: Path) -> None:
    """The registry is sound: SQLite's check passes, every READY row has its mask file, no (skill, version) twice."""
    assert integrity(state) == [("ok",)]
    all_rows = rows(state)
    assert len({(s, v) for s, v, _, _ in all_rows}) == len(all_rows)
    for skill, version, status, mask in all_rows:
        if status == "READY":
            assert (state / "masks" / f"{mask}.mask.safetensors").is_file(), (skill, version)
    assert debris(state) == []


def crash_at(svc: Service, point: str, then: callable) -> None:
    """Start with ``point`` armed, do ``then()`` (which makes the service reach it), wait for the handshake, kill."""
    svc.start(svc.arm(f"stop:{point}"))
    then()
    svc.wait_stopped_at(point.partition("*")[0])
    svc.kill()


def served_skills(svc: Service) -> set[str]:
    return set(svc.model().get("skills", {}))


# --- C1-C3: crashes at named phases ----------------------------------------------------------------------------


def test_c1_kill_during_mask_write(world) -> None:
    root, base, fts, svc = world
    state = root / "state"
    crash_at(svc, "mask_write", lambda: drop(root, "a", "plain").wait(30))
    half = [p for p in (state / "masks").iterdir() if p.name.endswith(".tmp")]
    assert half, "the child stopped before a temp mask file existed"
    assert not list((state / "masks").glob("*.mask.safetensors"))

    svc.start()
    svc.wait(lambda: served_skills(svc) == {"a"}, "a re-ingested from the inbox")
    _, weights = svc.weights()
    assert_weights_equal(weights, reference(base, [fts["a"]]))
    assert_consistent(state)
    assert [(s, st) for s, _, st, _ in rows(state)] == [("a", "READY")]
    assert svc.stop() == 0


def test_c2_kill_after_the_mask_file_before_the_registry_commit(world) -> None:
    root, base, fts, svc = world
    state = root / "state"
    crash_at(svc, "mask_renamed", lambda: drop(root, "a", "plain").wait(30))
    assert len(list((state / "masks").glob("*.mask.safetensors"))) == 1  # the file is there …
    assert [st for _, _, st, _ in rows(state)] == ["PENDING"]  # … its row does not say READY

    svc.start()
    svc.wait(lambda: served_skills(svc) == {"a"}, "a re-ingested")
    assert_consistent(state)
    assert [(s, st) for s, _, st, _ in rows(state)] == [("a", "READY")]  # the same row, no duplicate
    _, weights = svc.weights()
    assert_weights_equal(weights, reference(base, [fts["a"]]))
    assert svc.stop() == 0


def test_c2_kill_after_the_registry_commit_before_stitching(world) -> None:
    root, base, fts, svc = world
    state = root / "state"
    crash_at(svc, "mask_committed", lambda: drop(root, "a", "plain").wait(30))
    assert [st for _, _, st, _ in rows(state)] == ["READY"]

    svc.start()  # replay stitches the committed skill in
    svc.wait(lambda: served_skills(svc) == {"a"}, "a served after the restart")
    assert_consistent(state)
    assert len(rows(state)) == 1
    _, weights = svc.weights()
    assert_weights_equal(weights, reference(base, [fts["a"]]))
    assert svc.stop() == 0


@pytest.mark.parametrize("point", ["stitch*2", "publish_manifest*2", "publish_current*2"])
def test_c3_kill_during_stitching_or_publication(world, point: str) -> None:
    """The first pass of each point is the empty start-up version; the second is the version with skill a."""
    root, base, fts, svc = world
    state = root / "state"
    crash_at(svc, point, lambda: drop(root, "a", "plain").wait(30))
    assert (state / "models" / "current").read_text().strip() == "1"

    svc.spawn()
    # Until it has re-published, the restarted service serves the last committed version (1, the base) or the
    # next one with a; never a half-written one.
    seen = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = svc.get("/v1/model")
        if r.status_code == 200 and r.json().get("version") is not None:
            seen.add((r.json()["version"], tuple(sorted(r.json()["skills"]))))
            if "a" in r.json()["skills"]:
                break
        time.sleep(0.05)
    assert all(skills in ((), ("a",)) for _, skills in seen), seen
    version, weights = svc.weights()
    assert_weights_equal(weights, reference(base, [fts["a"]]))
    assert_consistent(state)
    numbers = sorted(int(p.name) for p in (state / "models").iterdir() if p.name.isdigit())
    assert numbers[-1] == version and (state / "models" / "current").read_text().strip() == str(version)
    assert svc.stop() == 0


def test_c3_kill_while_writing_a_weights_file(world) -> None:
    root, base, _, svc = world
    state = root / "state"
    crash_at(svc, "weights_write", lambda: None)  # version 1's weights are written after a quiet moment
    assert [p for p in (state / "models" / "1").iterdir() if p.name.endswith(".tmp")]

    svc.start()
    assert_consistent(state)
    version, weights = svc.weights()
    assert version == 1
    assert_weights_equal(weights, base)
    assert svc.stop() == 0


# --- C4: disk full ---------------------------------------------------------------------------------------------


def test_c4_injected_enospc_writing_a_mask_is_retried(world) -> None:
    """Injected ``OSError(ENOSPC)`` at the mask write (works without root): the drop is not rejected, the registry
    keeps no READY row without its file, and the retry succeeds."""
    root, base, fts, svc = world
    state = root / "state"
    svc.start(svc.arm("enospc:mask_write"))
    assert drop(root, "a", "plain").wait(30) == 0
    svc.wait(lambda: served_skills(svc) == {"a"}, "a served after the retry")
    log = svc.log.read_text()
    assert "ingest_deferred" in log and "No space left on device" in log
    assert not (root / "inbox" / ".rejected").exists() or not list((root / "inbox" / ".rejected").iterdir())
    assert_consistent(state)
    assert [(s, st) for s, _, st, _ in rows(state)] == [("a", "READY")]
    _, weights = svc.weights()
    assert_weights_equal(weights, reference(base, [fts["a"]]))
    assert svc.stop() == 0


def test_c4_injected_enospc_publishing_keeps_the_old_version_and_retries(world) -> None:
    root, base, fts, svc = world
    state = root / "state"
    svc.start(svc.arm("enospc:publish_manifest*2"))
    v1, _ = svc.weights()
    assert drop(root, "a", "plain").wait(30) == 0
    svc.wait(lambda: "reconcile_deferred" in svc.log.read_text(), "the failed publication")
    assert svc.model()["version"] == v1  # the old version keeps serving
    svc.wait(lambda: served_skills(svc) == {"a"}, "published on the retry")
    assert_consistent(state)
    _, weights = svc.weights()
    assert_weights_equal(weights, reference(base, [fts["a"]]))
    assert svc.stop() == 0


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_c4_real_disk_full_on_a_small_tmpfs(custom_world) -> None:
    """The state folder on a 4 MiB tmpfs (needs root and mount rights; else skipped, and the injected-ENOSPC tests
    above cover the same code paths). The disk is filled; a drop waits in the inbox without harm; space returns and
    it is ingested."""
    root, base, fts, svc = custom_world()
    state = root / "state"
    if not _mount_tmpfs(state, "4m"):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount rights); "
                    "test_c4_injected_enospc_* cover disk full by injection")
    filler = state / "filler"
    try:
        svc.start()
        assert drop(root, "a", "plain").wait(30) == 0
        svc.wait(lambda: served_skills(svc) == {"a"}, "a served")
        v_a, w_a = svc.weights()
        with open(filler, "wb") as f:  # fill the file system to the last block
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        assert drop(root, "b", "plain").wait(30) == 0
        svc.wait(lambda: "drop_waiting" in svc.log.read_text() or "ingest_deferred" in svc.log.read_text(),
                 "b waiting for space")
        time.sleep(1.0)
        assert svc.get("/readyz").status_code == 200
        assert svc.model()["version"] == v_a and served_skills(svc) == {"a"}
        assert (root / "inbox" / "b.safetensors").exists()  # not rejected, not lost
        filler.unlink()  # space returns
        svc.wait(lambda: served_skills(svc) == {"a", "b"}, "b served once space returned")
        _, weights = svc.weights()
        assert_weights_equal(weights, reference(base, [fts["a"], fts["b"]]))
        assert svc.stop() == 0
        assert_consistent(state)
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.kill()
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


# --- C5: corrupt or stale registry -----------------------------------------------------------------------------


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")} | {"SKILLHUB_TOKEN": TOKEN}
    return subprocess.run([sys.executable, "-m", "skillhub", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def serve_two_skills_and_back_up(root: Path, svc: Service) -> int:
    svc.start()
    for name in ("a", "b"):
        assert drop(root, name, "plain").wait(30) == 0
    svc.wait(lambda: served_skills(svc) == {"a", "b"}, "a and b served")
    backup = cli(root, "backup", str(root / "backup"), "--config", str(root / "config.toml"))
    assert backup.returncode == 0, backup.stderr
    return svc.model()["version"]


def assert_read_only_service(root: Path, svc: Service, version: int, want: dict) -> None:
    assert svc.get("/readyz").status_code == 200
    got_version, weights = svc.weights()
    assert got_version == version
    assert_weights_equal(weights, want)
    health = httpx_get(svc, "/healthz")
    assert health["registry"]["ok"] is False and "skillhub restore" in health["registry"]["detail"]
    refused = svc.post("/v1/skills/a/disable")
    assert refused.status_code == 503 and "registry" in refused.json()["error"]
    assert (drop(root, "c", "plain").wait(30) == 0 and time.sleep(1.5) is None
            and (root / "inbox" / "c.safetensors").exists())  # left alone in the inbox
    assert "registry_unusable" in svc.log.read_text()


def httpx_get(svc: Service, route: str) -> dict:
    r = svc.get(route)
    assert r.status_code == 200, r.text
    return r.json()


def test_c5_corrupt_registry_serves_the_last_verified_version_read_only(world) -> None:
    root, base, fts, svc = world
    state = root / "state"
    version = serve_two_skills_and_back_up(root, svc)
    assert svc.stop() == 0
    db = state / "registry.sqlite3"
    damaged = b"this is not a database" + db.read_bytes()[22:]
    db.write_bytes(damaged)

    svc.start()
    assert_read_only_service(root, svc, version, reference(base, [fts["a"], fts["b"]]))
    assert db.read_bytes() == damaged  # no empty registry written over it
    assert svc.stop() == 0

    # The recovery steps it printed work: restore the backup, start again; c is ingested now.
    restored = cli(root, "restore", str(root / "backup"), "--force", "--config", str(root / "config.toml"))
    assert restored.returncode == 0, restored.stderr
    assert (state / "registry.sqlite3.before-restore").read_bytes() == damaged
    svc.start()
    svc.wait(lambda: served_skills(svc) == {"a", "b", "c"}, "normal service after the restore")
    assert_consistent(state)
    assert svc.stop() == 0


def test_c5_registry_that_lost_its_wal_is_not_replayed(world) -> None:
    """SIGKILL leaves recent commits in ``registry.sqlite3-wal``; without that file the database is older than the
    served version. The service must notice instead of publishing a version without the lost skills."""
    root, base, fts, svc = world
    state = root / "state"
    svc.start()
    assert drop(root, "a", "plain").wait(30) == 0
    svc.wait(lambda: served_skills(svc) == {"a"}, "a served")
    version = svc.model()["version"]
    svc.kill()
    wal = state / "registry.sqlite3-wal"
    assert wal.exists() and wal.stat().st_size > 0
    wal.unlink()
    (state / "registry.sqlite3-shm").unlink(missing_ok=True)

    svc.start()
    assert_read_only_service(root, svc, version, reference(base, [fts["a"]]))
    assert svc.stop() == 0


# --- C6: two daemons, stale lock --------------------------------------------------------------------------------


def test_c6_second_daemon_refused_and_a_dead_owners_lock_released(world) -> None:
    root, _, _, svc = world
    svc.start()
    second = subprocess.run([sys.executable, "-m", "skillhub", "run", "--config", str(root / "config.toml")],
                            cwd=root, env={k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}
                            | {"SKILLHUB_TOKEN": TOKEN}, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and f"already in use by pid {svc.proc.pid}" in second.stderr
    svc.kill()  # a crash leaves the lock file behind …
    assert (root / "state" / "lock").exists()
    svc.start()  # … but the OS released the flock with the process
    assert_consistent(root / "state")
    assert svc.stop() == 0


# --- C7, C8: a bad version, out of memory ----------------------------------------------------------------------


@pytest.fixture
def custom_world(tmp_path: Path):
    """``make_world`` with extra config; the service is killed at the end whatever happened."""
    made: list[Service] = []

    def make(extra: str = ""):
        world = make_world(tmp_path, extra)
        made.append(world[3])
        return world

    yield make
    for svc in made:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.kill()


def test_c7_a_version_failing_its_smoke_check_keeps_the_old_one_serving(custom_world) -> None:
    # λ·τ overflows float32 (the accumulators are float64; the cast to the model's dtype gives ±inf).
    root, base, fts, svc = custom_world('\n[stitch]\npolicy = "sum"\n[stitch.params]\nscale = 1e300\n')
    svc.start()
    v1, w1 = svc.weights()
    assert drop(root, "a", "plain").wait(30) == 0
    svc.wait(lambda: svc.skills().get("a", {}).get("versions", [{}])[-1].get("status") == "FAILED", "a FAILED")
    reason = svc.skills()["a"]["versions"][-1]["reason"]
    assert "NaN/Inf" in reason
    v, w = svc.weights()
    assert v == v1
    assert_weights_equal(w, w1)
    assert svc.stop() == 0


def test_c8_device_out_of_memory_while_rebuilding(world) -> None:
    """Injected ``torch.OutOfMemoryError`` at the first stitch: the old version keeps serving, the error is clear
    (log and /healthz), the skill is not failed, and it is stitched in on the retry; the process never restarts."""
    root, base, fts, svc = world
    svc.start(svc.arm("oom:stitch_add"))
    v1 = svc.model()["version"]
    assert drop(root, "a", "plain").wait(30) == 0
    svc.wait(lambda: "out of memory" in svc.log.read_text(), "the out-of-memory error")
    assert svc.model()["version"] == v1
    assert "out of memory" in httpx_get(svc, "/healthz").get("last_error", "")
    assert svc.skills()["a"]["versions"][-1]["status"] == "READY"
    assert drop(root, "b", "plain").wait(30) == 0  # the next change retries a as well
    svc.wait(lambda: served_skills(svc) == {"a", "b"}, "a and b served")
    _, weights = svc.weights()
    assert_weights_equal(weights, reference(base, [fts["a"], fts["b"]]))
    assert svc.proc.poll() is None
    assert svc.stop() == 0


# --- C10, C11: churn and rollback ------------------------------------------------------------------------------


def test_c10_add_and_remove_repeatedly_returns_exactly_to_base(world) -> None:
    root, base, fts, svc = world
    svc.start()
    for name in ("a", "b"):
        assert drop(root, name, "plain").wait(30) == 0
    svc.wait(lambda: served_skills(svc) == {"a", "b"}, "a and b served")
    cfg = root / "config.toml"
    plain = cfg.read_text()
    for _ in range(3):
        cfg.write_text(plain + '\n[skills]\ndisabled = ["a", "b"]\n')
        svc.wait(lambda: served_skills(svc) == set(), "both disabled")
        _, weights = svc.weights()
        assert_weights_equal(weights, base)
        for k in base:  # exactly θ₀, not merely close
            assert weights[k].equal(base[k])
        cfg.write_text(plain)
        svc.wait(lambda: served_skills(svc) == {"a", "b"}, "both enabled again")
    assert httpx_delete(svc, "/v1/skills/a") == 200
    assert httpx_delete(svc, "/v1/skills/b") == 200
    svc.wait(lambda: served_skills(svc) == set(), "both removed")
    _, weights = svc.weights()
    for k in base:
        assert weights[k].equal(base[k])
    assert svc.stop() == 0


def httpx_delete(svc: Service, route: str) -> int:
    import httpx

    return httpx.delete(f"http://127.0.0.1:{svc.port}{route}", headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=30).status_code


def test_c11_pin_an_earlier_version_and_restart(world) -> None:
    root, base, fts, svc = world
    svc.start()
    assert drop(root, "a", "plain").wait(30) == 0
    svc.wait(lambda: served_skills(svc) == {"a"}, "a@1")
    (root / "a.src").write_bytes(save_safetensors(model(9, base)))
    assert drop(root, "a", "plain").wait(30) == 0
    svc.wait(lambda: svc.model()["skills"].get("a", {}).get("version") == 2, "a@2")
    pinned = cli(root, "skills", "pin", "a", "1", "--config", str(root / "config.toml"))
    assert pinned.returncode == 0, pinned.stderr
    svc.wait(lambda: svc.model()["skills"]["a"]["version"] == 1, "rolled back to a@1")
    version, weights = svc.weights()
    assert_weights_equal(weights, reference(base, [fts["a"]]))
    svc.kill()
    svc.start()
    assert svc.model()["skills"]["a"]["version"] == 1 and svc.model()["version"] == version
    assert_consistent(root / "state")
    assert svc.stop() == 0
