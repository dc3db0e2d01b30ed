"""doctor, backup and restore on a real state folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from skillhub.checkpoint import write_safetensors
from skillhub.config import load_config
from skillhub.errors import RegistryError
from skillhub.hub import Hub
from skillhub.maintenance import backup, doctor, restore


def started_hub(root: Path) -> Hub:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(20, generator=g)}
    write_safetensors(root / "base.safetensors", base, {})
    (root / "config.toml").write_text('[base]\nweights = "base.safetensors"\n[state]\ndir = "state"\n'
                                      '[localize.params]\nsparsity = 0.3\n')
    hub = Hub(load_config(root / "config.toml", env={}))
    hub.start()
    for i in range(2):
        write_safetensors(root / f"s{i}.safetensors", {"w": base["w"] + 0.1 * torch.randn(20, generator=g)}, {})
        hub.ingest(root / f"s{i}.safetensors", skill=f"s{i}")
    hub.reconcile()
    return hub


def test_doctor_backup_restore_round_trip(tmp_path: Path) -> None:
    hub = started_hub(tmp_path)
    state = tmp_path / "state"
    try:
        report = doctor(state)  # while the service holds the lock
        assert report.healthy, report.problems
        assert any("held by pid" in n for n in report.notes)
        copied = backup(state, tmp_path / "bk")  # online
        assert copied["masks"] == 2
        with pytest.raises(RegistryError, match="in use by pid"):
            restore(tmp_path / "bk", state, force=True)
    finally:
        hub.close()
    # Lose a mask file: doctor names it; restore the backup and all is well again.
    victim = next((state / "masks").glob("*.mask.safetensors"))
    victim.unlink()
    report = doctor(state)
    assert not report.healthy and any("missing" in p for p in report.problems)
    with pytest.raises(RegistryError, match="registry exists"):
        restore(tmp_path / "bk", state)
    restore(tmp_path / "bk", state, force=True)
    assert (state / "registry.sqlite3.before-restore").exists()
    assert doctor(state).healthy
    again = Hub(load_config(tmp_path / "config.toml", env={}))
    again.start()
    try:
        assert set(again.current.manifest["skills"]) == {"s0", "s1"}
    finally:
        again.close()


def test_doctor_on_an_empty_or_corrupt_folder(tmp_path: Path) -> None:
    assert not doctor(tmp_path / "nothing").healthy
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "registry.sqlite3").write_bytes(b"garbage" * 100)
    report = doctor(tmp_path / "s")
    assert not report.healthy and "corrupt" in report.problems[0]
