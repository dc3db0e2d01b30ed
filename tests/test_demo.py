"""The pretrained Lite0 tower, its open_clip wrapper, the shipped-data tasks, heads and the few-shot objective."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from skillhub.demo import finetune as T
from skillhub.demo import tasks as D
from skillhub.demo import tower as V
from skillhub.families.fewshot import ImageObjective
from skillhub.head import Head

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tower() -> torch.nn.Module:
    return V.image_tower()


def test_lite0_weights_map_onto_timm_keys_in_order() -> None:
    import timm

    sd = V.lite0_state_dict()
    for name in ("efficientnet_lite0", V.TIMM_NAME):  # same layout; tf_ adds TF "same" padding and BN eps 1e-3
        ref = timm.create_model(name, pretrained=False).state_dict()
        assert list(sd) == list(ref)
        assert all(sd[k].shape == ref[k].shape and sd[k].dtype == ref[k].dtype for k in ref)
    assert sd["classifier.weight"].shape == (1000, 1280)
    assert not torch.equal(sd["conv_stem.weight"], ref["conv_stem.weight"])  # real weights, not timm's init
    sd["conv_stem.weight"].zero_()  # callers get a copy
    assert V.lite0_state_dict()["conv_stem.weight"].abs().sum() > 0


def test_image_tower_has_the_pretrained_weights_and_parameters_only_are_included(tower: torch.nn.Module) -> None:
    sd = V.lite0_state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in tower.state_dict().items())
    keys = V.included_keys(tower)
    assert "conv_stem.weight" in keys and "bn1.weight" in keys
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in keys)
    assert sum(tower.get_parameter(k).numel() for k in keys) == pytest.approx(3.37e6, rel=0.02)


def test_build_clip_gives_1280_d_pretrained_image_embeddings(tower: torch.nn.Module) -> None:
    model = V.build_clip(image_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        emb = model.encode_image(x)
        assert emb.shape == (2, 1280)
        torch.testing.assert_close(emb, tower(x))  # "none" projection: the trunk's pooled features, unchanged
        text = model.encode_text(torch.zeros(2, 32, dtype=torch.long))
    assert text.shape == (2, 1280)
    state = model.state_dict()
    assert torch.equal(state["visual.trunk.conv_stem.weight"], V.lite0_state_dict()["conv_stem.weight"])
    assert V.clip_config()["embed_dim"] == 1280
    # the text tower is a seeded placeholder
    assert torch.equal(V.build_clip(32, seed=1).state_dict()["token_embedding.weight"],
                       V.build_clip(32, seed=1).state_dict()["token_embedding.weight"])


def test_tasks_are_deterministic_with_the_promised_shapes() -> None:
    sizes = (12, 6, 8)
    a = D.make_tasks(image_size=32, seed=0, sizes=sizes)
    b = D.make_tasks(image_size=32, seed=0, sizes=sizes)
    c = D.make_tasks(image_size=32, seed=1, names=["letters"], sizes=sizes)
    assert len(a) >= 6 and [t.name for t in a] == [t.name for t in b]
    assert len({t.name for t in a}) == len(a)
    for ta, tb in zip(a, b):
        assert len(ta.classes) >= 4
        for split, n in zip(("train", "val", "test"), sizes):
            (xa, ya), (xb, yb) = getattr(ta, split), getattr(tb, split)
            assert xa.shape == (n, 3, 32, 32) and xa.dtype == torch.float32 and ya.dtype == torch.int64
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert 0 <= int(ya.min()) and int(ya.max()) < len(ta.classes)
            assert bool(torch.isfinite(xa).all())
        # ImageNet-normalised: roughly centred, clearly not in [0, 1]
        assert float(ta.train[0].min()) < -0.5
    letters = next(t for t in a if t.name == "letters")
    assert letters.classes == list("ABCDEFGHIJ")
    assert not torch.equal(letters.train[0], c[0].train[0])
    with pytest.raises(ValueError, match="unknown task"):
        D.make_tasks(32, names=["nope"], sizes=sizes)


def test_prototype_heads_beat_chance_with_the_pretrained_tower(tower: torch.nn.Module) -> None:
    (digits,) = D.make_tasks(image_size=64, seed=0, names=["digits"], sizes=(100, 1, 200))
    head = V.prototype_head(tower, *digits.train, n_per_class=10)
    assert head.shape == (10, 1280)
    torch.testing.assert_close(head.norm(dim=1), torch.ones(10))
    assert V.evaluate(tower, head, *digits.test) > 0.2  # chance is 0.1 (measured: ~0.35)


def test_finetune_with_frozen_bn_changes_parameters_not_statistics(tower: torch.nn.Module) -> None:
    (task,) = D.make_tasks(image_size=32, seed=0, names=["shapes"], sizes=(16, 1, 1))
    head = V.prototype_head(tower, *task.train, 2)
    ft = T.finetune(tower, task, head, epochs=1, batch_size=8)
    base = tower.state_dict()
    assert not torch.equal(ft["conv_stem.weight"], base["conv_stem.weight"])
    assert all(torch.equal(ft[k], base[k]) for k in base if "running" in k or "num_batches" in k)
    assert torch.equal(tower.state_dict()["conv_stem.weight"], V.lite0_state_dict()["conv_stem.weight"])


def test_the_service_objective_is_differentiable_in_a_replaced_tensor(tower: torch.nn.Module) -> None:
    (task,) = D.make_tasks(image_size=32, seed=0, names=["digits"], sizes=(20, 1, 1))
    head = V.prototype_head(tower, *task.train, 2)
    obj = ImageObjective(tower, Head(head, None, task.classes, V.LOGIT_SCALE), *task.train, batch_size=8)
    assert obj.size == 20
    key = "blocks.6.0.conv_pw.weight"
    w = tower.get_parameter(key).detach().clone().requires_grad_(True)
    loss = obj.loss({key: w}, step=0)
    loss.backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0
    # with θ₀ in place the objective is the plain model's loss on the same batch
    with torch.no_grad():
        batch = obj._batch(0)
        plain = F.cross_entropy(V.logits(tower(task.train[0][batch]), head), task.train[1][batch])
    torch.testing.assert_close(loss.detach(), plain)
    assert obj.accuracy({key: w.detach()}) == pytest.approx(V.evaluate(tower, head, *task.train))
    with pytest.raises(Exception, match="not a tensor of the image tower"):
        obj.loss({"no.such.weight": w}, 0)


def test_quality_bench_quick_runs_end_to_end(tmp_path: Path) -> None:
    # One thread: on a busy 2-core machine two OpenMP threads per process spin against each other (measured: the
    # quick run took 106 s with two threads and 25 s with one while another benchmark was running).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    methods = [r["method"] for r in res["rows"]]
    for m in ("pretrained (θ₀)", "individual finetuned", "task arithmetic", "TIES", "DARE", "L&S dataless 1%",
              "L&S trained"):
        assert m in methods
    assert all(0 <= r["avg"] <= 1 for r in res["rows"])
    assert (tmp_path / "quality.png").stat().st_size > 0 and "| method |" in (tmp_path / "quality.md").read_text()
    steps = res["incremental"]["steps"]
    assert steps[-1]["action"] == "remove" and all(s["max_abs_diff_vs_scratch"] < 1e-6 for s in steps)


def test_fashion_mnist_is_read_from_idx_files_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip

    import numpy as np

    n = 60
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + images.tobytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes())
    assert "fashion" not in D.available_tasks(["fashion"]) or D.FASHION_DIR.is_dir()
    monkeypatch.setattr(D, "FASHION_DIR", tmp_path)
    assert D.available_tasks(["fashion", "digits"]) == ["fashion", "digits"]
    (task,) = D.make_tasks(image_size=32, names=["fashion"], sizes=(20, 10, 10))
    assert task.classes[0] == "t-shirt" and task.train[0].shape == (20, 3, 32, 32)
    assert sorted(task.train[1].tolist()) == sorted(list(range(10)) * 2)  # class-balanced draws


def test_registering_the_demo_clip_config_leaves_no_folder_behind() -> None:
    # it left one folder in /tmp per process that built the demo model (52 of them after a day of test runs)
    import tempfile

    import open_clip
    from open_clip import factory

    before = set(Path(tempfile.gettempdir()).glob("skillhub-open-clip-*"))
    V._register_clip_config.cache_clear()
    V._register_clip_config()
    assert set(Path(tempfile.gettempdir()).glob("skillhub-open-clip-*")) == before
    factory._rescan_model_configs()  # what another add_model_config does: the config stays registered
    assert V.MODEL_NAME in open_clip.list_models()
