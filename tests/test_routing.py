"""Skill-routed inference: the patcher writes exactly θ₀ + γ⊙τ into its one copy and θ₀ back, bit for bit; the mask
cache stays within its bytes; the engine batches by model and answers each route from the right weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from skillhub.delta import SparseDelta
from skillhub.errors import StitchError
from skillhub.families import Runtime
from skillhub.head import Head
from skillhub.inference import InferenceEngine
from skillhub.publish import ModelVersion
from skillhub.routing import MaskCache, PatchedTensors, SkillPatcher, check_route

SHAPES = {"a.weight": (6, 4), "a.bias": (6,), "b.weight": (3, 6)}


def base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def delta(seed: int, k: int = 5, dense: tuple[str, ...] = ()) -> SparseDelta:
    """A mask of ``k`` random entries per tensor (``dense`` keys: every entry, dense form)."""
    g = torch.Generator().manual_seed(seed)
    idx, vals = {}, {}
    for key, shape in SHAPES.items():
        n = torch.Size(shape).numel()
        if key in dense:
            vals[key] = torch.randn(n, generator=g)
            continue
        idx[key] = torch.randperm(n, generator=g)[:k].sort().values
        vals[key] = torch.randn(k, generator=g)
    return SparseDelta(idx, vals, dict(SHAPES), {k: torch.float32 for k in SHAPES})


def reference(theta0: Mapping[str, torch.Tensor], d: SparseDelta) -> dict[str, torch.Tensor]:
    return {k: t + d.dense(k) for k, t in theta0.items()}


class TinyRuntime(Runtime):
    """y = b(relu(a x)): enough of a model to tell weights apart."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.a = torch.nn.Linear(4, 6)
        self.b = torch.nn.Linear(6, 3, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(tensors["a.weight"])
            self.a.bias.copy_(tensors["a.bias"])
            self.b.weight.copy_(tensors["b.weight"])

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        return torch.stack(list(images))

    @torch.no_grad()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(batch)))

    def tensors(self) -> Mapping[str, torch.Tensor]:
        return {"a.weight": self.a.weight.data, "a.bias": self.a.bias.data, "b.weight": self.b.weight.data}


class PackedRuntime(TinyRuntime):
    """TinyRuntime whose tensors become views of one buffer (the patcher's one-scatter path)."""

    def pack(self) -> None:
        params = [self.a.weight, self.a.bias, self.b.weight]
        buffer = torch.cat([p.detach().reshape(-1) for p in params])
        offset = 0
        for p in params:
            p.data = buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()


@pytest.mark.parametrize("runtime", [TinyRuntime, PackedRuntime])
def test_patch_is_theta0_plus_masked_tau_and_restore_is_bit_exact(runtime: type[TinyRuntime]) -> None:
    theta0 = base()
    patcher = SkillPatcher(runtime(theta0))
    assert (patcher._buffer is not None) == (runtime is PackedRuntime)
    live = patcher.runtime.tensors()
    for d, sha in ((delta(1), "one"), (delta(2, dense=("a.weight",)), "two"), (delta(1), "one")):
        patcher.use(sha, d)
        want = reference(theta0, d)
        for k in SHAPES:
            assert torch.equal(live[k], want[k]), k
    assert patcher.switches == 3
    patcher.use("one", delta(1))  # the mask patched in now: no switch
    assert patcher.switches == 3
    patcher.restore()
    for k in SHAPES:
        assert torch.equal(live[k], theta0[k]), k  # the saved values, not a subtraction: bit for bit


def test_a_failed_patch_leaves_theta0() -> None:
    theta0 = base()
    patcher = SkillPatcher(TinyRuntime(theta0))
    bad = SparseDelta({"a.weight": torch.tensor([0, 1]), "zzz": torch.tensor([0])},
                      {"a.weight": torch.ones(2), "zzz": torch.ones(1)},
                      {"a.weight": (6, 4), "zzz": (1,)}, {})
    with pytest.raises(StitchError, match="zzz"):
        patcher.use("bad", bad)
    patcher.use("one", delta(1))  # restores the partial patch first
    want = reference(theta0, delta(1))
    assert all(torch.equal(patcher.runtime.tensors()[k], want[k]) for k in SHAPES)


def test_patched_tensors_match_the_reference_and_leave_the_base_alone() -> None:
    theta0 = base()
    copy = {k: v.clone() for k, v in theta0.items()}
    for d in (delta(3), delta(4, dense=("b.weight",))):
        got = PatchedTensors(theta0, d)
        assert list(got) == list(theta0) and len(got) == 3
        want = reference(theta0, d)
        for k in SHAPES:
            assert torch.equal(got[k], want[k]), k
    assert all(torch.equal(theta0[k], copy[k]) for k in SHAPES)


def test_mask_cache_reads_once_and_stays_within_its_bytes() -> None:
    reads: list[str] = []
    masks = {"x": delta(1), "y": delta(2), "z": delta(3)}

    def load(sha: str) -> SparseDelta:
        reads.append(sha)
        return masks[sha]

    one = masks["x"].nbytes
    cache = MaskCache(load, max_bytes=2 * one)
    for sha in ("x", "x", "y", "x", "z", "x", "y"):
        assert cache.get(sha) is masks[sha]
    # x stays (used last before z came); y was the least recently used when z arrived, so it is read again
    assert reads == ["x", "y", "z", "y"] and len(cache) == 2


def test_check_route() -> None:
    assert check_route("skill") == "skill" and check_route("merged") == "merged"
    with pytest.raises(StitchError, match="unknown route 'both'"):
        check_route("both")


def make_engine(theta0: dict[str, torch.Tensor], masks: dict[str, SparseDelta]) -> InferenceEngine:
    head = Head(torch.eye(3), None, ["p", "q", "r"], 1.0)
    return InferenceEngine(TinyRuntime, lambda sha: head if sha else None, base=lambda: theta0,
                           masks=masks.__getitem__, max_wait_ms=20)


def version(number: int, tensors: dict[str, torch.Tensor], skills: dict[str, str]) -> ModelVersion:
    return ModelVersion(number, tensors, {"skills": {s: {"version": 1, "mask": m, "head": "h"}
                                                     for s, m in skills.items()}})


def test_engine_answers_each_route_from_its_own_weights_batching_by_model() -> None:
    theta0 = base()
    masks = {"m1": delta(1), "m2": delta(2)}
    merged = {k: theta0[k] + (masks["m1"].dense(k) + masks["m2"].dense(k)) / 2 for k in SHAPES}
    v = version(7, merged, {"s1": "m1", "s2": "m2"})
    engine = make_engine(theta0, masks)
    engine.start()
    try:
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(9))
        # queued together: three models, so three batches, whatever order they come in
        futures = [engine.submit(v, x[:2], mask="m1"), engine.submit(v, x[2:], mask="m2"),
                   engine.submit(v, x[:3]), engine.submit(v, x[3:], mask="m1")]
        out = [f.result(10) for f in futures]
        assert engine.batches == 3
        for got, weights, rows in ((out[0], reference(theta0, masks["m1"]), x[:2]),
                                   (out[1], reference(theta0, masks["m2"]), x[2:]),
                                   (out[2], merged, x[:3]), (out[3], reference(theta0, masks["m1"]), x[3:])):
            assert torch.allclose(got, TinyRuntime(weights).embed(rows), rtol=1e-6, atol=1e-6)
        answer = engine.predict(v, "s2", list(x[:1]), top_k=2, route="skill")
        assert answer["route"] == "skill" and answer["version"] == 7 and answer["skill_version"] == 1
        assert len(answer["predictions"][0]) == 2
        with pytest.raises(StitchError, match="unknown route"):
            engine.predict(v, "s2", list(x[:1]), route="nope")
        with pytest.raises(StitchError, match="not in the served model"):
            engine.predict(v, "s3", list(x[:1]), route="skill")
    finally:
        engine.stop()
