"""Incremental stitching: every policy equals a from-scratch stitch of the active set, and θ₀ where no mask is."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skillhub.delta import Provenance, SparseDelta
from skillhub.errors import StitchError
from skillhub.plugins import load_plugins
from skillhub.stitch import Stitcher, resolve_device, stitch

SHAPES = {"a": (6, 5), "b": (7,), "c": (2, 3, 2)}
PLUGINS = load_plugins([], entry_points=False)


def base_model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def random_delta(seed: int, density: float = 0.4) -> SparseDelta:
    g = torch.Generator().manual_seed(seed)
    idx, val = {}, {}
    for k, s in SHAPES.items():
        n = torch.Size(s).numel()
        keep = (torch.rand(n, generator=g) < density).nonzero().squeeze(1)
        if keep.numel():
            idx[k] = keep.to(torch.int32)
            val[k] = torch.randn(keep.numel(), generator=g)
    return SparseDelta(idx, val, dict(SHAPES), {k: torch.float32 for k in SHAPES}, Provenance(skill=str(seed)))


def reference(base: dict[str, torch.Tensor], deltas: list[SparseDelta], policy: str, scale: float = 1.0):
    """Independent dense float64 implementation of each policy's formula."""
    out = {}
    for k, b in base.items():
        b64 = b.double()
        vals = torch.stack([d.dense(k, torch.float64) for d in deltas]) if deltas else torch.zeros((0, *b.shape),
                                                                                               dtype=torch.float64)
        masks = torch.stack([_mask(d, k) for d in deltas]) if deltas else torch.zeros((0, *b.shape), dtype=torch.bool)
        if policy == "average":
            merged = b64 + vals.sum(0) / masks.sum(0).clamp(min=1)
        elif policy == "sum":
            merged = b64 + scale * vals.sum(0)
        else:  # ties
            total = vals.sum(0)
            sign = torch.sign(total)
            majority = torch.sign((vals > 0).sum(0) - (vals < 0).sum(0)).double()
            sign = torch.where(sign == 0, majority, sign)
            agree = ((vals > 0) & (sign > 0)) | ((vals < 0) & (sign < 0))
            merged = b64 + scale * (vals * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[k] = merged.to(b.dtype)
    return out


def _mask(d: SparseDelta, key: str) -> torch.Tensor:
    m = torch.zeros(SHAPES[key], dtype=torch.bool).reshape(-1)
    if key in d.indices:
        m[d.indices[key].long()] = True
    return m.reshape(SHAPES[key])


@pytest.mark.parametrize("policy,params", [("average", {}), ("sum", {"scale": 0.7}), ("ties", {"scale": 0.9})])
def test_from_scratch_matches_formula(policy: str, params: dict) -> None:
    base = base_model()
    deltas = [random_delta(s) for s in range(4)]
    got = stitch(base, {str(i): d for i, d in enumerate(deltas)}, PLUGINS.make_policy(policy, params))
    want = reference(base, deltas, policy, params.get("scale", 1.0))
    for k in base:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    if policy == "average":  # float64 accumulators: exactly the float64 formula rounded once
        assert all(torch.equal(got[k], want[k]) for k in base)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=1, max_size=40),
       policy=st.sampled_from(["average", "sum", "ties"]), accumulate=st.sampled_from([torch.float64, torch.float32]))
def test_incremental_equals_from_scratch(ops: list[tuple[bool, int]], policy: str, accumulate: torch.dtype) -> None:
    base = base_model()
    pool = {i: random_delta(100 + i) for i in range(6)}
    s = Stitcher(base, PLUGINS.make_policy(policy), device="cpu", accumulate=accumulate)
    active: list[int] = []
    for add, i in ops:
        if add and i not in active:
            s.add(str(i), pool[i])
            active.append(i)
        elif not add and i in active:
            s.remove(str(i))
            active.remove(i)
    want = reference(base, [pool[i] for i in active], policy)
    covered = {k: sum(_mask(pool[i], k).int() for i in active) if active else torch.zeros(SHAPES[k]) for k in base}
    for k in base:
        got = s.tensor(k)
        # Stated tolerance: float32 accumulation may differ from the float64 formula in the last bits.
        tol = 0 if accumulate == torch.float64 and policy != "ties" else 1e-5
        torch.testing.assert_close(got, want[k], rtol=0, atol=tol)
        idle = torch.as_tensor(covered[k]) == 0
        assert torch.equal(got[idle], base[k][idle]), "entries in no active mask must be exactly θ₀"
    assert s.active == [str(i) for i in active]


@pytest.mark.parametrize("policy", ["average", "sum", "ties"])
@pytest.mark.parametrize("accumulate", [torch.float64, torch.float32])
def test_many_cycles_return_exactly_to_base(policy: str, accumulate: torch.dtype) -> None:
    base = base_model()
    deltas = [random_delta(s, density=0.8) for s in range(5)]
    s = Stitcher(base, PLUGINS.make_policy(policy), device="cpu", accumulate=accumulate)
    for _ in range(50):
        for i, d in enumerate(deltas):
            s.add(str(i), d)
        for i in (3, 0, 4, 1, 2):
            s.remove(str(i))
    for k in base:
        assert torch.equal(s.tensor(k), base[k])
        assert int(s.count(k).abs().sum()) == 0


def test_add_touches_only_mask_entries() -> None:
    base = base_model()
    d = random_delta(7)
    s = Stitcher(base, PLUGINS.make_policy("average"), device="cpu")
    s.add("x", random_delta(8))
    before = {k: s.tensor(k).clone() for k in base}
    s.add("y", d)
    for k in base:
        changed = (s.tensor(k) != before[k]).reshape(-1).nonzero().squeeze(1)
        allowed = set(d.indices[k].tolist()) if k in d.indices else set()
        assert set(changed.tolist()) <= allowed


def test_errors() -> None:
    base = base_model()
    s = Stitcher(base, PLUGINS.make_policy("average"), device="cpu")
    d = random_delta(1)
    s.add("x", d)
    with pytest.raises(StitchError, match="already"):
        s.add("x", d)
    with pytest.raises(StitchError, match="not stitched"):
        s.remove("nope")
    bad = SparseDelta({}, {}, {"a": (5, 6)}, {"a": torch.float32})
    with pytest.raises(StitchError, match="differs"):
        s.add("bad", bad)
    other = SparseDelta({}, {}, {"zzz": (1,)}, {"zzz": torch.float32})
    with pytest.raises(StitchError, match="does not include"):
        s.add("other", other)


@pytest.mark.parametrize("policy", ["average", "sum", "ties"])
def test_c8_out_of_memory_half_way_through_an_add_leaves_nothing_behind(policy: str, monkeypatch) -> None:
    """FAULTS C8 at the stitcher: a device running out of memory on the second tensor of a mask undoes the first."""
    base = base_model()
    s = Stitcher(base, PLUGINS.make_policy(policy), device="cpu")
    s.add("x", random_delta(1))
    before = s.snapshot()
    counts = {k: s.count(k) for k in base}
    overlap = s.overlap()
    real_update = s.policy.update
    calls = {"n": 0}

    def update(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real_update(*args, **kw)

    monkeypatch.setattr(s.policy, "update", update)
    with pytest.raises(torch.OutOfMemoryError):
        s.add("y", random_delta(2))
    monkeypatch.setattr(s.policy, "update", real_update)
    assert s.active == ["x"]
    assert all(torch.equal(before[k], s.tensor(k)) for k in base)
    assert all(torch.equal(counts[k], s.count(k)) for k in base)
    assert s.overlap() == overlap
    s.add("y", random_delta(2))  # and it can be added once memory is back
    want = reference(base, [random_delta(1), random_delta(2)], policy)
    assert all(torch.allclose(want[k], s.tensor(k), atol=1e-6) for k in base)


def test_snapshot_is_immutable_and_overlap_counts() -> None:
    base = base_model()
    s = Stitcher(base, PLUGINS.make_policy("average"), device="cpu")
    s.add("x", random_delta(1))
    snap = s.snapshot()
    s.add("y", random_delta(2))
    assert not all(torch.equal(snap[k], s.tensor(k)) for k in base)
    ov = s.overlap()
    assert ov["covered"] >= ov["overlapping"] > 0


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(StitchError, match="CUDA"):
            resolve_device("cuda")


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=1, max_size=30))
def test_overlap_counters_match_a_recount(ops: list[tuple[bool, int]]) -> None:
    base = base_model()
    pool = {i: random_delta(200 + i, density=0.6) for i in range(6)}
    s = Stitcher(base, PLUGINS.make_policy("average"), device="cpu")
    for add, i in ops:
        if add and str(i) not in s.active:
            s.add(str(i), pool[i])
        elif not add and str(i) in s.active:
            s.remove(str(i))
    counts = [s.count(k) for k in base]
    assert s.overlap() == {"covered": sum(int((c > 0).sum()) for c in counts),
                           "overlapping": sum(int((c > 1).sum()) for c in counts)}
