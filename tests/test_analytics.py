"""Mask analytics (skillhub.analytics), the version history (skillhub.history) and the inbox view
(skillhub.inboxview): unit tests on tiny seeded masks against a brute-force reference, and end to end, the real
daemon's ``GET /v1/analytics`` on two finetunes with planted overlapping masks, checked against an independent
computation from the mask files it wrote (and against the planted numbers)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from harness import TOKEN, SHAPES, make_world
from skillhub.analytics import AnalyticsCache, analyze, layer_of, mask_loader, summary
from skillhub.dashboard import render_report
from skillhub.delta import SparseDelta
from skillhub.disposal import move_to_rejected
from skillhub.history import version_history
from skillhub.inboxview import inbox_view

UNIT_SHAPES = {"blocks.0.attn.w": (6, 5), "blocks.1.mlp.w": (40,), "blocks.10.b": (7,), "head.weight": (3, 4)}


def _delta(g: torch.Generator, share: float, dense_key: str | None = None) -> SparseDelta:
    """A random mask over UNIT_SHAPES (about ``share`` of each tensor), ``dense_key`` in the dense form."""
    indices, values = {}, {}
    for key, shape in UNIT_SHAPES.items():
        n = math.prod(shape)
        keep = torch.rand(n, generator=g) < share
        vals = torch.randn(n, generator=g)
        vals[vals == 0] = 1.0
        if key == dense_key:
            values[key] = torch.where(keep, vals, torch.zeros(()))
        elif keep.any():
            idx = keep.nonzero().reshape(-1)
            indices[key], values[key] = idx.to(torch.int32), vals[idx]
    return SparseDelta(indices, values, dict(UNIT_SHAPES), {k: torch.float32 for k in UNIT_SHAPES})


def _brute(masks: dict[str, SparseDelta]) -> tuple[dict, dict]:
    """Shares and pair numbers from whole boolean masks and dense τ (no sorted-index tricks)."""
    shares, pairs = {}, {}
    for n, d in masks.items():
        shares[n] = {k: float(d.mask(k).sum()) / math.prod(s) for k, s in UNIT_SHAPES.items()}
    names = sorted(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = conflict = either = 0
            for k in UNIT_SHAPES:
                ma, mb = masks[a].mask(k), masks[b].mask(k)
                ta, tb = masks[a].dense(k), masks[b].dense(k)
                both += int((ma & mb).sum())
                either += int((ma | mb).sum())
                conflict += int((ma & mb & (ta * tb < 0)).sum())
            pairs[(a, b)] = (both, both / either if either else 0.0, conflict / both if both else 0.0)
    return shares, pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_analyze_equals_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    masks = {"x": _delta(g, 0.3), "y": _delta(g, 0.6, dense_key="blocks.1.mlp.w"), "z": _delta(g, 0.1)}
    got = analyze(masks, version=7)
    shares, pairs = _brute(masks)
    assert got["version"] == 7 and sorted(got["skills"]) == ["x", "y", "z"]
    for n in masks:
        assert got["skills"][n]["tensors"] == pytest.approx(shares[n])
        assert got["skills"][n]["nnz"] == masks[n].nnz
        for layer in got["layer_sizes"]:
            keys = [k for k in UNIT_SHAPES if layer_of(k) == layer]
            want = sum(shares[n][k] * math.prod(UNIT_SHAPES[k]) for k in keys) / sum(math.prod(UNIT_SHAPES[k])
                                                                                   for k in keys)
            assert got["skills"][n]["layers"][layer] == pytest.approx(want)
    assert [(p["a"], p["b"]) for p in got["pairs"]] == [("x", "y"), ("x", "z"), ("y", "z")]
    for p in got["pairs"]:
        both, jaccard, conflict = pairs[(p["a"], p["b"])]
        assert (p["both"], p["jaccard"], p["sign_conflict"]) == (both, pytest.approx(jaccard), pytest.approx(conflict))
        assert sum(p["layers"].values()) == both
    assert any(p["both"] > 0 for p in got["pairs"])  # the seeds do overlap: the test can fail


def test_layer_rule() -> None:
    assert layer_of("blocks.3.1.conv_dw.weight") == "blocks.3"
    assert layer_of("transformer.resblocks.11.attn.in_proj_weight") == "transformer.resblocks.11"
    assert layer_of("conv_stem.weight") == "conv_stem"
    assert layer_of("logit_scale") == "logit_scale"
    got = analyze({"x": _delta(torch.Generator().manual_seed(0), 0.5)})
    assert list(got["layer_sizes"]) == ["blocks.0", "blocks.1", "blocks.10", "head"]
    assert got["layer_sizes"]["head"] == 12 and got["pairs"] == []


def test_no_overlap_and_shape_mismatch() -> None:
    shapes = {"w": (10,)}
    f32 = {"w": torch.float32}
    a = SparseDelta({"w": torch.tensor([0, 1], dtype=torch.int32)}, {"w": torch.tensor([1.0, 1.0])}, shapes, f32)
    b = SparseDelta({"w": torch.tensor([5], dtype=torch.int32)}, {"w": torch.tensor([-1.0])}, shapes, f32)
    (pair,) = analyze({"a": a, "b": b})["pairs"]
    assert (pair["both"], pair["jaccard"], pair["sign_conflict"]) == (0, 0.0, 0.0)
    c = SparseDelta({}, {}, {"w": (11,)}, f32)
    with pytest.raises(Exception, match="disagree on the shape of 'w'"):
        analyze({"a": a, "c": c})


def test_cache_computes_once_per_version(tmp_path: Path) -> None:
    (tmp_path / "masks").mkdir()
    paths = {}
    g = torch.Generator().manual_seed(3)
    for n in ("p", "q"):  # stored under their content address, as the registry does
        tmp = tmp_path / "masks" / f"{n}.tmp"
        sha = _delta(g, 0.4).save(tmp)
        os.replace(tmp, tmp_path / "masks" / f"{sha}.mask.safetensors")
        paths[n] = sha
    cache = AnalyticsCache(mask_loader(tmp_path), size=2)
    manifest = {"skills": {n: {"mask": sha} for n, sha in paths.items()}}
    first = cache.of(1, manifest)
    assert cache.of(1, manifest) is first and cache.computed == 1
    cache.of(2, {"skills": {"p": {"mask": paths["p"]}}})
    cache.of(3, manifest)
    assert cache.computed == 3
    cache.of(1, manifest)  # evicted (size 2): computed again, the same numbers
    assert cache.computed == 4 and cache.of(1, manifest) == first
    with pytest.raises(Exception, match="not a sha256"):
        mask_loader(tmp_path)("../../etc/passwd")
    text = summary(first)
    assert "p x q" in text and "version 1" in text
    html = render_report(first)
    assert "<svg" in html and "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")


def test_history_names_each_change() -> None:
    def entry(version: int, source: str, mask: str, strategy: str = "dataless") -> dict:
        return {"version": version, "source": source, "mask": mask, "strategy": strategy, "params": {}}

    manifests = [
        {"version": 3, "created": 1.0, "skills": {"a": entry(1, "s1", "m1")}},
        {"version": 4, "created": 2.0, "skills": {"a": entry(1, "s1", "m1"), "b": entry(1, "t1", "n1")},
         "quality": {"b": {"accuracy": {"base": 0.5, "skill": 0.9, "merged": 0.8}}}},
        {"version": 5, "created": 3.0, "skills": {"a": entry(1, "s1", "m2", "trained"), "b": entry(2, "t2", "n2")}},
        {"version": 6, "created": 4.0, "skills": {"b": entry(2, "t2", "n2")},
         "held": {"c": {"version": 1, "reason": "held out: merged accuracy below base"}}},
    ]
    h = version_history(manifests[::-1])
    assert [e["version"] for e in h] == [6, 5, 4, 3]
    v6, v5, v4, v3 = h
    assert v3["previous"] is None and [a["name"] for a in v3["added"]] == ["a"]
    assert [a["name"] for a in v4["added"]] == ["b"] and v4["accuracy"]["b"]["merged"] == 0.8
    assert [(c["name"], c["strategy"]) for c in v5["relocalized"]] == [("a", "trained")]
    assert [(c["name"], c["from"], c["to"]) for c in v5["updated"]] == [("b", 1, 2)]
    assert v5["added"] == [] and v5["removed"] == []
    assert [r["name"] for r in v6["removed"]] == ["a"] and v6["held"] == {"c": "held out: merged accuracy below base"}


def test_inbox_view(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "good.safetensors").write_bytes(b"x" * 10)
    (inbox / "good.toml").write_text("")  # a sidecar, not a drop
    (inbox / ".hidden.safetensors").write_bytes(b"")
    (inbox / "half.safetensors.part").write_bytes(b"")
    (inbox / "folder").mkdir()
    (inbox / "folder" / "model.safetensors").write_bytes(b"y" * 7)
    (inbox / "bad.safetensors").write_bytes(b"z")
    move_to_rejected(inbox, "bad.safetensors", "file", "not a safetensors file (header too short)")
    view = inbox_view(inbox)
    assert sorted((p["name"], p["bytes"]) for p in view["pending"]) == [("folder", 7), ("good.safetensors", 10)]
    assert view["rejected"] == [{"name": "bad.safetensors", "reason": "not a safetensors file (header too short)",
                                 "rejected": pytest.approx(time.time(), abs=60)}]
    assert inbox_view(tmp_path / "missing") == {"pending": [], "rejected": []}
    taken = tmp_path / "staging" / ".taken"  # drops moved out of the inbox while they are localized still wait
    taken.mkdir(parents=True)
    (taken / "busy.safetensors").write_bytes(b"w" * 3)
    view = inbox_view(inbox, taken=taken)
    assert sorted((p["name"], p["bytes"], p["taken"]) for p in view["pending"]) == [
        ("busy.safetensors", 3, True), ("folder", 7, False), ("good.safetensors", 10, False)]


# --- end to end: planted overlaps through the real daemon ----------------------------------------------------------

def _planted() -> dict[str, dict[tuple[str, int], float]]:
    """Two skills' planted τ entries (52 each: the top 10% that dataless keeps of the 528 parameters): ``a`` takes
    all of ``enc.bias`` (stored dense), ``b`` half of it; 22 entries in both, 9 of them with opposite signs."""
    a = {("enc.bias", i): 0.5 + 0.01 * i for i in range(24)}
    a |= {("enc.weight", i): 0.5 + 0.01 * i for i in range(20)}
    a |= {("head.weight", i): 0.6 for i in range(8)}
    b = {("enc.bias", i): (-0.55 if i < 4 else 0.55) for i in range(12)}
    b |= {("enc.weight", i): (-0.52 if i < 15 else 0.52) for i in range(10, 30)}
    b |= {("head.weight", i): 0.57 for i in range(100, 120)}
    assert len(a) == len(b) == 52
    return {"a": a, "b": b}


def _finetune(base: dict[str, torch.Tensor], planted: dict[tuple[str, int], float], seed: int
              ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in base.items():
        flat = t.reshape(-1) + 1e-4 * torch.randn(t.numel(), generator=g)  # below every planted entry
        for (k, i), v in planted.items():
            if k == key:
                flat[i] = t.reshape(-1)[i] + v
        out[key] = flat.reshape(t.shape)
    return out


def _from_mask_file(path: Path) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    """A mask file read with safetensors alone: per key {flat index: τ}, and every included tensor's size."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
        sizes = {k: math.prod(s) for k, s in json.loads(meta["skillhub.shapes"]).items()}
        out: dict[str, dict[int, float]] = {k: {} for k in sizes}
        for key in sizes:
            if f"{key}::values" not in names:
                continue
            vals = f.get_tensor(f"{key}::values").reshape(-1).tolist()
            if f"{key}::indices" in names:
                out[key] = dict(zip(f.get_tensor(f"{key}::indices").tolist(), vals))
            else:  # dense: the mask is the non-zero values
                out[key] = {i: v for i, v in enumerate(vals) if v != 0}
    return out, sizes


def _layer(key: str) -> str:
    return key.split(".")[0]  # the harness's keys carry no block index: enc.weight, enc.bias -> enc; head.weight


def test_api_analytics_equal_the_mask_files(tmp_path: Path) -> None:
    root, base, _, svc = make_world(tmp_path)
    planted = _planted()
    (root / "inbox").mkdir()
    for seed, (name, entries) in enumerate(planted.items(), start=11):
        tmp = root / "inbox" / f".{name}.part"
        tmp.write_bytes(save_safetensors(_finetune(base, entries, seed)))
        os.rename(tmp, root / "inbox" / f"{name}.safetensors")
    try:
        svc.start()
        svc.wait(lambda: set(svc.model().get("skills", {})) == {"a", "b"}, "a and b served")
        model = svc.model()
        got = svc.get("/v1/analytics").json()
        assert got["version"] == model["version"]

        files = {n: _from_mask_file(root / "state" / "masks" / f"{e['mask']}.mask.safetensors")
                 for n, e in model["skills"].items()}
        sizes = files["a"][1]
        assert sizes == {k: math.prod(s) for k, s in SHAPES.items()}
        # the dataless masks are the planted entries (enc.bias of a is stored dense: 24 of 24 entries)
        for n in ("a", "b"):
            assert {(k, i) for k, m in files[n][0].items() for i in m} == set(planted[n])
        assert "enc.bias::indices" not in safe_open(str(root / "state" / "masks" /
                                                         f"{model['skills']['a']['mask']}.mask.safetensors"),
                                                     framework="pt").keys()
        layers: dict[str, int] = {}
        for k, s in sizes.items():
            layers[_layer(k)] = layers.get(_layer(k), 0) + s
        assert got["layer_sizes"] == layers
        for n, (masks, _) in files.items():
            s = got["skills"][n]
            assert s["nnz"] == sum(len(m) for m in masks.values()) == 52
            assert s["tensors"] == {k: len(masks[k]) / sizes[k] for k in sizes}
            assert s["layers"] == {p: sum(len(masks[k]) for k in sizes if _layer(k) == p) / layers[p]
                                   for p in layers}
        (ma, _), (mb, _) = files["a"], files["b"]
        common = [(k, i) for k in sizes for i in ma[k] if i in mb[k]]
        conflict = sum(1 for k, i in common if ma[k][i] * mb[k][i] < 0)
        (pair,) = got["pairs"]
        assert (pair["a"], pair["b"], pair["both"]) == ("a", "b", len(common))
        assert pair["jaccard"] == pytest.approx(len(common) / (104 - len(common)))
        assert pair["sign_conflict"] == pytest.approx(conflict / len(common))
        # and the planted numbers themselves
        assert (pair["both"], conflict) == (22, 9)
        assert got["skills"]["a"]["layers"]["enc"] == pytest.approx(44 / 408)
        assert got["skills"]["b"]["tensors"]["head.weight"] == pytest.approx(20 / 120)

        # the CLI answers the same, through the running service
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")} | {"SKILLHUB_TOKEN": TOKEN}
        report = root / "report.html"
        r = subprocess.run([sys.executable, "-m", "skillhub", "analytics", "--config", str(root / "config.toml"),
                            "--json", "--out", str(report)], cwd=root, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == got
        assert "<svg" in report.read_text() and "a × b" in report.read_text()
        r = subprocess.run([sys.executable, "-m", "skillhub", "analytics", "--config", str(root / "config.toml"),
                            "--version", "999"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "unknown version 999" in r.stderr
        assert svc.get("/v1/analytics?version=999").status_code == 404
        assert svc.get(f"/v1/analytics?version={got['version']}").json() == got
        assert svc.stop() == 0
        # and, the service stopped, from the state folder's manifest and mask files alone
        r = subprocess.run([sys.executable, "-m", "skillhub", "analytics", "--config", str(root / "config.toml"),
                            "--json"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == got
        r = subprocess.run([sys.executable, "-m", "skillhub", "analytics", "--config", str(root / "config.toml")],
                           cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "a x b: both 22, jaccard 0.2683, sign conflict 40.9%" in r.stdout, r.stdout
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()
