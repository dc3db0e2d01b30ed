"""The registry: versions, content-addressed masks, the state-folder lock, crash recovery, corruption."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from skillhub.atomic import sha256_file
from skillhub.delta import Provenance, SparseDelta
from skillhub.errors import RegistryError, StateLockedError
from skillhub.registry import MISSING_MASK_REASON, Registry

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


def delta(values: tuple[float, float] = (0.5, -0.25), skill: str = "a") -> SparseDelta:
    return SparseDelta(indices={"w": torch.tensor([1, 3], dtype=torch.int32)}, values={"w": torch.tensor(values)},
                       shapes={"w": (2, 3)}, dtypes={"w": torch.float32}, provenance=Provenance(skill=skill))


@pytest.fixture
def reg(tmp_path: Path):
    with Registry(tmp_path / "state") as r:
        yield r


def ready(reg: Registry, skill: str, source: str, values: tuple[float, float] = (0.5, -0.25)):
    row, _ = reg.begin_version(skill, source, "dataless", {"sparsity": 0.01})
    return reg.store_mask(row.id, delta(values))


def test_layout_created(reg: Registry) -> None:
    for name in ("masks", "staging", "models"):
        assert (reg.state_dir / name).is_dir()
    assert (reg.state_dir / "lock").read_text().strip() == str(os.getpid())


def test_versions_increment_per_skill_and_supersede(reg: Registry) -> None:
    a1, new1 = reg.begin_version("cars", SHA_A, "dataless", {"sparsity": 0.01}, source_path="/in/cars.safetensors")
    a2, new2 = reg.begin_version("cars", SHA_B, "dataless", {"sparsity": 0.01})
    b1, _ = reg.begin_version("dogs", SHA_C, "dataless", {"sparsity": 0.01})
    assert (new1, new2) == (True, True)
    assert (a1.version, a2.version, b1.version) == (1, 2, 1)
    assert a1.status == "PENDING" and a1.ref == "cars@1" and a1.source_path == "/in/cars.safetensors"
    assert [r.ref for r in reg.versions()] == ["cars@1", "cars@2", "dogs@1"]
    assert [r.ref for r in reg.versions("cars")] == ["cars@1", "cars@2"]
    # The old version is kept for rollback.
    reg.store_mask(a1.id, delta())
    reg.store_mask(a2.id, delta((1.0, 2.0)))
    assert reg.active_version("cars") == reg.get(a2.id)
    assert [r.ref for r in reg.versions(status="READY")] == ["cars@1", "cars@2"]


def test_same_source_strategy_params_returns_existing(reg: Registry) -> None:
    first, created = reg.begin_version("cars", SHA_A, "dataless", {"sparsity": 0.01, "seed": 1})
    again, created2 = reg.begin_version("other-name", SHA_A, "dataless", {"seed": 1, "sparsity": 0.01})
    assert created and not created2
    assert again == first
    assert len(reg.versions()) == 1
    assert reg.find_by_source(SHA_A) == [first]
    # Other params or another strategy are another version of the skill.
    other, created3 = reg.begin_version("cars", SHA_A, "dataless", {"sparsity": 0.02})
    assert created3 and other.version == 2
    assert reg.begin_version("cars", SHA_A, "trained", {"sparsity": 0.01, "seed": 1})[0].version == 3
    assert len(reg.find_by_source(SHA_A)) == 3


def test_store_mask_is_content_addressed_and_round_trips(reg: Registry) -> None:
    row, _ = reg.begin_version("cars", SHA_A, "dataless", {})
    stored = reg.store_mask(row.id, delta())
    assert stored.status == "READY" and stored.nnz == 2 and stored.reason is None
    path = reg.mask_path(stored.mask_sha)
    assert path.name == f"{stored.mask_sha}.mask.safetensors" and sha256_file(path) == stored.mask_sha
    back = reg.load_mask(stored.mask_sha, verify=True)
    assert torch.equal(back.indices["w"], torch.tensor([1, 3], dtype=torch.int32))
    assert torch.equal(back.values["w"], torch.tensor([0.5, -0.25]))
    assert back.shapes == {"w": (2, 3)}
    # The same content for another version shares the file.
    row2, _ = reg.begin_version("cars", SHA_B, "dataless", {})
    assert reg.store_mask(row2.id, delta()).mask_sha == stored.mask_sha
    assert [p.name for p in reg.masks_dir.iterdir()] == [path.name]
    assert reg.integrity_check() == []


def test_store_mask_unknown_version_writes_nothing(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="no skill version with id 99"):
        reg.store_mask(99, delta())
    assert list(reg.masks_dir.iterdir()) == []


def test_load_mask_verify_and_bad_hash(reg: Registry) -> None:
    row = ready(reg, "cars", SHA_A)
    path = reg.mask_path(row.mask_sha)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="damaged"):
        reg.load_mask(row.mask_sha, verify=True)
    assert any("does not match its sha256" in p for p in reg.integrity_check())
    path.unlink()
    with pytest.raises(RegistryError, match="missing"):
        reg.load_mask(row.mask_sha)
    with pytest.raises(RegistryError, match="not a sha256"):
        reg.mask_path("../../etc/passwd")


def test_mark_failed_retry_and_update_meta(reg: Registry) -> None:
    row, _ = reg.begin_version("cars", SHA_A, "dataless", {}, meta={"a": 1})
    failed = reg.mark_failed(row.id, "smoke check: NaN outputs")
    assert failed.status == "FAILED" and failed.reason == "smoke check: NaN outputs"
    assert reg.active_version("cars") is None
    # The same work again finds the FAILED row; retrying it is an explicit decision.
    assert reg.begin_version("cars", SHA_A, "dataless", {}) == (failed, False)
    assert reg.retry(row.id).status == "PENDING"
    assert reg.update_meta(row.id, {"b": 2, "a": 3}).meta == {"a": 3, "b": 2}
    with pytest.raises(RegistryError, match="no skill version with id 42"):
        reg.get(42)


def _run_child(code: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, str(state)], capture_output=True, text=True, timeout=120)


OPEN_IN_CHILD = """
import sys
from skillhub.errors import StateLockedError
from skillhub.registry import Registry
try:
    Registry(sys.argv[1]).close()
except StateLockedError as e:
    print(e)
    sys.exit(3)
print("opened")
"""


def test_second_process_is_refused_and_lock_released_after_close(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Registry(state):
        done = _run_child(OPEN_IN_CHILD, state)
        assert done.returncode == 3, done.stderr
        assert f"already in use by pid {os.getpid()}" in done.stdout
        # Within this process too: flock is per open file, so a second Registry is refused.
        with pytest.raises(StateLockedError) as info:
            Registry(state)
        assert info.value.pid == os.getpid()
    done = _run_child(OPEN_IN_CHILD, state)
    assert done.returncode == 0 and "opened" in done.stdout, done.stderr
    Registry(state).close()


def test_dead_owner_lock_is_released_by_the_os(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code = ("import sys, time\nfrom skillhub.registry import Registry\nr = Registry(sys.argv[1])\n"
            "print('ready', flush=True)\ntime.sleep(120)\n")
    with subprocess.Popen([sys.executable, "-c", code, str(state)], stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(StateLockedError, match=f"pid {child.pid}"):
            Registry(state)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    Registry(state).close()


def test_recover(reg: Registry) -> None:
    kept = ready(reg, "cars", SHA_A)
    lost = ready(reg, "dogs", SHA_B, (1.0, 2.0))
    pending, _ = reg.begin_version("birds", SHA_C, "dataless", {})
    reg.mask_path(lost.mask_sha).unlink()
    debris = [reg.masks_dir / ".incoming-7-123-abcd.tmp", reg.masks_dir / "x.tmp", reg.staging_dir / ".half.tmp"]
    for p in debris:
        p.write_bytes(b"partial")
    (reg.staging_dir / "dir.tmp").mkdir()
    (reg.staging_dir / "dir.tmp" / "shard").write_bytes(b"x")
    keep_staged = reg.staging_dir / "staged.safetensors"
    keep_staged.write_bytes(b"x")
    orphan = reg.mask_path("d" * 64)
    orphan.write_bytes(b"orphan")

    report = reg.recover()

    assert sorted(report.removed_debris) == sorted([*debris, reg.staging_dir / "dir.tmp"])
    assert not any(p.exists() for p in report.removed_debris)
    assert [r.id for r in report.failed] == [lost.id]
    assert reg.get(lost.id).status == "FAILED" and reg.get(lost.id).reason == MISSING_MASK_REASON
    assert [r.id for r in report.pending] == [pending.id]
    aside = reg.state_dir / "orphans" / orphan.name
    assert report.removed_orphans == [aside] and not orphan.exists() and aside.read_bytes() == b"orphan"
    assert reg.get(kept.id).status == "READY" and reg.mask_path(kept.mask_sha).is_file()
    assert keep_staged.exists()
    assert reg.integrity_check() == []
    # A second pass finds only the still-pending row.
    again = reg.recover()
    assert not again.removed_debris and not again.failed and not again.removed_orphans and not again.clean


def test_pragmas_are_set(reg: Registry) -> None:
    with sqlite3.connect(reg.db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()
    db = reg._db()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"


def test_corrupt_registry_is_refused_and_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    garbage = b"\x00garbage, not a database\xff" * 100
    (state / "registry.sqlite3").write_bytes(garbage)
    for readonly in (False, True):
        with pytest.raises(RegistryError, match="corrupt") as info:
            Registry(state, readonly=readonly)
        assert "skillhub doctor" in str(info.value)
        assert (state / "registry.sqlite3").read_bytes() == garbage
    # The lock was released on the way out.
    (state / "registry.sqlite3").unlink()
    Registry(state).close()


def test_damaged_sqlite_pages_are_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Registry(state) as r:
        for i in range(200):
            r.begin_version(f"skill-{i}", f"{i:064x}", "dataless", {"pad": "x" * 200})
    db = state / "registry.sqlite3"
    data = bytearray(db.read_bytes())
    data[4096:4096 * 8] = os.urandom(4096 * 7)  # keep the file header, smash the table pages
    db.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="corrupt"):
        Registry(state)
    assert db.read_bytes() == bytes(data)


def test_missing_registry_with_masks_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Registry(state) as r:
        ready(r, "cars", SHA_A)
    (state / "registry.sqlite3").unlink()
    with pytest.raises(RegistryError, match="registry is missing but masks/ holds 1 mask files"):
        Registry(state)


def test_readonly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(RegistryError, match="no registry here"):
        Registry(state, readonly=True)
    with Registry(state) as owner:
        row = ready(owner, "cars", SHA_A)
        with Registry(state, readonly=True) as ro:  # no lock taken: readable next to the owner
            assert ro.get(row.id) == row
            assert ro.active_version("cars") == row
            with pytest.raises(RegistryError, match="read-only"):
                ro.begin_version("x", SHA_B, "dataless", {})
            with pytest.raises(RegistryError, match="read-only"):
                ro.recover()


def test_unwritable_state_folder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o500)
    try:
        try:
            (state / "probe").write_bytes(b"")
        except PermissionError:
            pass
        else:
            pytest.skip("running as root (or on a file system that ignores modes): chmod does not block writes")
        with pytest.raises(RegistryError, match="not writable") as info:
            Registry(state)
        assert str(state) in str(info.value) and "Hint:" in str(info.value)
    finally:
        state.chmod(0o700)


HOSTILE = ["line\nbreak", "quote ' \" `", "'; DROP TABLE versions; --", "nul\x00byte", "ünïcödé 技能 🙂",
           "-leading-dash", "back\\slash", "x" * 2000, "%_like_wildcards_%", "tab\tand\rcr"]


def test_hostile_skill_names_round_trip(reg: Registry) -> None:
    for i, name in enumerate(HOSTILE):
        row, _ = reg.begin_version(name, f"{i:064x}", "dataless", {"name": name})
        assert reg.get(row.id).skill == name and reg.get(row.id).params == {"name": name}
        reg.set_enabled(name, False)
    assert [s.name for s in reg.skills()] == sorted(HOSTILE)
    assert all(not s.enabled for s in reg.skills())
    assert [r.skill for r in reg.versions("%_like_wildcards_%")] == ["%_like_wildcards_%"]
    assert reg.remove_skill("'; DROP TABLE versions; --") == 1
    assert len(reg.versions()) == len(HOSTILE) - 1
    for call in (lambda n: reg.begin_version(n, SHA_A, "dataless", {}), reg.versions):
        with pytest.raises(RegistryError, match="not valid UTF-8"):
            call(os.fsdecode(b"bad\xff"))
    with pytest.raises(RegistryError):
        reg.remove_skill(os.fsdecode(b"bad\xff"))


def test_set_pinned_and_active_version(reg: Registry) -> None:
    v1 = ready(reg, "cars", SHA_A)
    v2 = ready(reg, "cars", SHA_B, (1.0, 2.0))
    v3, _ = reg.begin_version("cars", SHA_C, "dataless", {})
    assert reg.active_version("cars") == v2
    reg.set_pinned("cars", 1)
    assert reg.active_version("cars") == v1
    assert reg.skills()[0].pinned == 1 and reg.skills()[0].latest_ready == v2
    with pytest.raises(RegistryError, match="PENDING; only READY"):
        reg.set_pinned("cars", v3.version)
    with pytest.raises(RegistryError, match="no version 9"):
        reg.set_pinned("cars", 9)
    with pytest.raises(RegistryError, match="unknown skill"):
        reg.set_pinned("planes", 1)
    # A pinned version that later fails falls back to the latest READY one.
    reg.mark_failed(v1.id, "bad")
    assert reg.active_version("cars") == v2
    reg.set_pinned("cars", None)
    assert reg.skills()[0].pinned is None
    assert reg.active_version("planes") is None


def test_remove_skill_and_gc(reg: Registry) -> None:
    ready(reg, "cars", SHA_A)
    ready(reg, "cars", SHA_B, (1.0, 2.0))
    shared = ready(reg, "dogs", SHA_C)  # the same mask bytes as cars@1: one shared file
    reg.set_enabled("cars", False)
    assert len(list(reg.masks_dir.iterdir())) == 2
    assert reg.remove_skill("cars") == 2
    assert [s.name for s in reg.skills()] == ["dogs"]
    assert [p.name for p in reg.masks_dir.iterdir()] == [reg.mask_path(shared.mask_sha).name]
    with pytest.raises(RegistryError, match="unknown skill"):
        reg.remove_skill("cars")
    assert reg.gc() == 0
    # The skill can come back; it starts again at version 1.
    assert reg.begin_version("cars", "e" * 64, "dataless", {})[0].version == 1


def test_concurrent_threads_get_distinct_versions(reg: Registry) -> None:
    def work(t: int) -> None:
        for i in range(10):
            row, _ = reg.begin_version("cars", f"{t:032x}{i:032x}", "dataless", {})
            reg.store_mask(row.id, delta((float(t), float(i))))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [r.version for r in reg.versions("cars", "READY")] == list(range(1, 41))
    assert reg.integrity_check() == [] and reg.recover().clean
