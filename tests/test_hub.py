"""The in-process service: reconcile and publish guarantees (FAULTS C7, C10, C11) on a real state folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from skillhub.checkpoint import write_safetensors
from skillhub.config import load_config
from skillhub.errors import CheckpointError
from skillhub.hub import Hub


def make_hub(root: Path, base: dict[str, torch.Tensor], extra: str = "") -> Hub:
    write_safetensors(root / "base.safetensors", base, {})
    (root / "config.toml").write_text(f'[base]\nweights = "base.safetensors"\n[state]\ndir = "state"\n'
                                      f'[localize]\nmax_relative_delta = 100.0\n'  # these finetunes are far from θ₀ on purpose
                                      f'[localize.params]\nsparsity = 0.5\n{extra}')
    hub = Hub(load_config(root / "config.toml", env={}))
    hub.start()
    return hub


def drop(root: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = root / f"{name}.safetensors"
    write_safetensors(path, tensors, {})
    return path


def test_c7_a_version_failing_its_smoke_check_is_not_published(tmp_path: Path) -> None:
    # θ₀ near float32's maximum; λ = 10 in the sum policy overflows to inf: the smoke check must catch it.
    base = {"w": torch.full((8,), 3.0e38)}
    hub = make_hub(tmp_path, base, '[stitch]\npolicy = "sum"\n[stitch.params]\nscale = 10.0\n')
    try:
        v1 = hub.current
        assert v1 is not None and v1.manifest["skills"] == {}
        hub.ingest(drop(tmp_path, "boom", {"w": torch.full((8,), 3.3e38)}), skill="boom")
        assert hub.reconcile() is None
        assert hub.current is v1  # the old version keeps serving
        row = hub.registry.versions("boom")[-1]
        assert row.status == "FAILED" and "NaN/Inf" in (row.reason or "")
        assert json.loads((tmp_path / "state/models/current").read_text()) == v1.number
    finally:
        hub.close()


@pytest.mark.parametrize("sparse_from", [None, 0])
def test_c10_removing_every_skill_returns_exactly_to_base(tmp_path: Path, sparse_from: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    # sparse_from = 0: the big-model layout (sparse state derived from the kept masks) on this tiny model
    hub = make_hub(tmp_path, base, "" if sparse_from is None else f"[stitch]\nsparse_from = {sparse_from}\n")
    try:
        assert hub.reconciler.stitcher.derived == (sparse_from == 0)
        for i in range(3):
            ft = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
            hub.ingest(drop(tmp_path, f"s{i}", ft), skill=f"s{i}")
        for _ in range(5):  # add and remove the same skills repeatedly: no drift
            for i in range(3):
                hub.set_enabled(f"s{i}", True)
            hub.reconcile()
            assert set(hub.current.manifest["skills"]) == {"s0", "s1", "s2"}
            for i in range(3):
                hub.set_enabled(f"s{i}", False)
            hub.reconcile()
            for k in base:
                assert torch.equal(hub.current.tensors[k], base[k])
    finally:
        hub.close()


def test_c11_pin_switches_versions_and_restart_serves_the_same_version(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(10, generator=g)}
    hub = make_hub(tmp_path, base)
    try:
        hub.ingest(drop(tmp_path, "v1", {"w": base["w"] + 1}), skill="x")
        hub.ingest(drop(tmp_path, "v2", {"w": base["w"] - 1}), skill="x")
        hub.reconcile()
        assert hub.current.manifest["skills"]["x"]["version"] == 2
        hub.pin("x", 1)
        hub.reconcile()
        pinned = hub.current
        assert pinned.manifest["skills"]["x"]["version"] == 1
    finally:
        hub.close()
    again = Hub(load_config(tmp_path / "config.toml", env={}))
    again.start()
    try:
        assert again.current.number == pinned.number  # same manifest after a restart: same version number
        assert torch.equal(again.current.tensors["w"], pinned.tensors["w"])
    finally:
        again.close()


def test_zero_task_vector_is_rejected_with_a_reason(tmp_path: Path) -> None:
    base = {"w": torch.randn(10)}
    hub = make_hub(tmp_path, base)
    try:
        with pytest.raises(CheckpointError, match="task vector is zero"):
            hub.ingest(drop(tmp_path, "same", dict(base)), skill="same")
        assert hub.registry.versions("same")[-1].status == "FAILED"
        assert hub.reconcile() is None
    finally:
        hub.close()


# --- promises of README and config.toml (issue #9) -----------------------------------------------------------------

def _staged(root: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint in the state folder's staging/ (where intake puts a drop's copy)."""
    folder = root / "state" / "staging"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    write_safetensors(path, tensors, {})
    return path


def test_keep_staged_false_deletes_the_staged_copy_once_its_mask_is_stored(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(6, 5, generator=g)}
    hub = make_hub(tmp_path, base)
    try:
        staged = _staged(tmp_path, "a", {"w": base["w"] + torch.randn(6, 5, generator=g)})
        row = hub.ingest(staged, skill="a", keep=False)
        assert row.status == "READY" and row.source_path is None
        assert hub.registry.mask_path(row.mask_sha or "").is_file()
        assert not staged.exists()  # the full-size copy is gone once the mask is durable
        kept = _staged(tmp_path, "b", {"w": base["w"] + torch.randn(6, 5, generator=g)})
        assert hub.ingest(kept, skill="b", keep=True).source_path == str(kept) and kept.exists()
    finally:
        hub.close()


def test_removing_a_skill_removes_its_staged_copy_and_heads_no_version_uses(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(6, 5, generator=g)}
    hub = make_hub(tmp_path, base)
    try:
        staged = _staged(tmp_path, "a", {"w": base["w"] + torch.randn(6, 5, generator=g)})
        row = hub.ingest(staged, skill="a")
        head = hub.registry.store_head({"weight": torch.ones(2, 5)}, {"skillhub.classes": '["x", "y"]'})
        hub.registry.update_meta(row.id, {**row.meta, "head": head})
        other = _staged(tmp_path, "b", {"w": base["w"] + torch.randn(6, 5, generator=g)})
        brow = hub.ingest(other, skill="b")
        hub.registry.update_meta(brow.id, {**brow.meta, "head": head})  # b shares the head: it must stay
        hub.remove("a")
        assert not staged.exists() and other.exists()
        assert (tmp_path / "state" / "heads" / f"{head}.safetensors").is_file()
        hub.remove("b")
        assert not other.exists() and not (tmp_path / "state" / "heads" / f"{head}.safetensors").exists()
    finally:
        hub.close()


def test_a_pin_on_a_version_that_is_not_ready_serves_the_newest_ready_one(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(6, 5, generator=g)}
    hub = make_hub(tmp_path, base)
    try:
        for _ in range(2):
            hub.ingest(drop(tmp_path, "s", {"w": base["w"] + torch.randn(6, 5, generator=g)}), skill="s")
        v1, v2 = hub.registry.versions("s")
        hub.pin("s", 1)
        hub.reconcile()
        assert hub.current is not None and hub.current.manifest["skills"]["s"]["version"] == 1
        hub.registry.mark_failed(v1.id, "its mask went missing")  # what start-up recovery does (C2)
        hub.reconcile()
        assert hub.current is not None and hub.current.manifest["skills"]["s"]["version"] == 2
        assert hub.registry.active_version("s") == hub.registry.get(v2.id)  # the registry says the same
    finally:
        hub.close()


def test_a_config_edit_relocalizes_from_the_staged_copy_unless_it_no_longer_matches(tmp_path: Path) -> None:
    import time as _time

    from skillhub.config import load_config as _load

    g = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(10, 10, generator=g)}
    hub = make_hub(tmp_path, base)
    try:
        a = hub.ingest(_staged(tmp_path, "a", {"w": base["w"] + torch.randn(10, 10, generator=g)}), skill="a")
        b = hub.ingest(_staged(tmp_path, "b", {"w": base["w"] + torch.randn(10, 10, generator=g)}), skill="b")
        hub.reconcile()
        assert hub.current is not None and hub.current.manifest["skills"]["a"]["nnz"] == 50
        Path(b.source_path or "").write_bytes(b"damaged after a machine crash")  # b's staged copy goes bad
        text = (tmp_path / "config.toml").read_text()
        (tmp_path / "config.toml").write_text(text + '[skills.a]\nparams = { sparsity = 0.25 }\n'
                                                      '[skills.b]\nparams = { sparsity = 0.25 }\n')
        hub.apply_config(_load(tmp_path / "config.toml", env={}))
        deadline = _time.monotonic() + 20
        while _time.monotonic() < deadline:
            hub.reconcile()
            if hub.current.manifest["skills"]["a"]["nnz"] == 25 and any(
                    v.status == "FAILED" for v in hub.registry.versions("b")):
                break
            _time.sleep(0.05)
        served = hub.current.manifest["skills"]
        assert served["a"]["nnz"] == 25 and served["a"]["version"] == 2  # re-localized, a new version of a
        assert served["b"]["version"] == b.version and served["b"]["nnz"] == 50  # b keeps serving what it had
        failed = [v for v in hub.registry.versions("b") if v.status == "FAILED"]
        assert failed and "no longer matches" in (failed[0].reason or "")
        assert a.id != hub.registry.versions("a")[-1].id
    finally:
        hub.close()
