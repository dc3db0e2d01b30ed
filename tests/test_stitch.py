"""Incremental stitching: every policy equals a from-scratch stitch of the active set, and θ₀ where no mask is; masks
in the dense form (values for every entry, no indices) mixed freely with sparse ones."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skillhub.delta import Provenance, SparseDelta
from skillhub.errors import StitchError
from skillhub.plugins import load_plugins
from skillhub.stitch import Stitcher, StitchPolicy, resolve_device, stitch

SHAPES = {"a": (6, 5), "b": (7,), "c": (2, 3, 2)}
PLUGINS = load_plugins([], entry_points=False)
TIES_RULES = {"ties": "count", "ties+": "positive", "ties*": "majority"}
#: Stitcher layouts: every tensor's accumulators dense from the start, the default (dense once half covered), sparse
#: unless a dense-form mask forces dense, and the same two with the sparse accumulators derived from the kept masks
LAYOUTS = {"dense": {"dense_share": 0.0}, "half": {"dense_share": 0.5}, "sparse": {"dense_share": 2.0},
           "derived": {"dense_share": 0.5, "derived": True}, "derived-sparse": {"dense_share": 2.0, "derived": True}}
SHARES = list(LAYOUTS)


def base_model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def random_delta(seed: int, density: float = 0.4, dense: tuple[str, ...] = (), quantized: bool = False) -> SparseDelta:
    """Random mask and values; the tensors named in ``dense`` in the dense form (values for every entry, 0 outside
    the mask, no indices). Quantized values (multiples of 0.5) make exact ties of the summed value."""
    g = torch.Generator().manual_seed(seed)
    idx, val = {}, {}
    for k, s in SHAPES.items():
        n = math.prod(s)
        keep = (torch.rand(n, generator=g) < density).nonzero().squeeze(1)
        v = torch.randn(keep.numel(), generator=g)
        if quantized:
            v = torch.round(v * 2) / 2
            v[v == 0] = 0.5
        if k in dense:
            full = torch.zeros(n)
            full[keep] = v
            if keep.numel():
                val[k] = full
        elif keep.numel():
            idx[k], val[k] = keep.to(torch.int32), v
    return SparseDelta(idx, val, dict(SHAPES), {k: torch.float32 for k in SHAPES}, Provenance(skill=str(seed)))


def make_policy(name: str, scale: float | None = None) -> StitchPolicy:
    params = {} if scale is None else {"scale": scale}
    if name in TIES_RULES:
        return PLUGINS.make_policy("ties", {**params, "zero_sign": TIES_RULES[name]})
    return PLUGINS.make_policy(name, params)


def reference(base: dict[str, torch.Tensor], deltas: list[SparseDelta], policy: str, scale: float = 1.0):
    """Independent dense float64 implementation of each policy's formula (TIES with each zero-sum rule)."""
    vals = {k: torch.stack([d.dense(k, torch.float64) for d in deltas]) if deltas else
            torch.zeros((0, *b.shape), dtype=torch.float64) for k, b in base.items()}
    # TIES reference code: the sign of Σ sign(Σₜ τₜ) over the whole model; a tie there takes the negative side.
    balance = sum(float(torch.sign(v.sum(0)).sum()) for v in vals.values())
    model_sign = 1.0 if balance > 0 else -1.0
    out = {}
    for k, b in base.items():
        b64, v = b.double(), vals[k]
        masks = torch.stack([d.mask(k) for d in deltas]) if deltas else torch.zeros((0, *b.shape), dtype=torch.bool)
        if policy == "average":
            merged = b64 + v.sum(0) / masks.sum(0).clamp(min=1)
        elif policy == "sum":
            merged = b64 + scale * v.sum(0)
        else:
            sign = torch.sign(v.sum(0))
            fallback = {"count": torch.sign((v > 0).sum(0) - (v < 0).sum(0)).double(),
                        "positive": torch.ones_like(sign), "majority": torch.full_like(sign, model_sign)}
            sign = torch.where(sign == 0, fallback[TIES_RULES[policy]], sign)
            agree = ((v > 0) & (sign > 0)) | ((v < 0) & (sign < 0))
            merged = b64 + scale * (v * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[k] = merged.to(b.dtype)
    return out


def _mask(d: SparseDelta, key: str) -> torch.Tensor:
    return d.mask(key)


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


def mixed_pool(quantized: bool = True) -> dict[int, SparseDelta]:
    """Sparse masks, dense ones covering every entry, dense ones with zeros, dense and sparse tensors in one mask,
    and quantized values (exact zero sums for TIES)."""
    return {0: random_delta(100), 1: random_delta(101, density=1.0, dense=tuple(SHAPES)),
            2: random_delta(102, density=0.7, dense=("a", "c")), 3: random_delta(103, quantized=quantized),
            4: random_delta(104, density=0.8, dense=tuple(SHAPES), quantized=quantized),
            5: random_delta(105, density=1.0, dense=("b",), quantized=quantized)}


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=1, max_size=40),
       policy=st.sampled_from(["average", "sum", *TIES_RULES]),
       accumulate=st.sampled_from([torch.float64, torch.float32]), layout=st.sampled_from(SHARES))
def test_incremental_equals_from_scratch(ops: list[tuple[bool, int]], policy: str, accumulate: torch.dtype,
                                         layout: str) -> None:
    base = base_model()
    # TIES elects on the exact sign of a sum: with float32 accumulators an add/remove residue can turn an exact 0
    # into ±1e-8, so exact ties are only meaningful with float64 ones (the default).
    pool = mixed_pool(quantized=accumulate == torch.float64 or policy in ("average", "sum"))
    s = Stitcher(base, make_policy(policy), device="cpu", accumulate=accumulate, **LAYOUTS[layout])
    active = replay(s, ops, pool)
    want = reference(base, [pool[i] for i in active], policy)
    covered = {k: sum(_mask(pool[i], k).int() for i in active) if active else torch.zeros(SHAPES[k]) for k in base}
    for k in base:
        got = s.tensor(k)
        # Stated tolerance: float32 accumulation may differ from the float64 formula in the last bits.
        tol = 0 if accumulate == torch.float64 and policy in ("average", "sum") else 1e-5
        torch.testing.assert_close(got, want[k], rtol=0, atol=tol)
        idle = torch.as_tensor(covered[k]) == 0
        assert torch.equal(got[idle], base[k][idle]), "entries in no active mask must be exactly θ₀"
        assert torch.equal(s.count(k), torch.as_tensor(covered[k]).to(s.count(k).dtype))
    assert s.active == [str(i) for i in active]
    # And a stitch from scratch of the active set gives the same tensors: bit for bit with float64 accumulators
    # (exact sums, whatever the order of adds, removes, dense or sparse forms of masks and of accumulators), to
    # float32 rounding without.
    fresh = stitch(base, {str(i): pool[i] for i in active}, make_policy(policy), accumulate=accumulate)
    for k in base:
        torch.testing.assert_close(s.tensor(k), fresh[k], rtol=0, atol=0 if accumulate == torch.float64 else 1e-5)


@pytest.mark.parametrize("layout", SHARES)
@pytest.mark.parametrize("dense", [(), tuple(SHAPES)])
@pytest.mark.parametrize("policy", ["average", "sum", "ties"])
@pytest.mark.parametrize("accumulate", [torch.float64, torch.float32])
def test_many_cycles_return_exactly_to_base(policy: str, accumulate: torch.dtype, dense: tuple[str, ...],
                                            layout: str) -> None:
    base = base_model()
    deltas = [random_delta(s, density=0.8 if s % 2 else 1.0, dense=dense) for s in range(5)]
    s = Stitcher(base, PLUGINS.make_policy(policy), device="cpu", accumulate=accumulate, **LAYOUTS[layout])
    for _ in range(50):
        for i, d in enumerate(deltas):
            s.add(str(i), d)
        for i in (3, 0, 4, 1, 2):
            s.remove(str(i))
    for k in base:
        assert torch.equal(s.tensor(k), base[k])
        assert int(s.count(k).abs().sum()) == 0
        # Σ reset to 0 where the count returned to 0 (float32 sums of many values leave a residue otherwise)
        assert all(not bool(t.any()) for t in s._state[k].accumulators()), k


@pytest.mark.parametrize("policy", ["average", "ties"])
@pytest.mark.parametrize("dense", [(), ("a", "c")])
def test_add_touches_only_mask_entries(dense: tuple[str, ...], policy: str) -> None:
    base = base_model()
    d = random_delta(7, density=0.6, dense=dense)
    s = Stitcher(base, PLUGINS.make_policy(policy), device="cpu")
    s.add("x", random_delta(8, dense=("c",)))
    before = {k: s.tensor(k).clone() for k in base}
    s.add("y", d)
    for k in base:
        changed = (s.tensor(k) != before[k]).reshape(-1).nonzero().squeeze(1)
        assert set(changed.tolist()) <= set(d.flat_indices(k).tolist())


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


@pytest.mark.parametrize("layout", SHARES)
@pytest.mark.parametrize("dense", [(), ("a", "b")])
@pytest.mark.parametrize("policy", ["average", "sum", "ties"])
def test_c8_out_of_memory_half_way_through_an_add_leaves_nothing_behind(policy: str, dense: tuple[str, ...],
                                                                        layout: str, monkeypatch) -> None:
    """FAULTS C8 at the stitcher: a device running out of memory on the second tensor of a mask (or the second run
    of one tensor's sparse accumulators) undoes the first."""
    base = base_model()
    s = Stitcher(base, PLUGINS.make_policy(policy), device="cpu", **LAYOUTS[layout])
    s.add("x", random_delta(1, dense=dense))
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
        s.add("y", random_delta(2, dense=dense))
    monkeypatch.setattr(s.policy, "update", real_update)
    assert s.active == ["x"]
    assert all(torch.equal(before[k], s.tensor(k)) for k in base)
    assert all(torch.equal(counts[k], s.count(k)) for k in base)
    assert s.overlap() == overlap
    s.add("y", random_delta(2, dense=dense))  # and it can be added once memory is back
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
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=1, max_size=30),
       layout=st.sampled_from(SHARES))
def test_overlap_counters_match_a_recount(ops: list[tuple[bool, int]], layout: str) -> None:
    base = base_model()
    pool = {i: random_delta(200 + i, density=0.6) for i in range(3)}
    pool |= {3: random_delta(203, density=1.0, dense=tuple(SHAPES)), 4: random_delta(204, 1.0, tuple(SHAPES)),
             5: random_delta(205, density=0.6, dense=("a", "b"))}
    s = Stitcher(base, PLUGINS.make_policy("average"), device="cpu", **LAYOUTS[layout])
    for add, i in ops:
        if add and str(i) not in s.active:
            s.add(str(i), pool[i])
        elif not add and str(i) in s.active:
            s.remove(str(i))
    counts = [s.count(k) for k in base]
    assert s.overlap() == {"covered": sum(int((c > 0).sum()) for c in counts),
                           "overlapping": sum(int((c > 1).sum()) for c in counts)}


# --- dense masks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["average", "sum", "ties"])
def test_dense_masks_are_stitched_with_whole_tensor_operations(policy: str, monkeypatch) -> None:
    base = base_model()
    full, holes = random_delta(1, density=1.0, dense=tuple(SHAPES)), random_delta(2, density=0.7, dense=tuple(SHAPES))
    s = Stitcher(base, make_policy(policy), device="cpu")
    seen: list[object] = []
    real_update = s.policy.update
    monkeypatch.setattr(s.policy, "update", lambda acc, idx, values, sign: (seen.append(idx),
                                                                           real_update(acc, idx, values, sign)))

    def no_scatter(*args: object, **kw: object) -> None:
        raise AssertionError("a dense mask went through index_add_")

    monkeypatch.setattr(torch.Tensor, "index_add_", no_scatter)
    s.add("full", full)
    s.add("holes", holes)
    s.remove("full")
    monkeypatch.undo()
    assert len(seen) == 3 * len(SHAPES) and all(i == slice(None) for i in seen)
    want = reference(base, [holes], policy)
    for k in base:
        torch.testing.assert_close(s.tensor(k), want[k], rtol=0, atol=0 if policy != "ties" else 1e-6)
    assert s.overlap() == {"covered": holes.nnz, "overlapping": 0}
    s.remove("holes")
    assert all(torch.equal(s.tensor(k), base[k]) for k in base)


def test_dense_adds_in_a_row_recompute_the_merged_tensor_once(monkeypatch) -> None:
    base = base_model()
    s = Stitcher(base, PLUGINS.make_policy("sum"), device="cpu")
    calls = {"n": 0}
    real_delta = s.policy.delta

    def delta(*args: object) -> torch.Tensor:
        calls["n"] += 1
        return real_delta(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(s.policy, "delta", delta)
    for i in range(4):
        s.add(str(i), random_delta(10 + i, density=1.0, dense=tuple(SHAPES)))
    assert calls["n"] == 0  # nothing read yet: nothing recomputed
    snap = s.snapshot()
    assert calls["n"] == len(SHAPES)  # one chunk per (small) tensor, once
    s.tensor("a")
    assert calls["n"] == len(SHAPES)
    want = reference(base, [random_delta(10 + i, density=1.0, dense=tuple(SHAPES)) for i in range(4)], "sum")
    assert all(torch.equal(snap[k], want[k]) for k in base)


def test_a_policy_without_whole_tensor_support_gets_the_indices_of_a_dense_mask() -> None:
    class PlainMean(StitchPolicy):  # a third-party policy written against indices only (plugins/README.md)
        name = "plain_mean"

        def accumulators(self, numel: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
            return {"sum": torch.zeros(numel, dtype=dtype, device=device)}

        def update(self, acc: dict[str, torch.Tensor], idx: torch.Tensor, values: torch.Tensor, sign: int) -> None:
            assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64
            acc["sum"].index_add_(0, idx, values, alpha=sign)

        def delta(self, acc: dict[str, torch.Tensor], count: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            assert isinstance(idx, torch.Tensor)
            return acc["sum"][idx] / count.clamp(min=1).to(acc["sum"].dtype)

    base = base_model()
    deltas = [random_delta(1, density=0.7, dense=("a", "c")), random_delta(2), random_delta(3, 1.0, tuple(SHAPES))]
    s = Stitcher(base, PlainMean(), device="cpu")
    for i, d in enumerate(deltas):
        s.add(str(i), d)
    want = reference(base, deltas, "average")
    assert all(torch.equal(s.tensor(k), want[k]) for k in base)
    for i in range(3):
        s.remove(str(i))
    assert all(torch.equal(s.tensor(k), base[k]) for k in base)


def test_dense_and_sparse_forms_of_one_mask_stitch_to_the_same_bits() -> None:
    base = base_model()
    for policy in ("average", "sum", *TIES_RULES):
        dense = [random_delta(30 + i, density=0.6, dense=tuple(SHAPES), quantized=i % 2 == 0) for i in range(4)]
        sparse = [SparseDelta({k: d.flat_indices(k).to(torch.int32) for k in d.values},
                              {k: d.values[k][d.flat_indices(k)] for k in d.values}, d.shapes, d.dtypes)
                  for d in dense]
        a = stitch(base, {str(i): d for i, d in enumerate(dense)}, make_policy(policy))
        b = stitch(base, {str(i): d for i, d in enumerate(sparse)}, make_policy(policy))
        assert all(torch.equal(a[k], b[k]) for k in base), policy


@pytest.mark.parametrize("dense", [(), tuple(SHAPES)])
def test_too_many_overlapping_masks_are_refused(dense: tuple[str, ...], monkeypatch) -> None:
    import skillhub.stitch as stitch_module

    monkeypatch.setattr(stitch_module, "COUNT_MAX", 2)  # the int16 count's limit, made reachable
    base = base_model()
    s = Stitcher(base, PLUGINS.make_policy("average"), device="cpu")
    s.add("x", random_delta(1, density=1.0, dense=dense))
    s.add("y", random_delta(2, density=1.0, dense=dense))
    with pytest.raises(StitchError, match="more than 2 masks overlap"):
        s.add("z", random_delta(3, density=0.5, dense=dense))
    assert s.active == ["x", "y"]


@pytest.mark.parametrize("layout", SHARES)
@pytest.mark.parametrize("prepare", [False, True])
@pytest.mark.parametrize("policy", ["average", "sum", "ties"])
def test_snapshots_are_shared_copy_on_write_and_never_change(policy: str, prepare: bool, layout: str) -> None:
    """snapshot() hands out the live merged tensors without copying them; the next change to one writes a copy
    (made beforehand by prepare(), or then), so every published snapshot keeps its values, bit for bit."""
    base = base_model()
    s = Stitcher(base, make_policy(policy), device="cpu", **LAYOUTS[layout])
    s.add("x", random_delta(1, dense=("b",)))
    first = s.snapshot()
    kept = {k: t.clone() for k, t in first.items()}
    assert all(first[k].data_ptr() == s.tensor(k).data_ptr() for k in base)  # no copy was made
    again = s.snapshot()
    assert all(again[k] is first[k] or again[k].data_ptr() == first[k].data_ptr() for k in base)  # nothing changed
    if prepare:
        s.prepare()
    s.add("y", random_delta(2, dense=("c",)))
    second = s.snapshot()
    s.remove("x")
    s.add("z", random_delta(3))
    third = s.snapshot()
    assert all(torch.equal(first[k], kept[k]) for k in base)
    want2 = reference(base, [random_delta(1, dense=("b",)), random_delta(2, dense=("c",))], policy)
    want3 = reference(base, [random_delta(2, dense=("c",)), random_delta(3)], policy)
    assert all(torch.allclose(want2[k], second[k], atol=1e-6) for k in base)
    assert all(torch.allclose(want3[k], third[k], atol=1e-6) for k in base)
    assert all(second[k].data_ptr() != first[k].data_ptr() for k in base)


def test_prepare_beside_changes_never_hands_out_a_wrong_copy() -> None:
    """prepare() may run in another thread while the stitcher changes: a spare copy is used only if it is a copy of
    the very tensor being changed."""
    base = base_model()
    s = Stitcher(base, PLUGINS.make_policy("average"), device="cpu")
    s.add("x", random_delta(1))
    s.snapshot()
    s.prepare()
    s.add("y", random_delta(2))  # uses the spares
    s.prepare()  # nothing is frozen now: makes no copy
    assert not s._versions.spare
    s.snapshot()
    stale = {sid: (src.clone(), src.clone() + 1) for sid, src in s._versions.frozen.items()}  # copies of other tensors
    s._versions.spare.update(stale)
    s.add("z", random_delta(3))
    want = reference(base, [random_delta(1), random_delta(2), random_delta(3)], "average")
    assert all(torch.allclose(want[k], s.tensor(k), atol=1e-6) for k in base)


@pytest.mark.parametrize("layout", SHARES)
@pytest.mark.parametrize("dense", [(), ("a",)])
def test_nonfinite_is_counted_as_entries_change(dense: tuple[str, ...], layout: str) -> None:
    """The smoke check's count of NaN/Inf merged entries, kept per change, agrees with a full scan; it goes back to
    none when the skill that caused it is removed."""
    base = base_model()
    s = Stitcher(base, make_policy("sum", scale=1e300), device="cpu", **LAYOUTS[layout])  # λ·τ overflows float32: ±inf entries
    assert s.nonfinite() is None
    s.add("x", random_delta(1, dense=dense))
    bad = s.nonfinite()
    assert bad == next(k for k, t in s.snapshot().items() if not bool(torch.isfinite(t).all()))
    s.remove("x")
    assert s.nonfinite() is None
    assert all(torch.equal(s.tensor(k), base[k]) for k in base)
    ok = Stitcher(base, PLUGINS.make_policy("average"), device="cpu")
    ok.add("x", random_delta(1, dense=dense))
    assert ok.nonfinite() is None
    nan_base = {k: v.clone() for k, v in base.items()}
    nan_base["b"][2] = float("nan")
    assert Stitcher(nan_base, PLUGINS.make_policy("average"), device="cpu").nonfinite() == "b"


# --- memory ---------------------------------------------------------------------------------------------------------


def _extra(s: Stitcher) -> int:
    """The stitcher's state beyond the merged tensors themselves and the masks it keeps."""
    return sum(v for k, v in s.footprint().items() if k not in ("merged", "masks"))


@pytest.mark.parametrize("policy", ["average", "sum", "ties", "ties*"])
def test_extra_state_is_o_of_the_masks_not_of_the_model(policy: str) -> None:
    """DESIGN §7: on a model of a million entries, masks of a few hundred entries cost the stitcher a few bytes
    per covered entry (position, θ₀, count, the policy's accumulators) and nothing per entry of the model beyond
    the merged tensor itself; taking every mask out gives that memory back."""
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (1000, 1000), "b": (1000,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    s = Stitcher(base, make_policy(policy), device="cpu")
    numel = sum(t.numel() for t in base.values())
    pol = make_policy(policy)
    per_entry = 4 + 2 + 4 + sum(t.element_size() for k, t in pol.accumulators(1, torch.device("cpu"),
                                                                               torch.float64).items()
                                if k not in pol.totals)  # position, count, θ₀, accumulators
    totals = sum(t.numel() * t.element_size() for k, t in pol.accumulators(1, torch.device("cpu"),
                                                                          torch.float64).items() if k in pol.totals)

    def mask(seed: int, n: int) -> SparseDelta:
        gen = torch.Generator().manual_seed(seed)
        idx = {k: torch.randperm(math.prod(sh), generator=gen)[:n].sort().values.to(torch.int32)
               for k, sh in shapes.items()}
        return SparseDelta(idx, {k: torch.randn(n, generator=gen) for k in shapes}, dict(shapes),
                           {k: torch.float32 for k in shapes})

    sizes = 0
    for i, n in enumerate((300, 50, 200)):
        s.add(str(i), mask(i, n))
        sizes += n * len(shapes)
        covered = s.overlap()["covered"]
        assert _extra(s) == covered * per_entry + totals * len(shapes)
        assert _extra(s) <= sizes * per_entry + totals * len(shapes) < numel  # under 1 byte per model entry
    for i in range(3):
        s.remove(str(i))
    assert _extra(s) == totals * len(shapes)  # idle entries compacted away
    assert all(torch.equal(s.tensor(k), base[k]) for k in base)


def test_accumulators_turn_dense_when_most_of_a_tensor_is_covered_and_sparse_again() -> None:
    base = base_model()
    s = Stitcher(base, PLUGINS.make_policy("average"), device="cpu")
    s.add("small", random_delta(1, density=0.02))
    assert not any(st.dense for st in s._state.values())
    s.add("big", random_delta(2, density=0.9))
    assert all(st.dense for st in s._state.values())
    s.remove("big")
    assert not any(st.dense for st in s._state.values())
    want = reference(base, [random_delta(1, density=0.02)], "average")
    assert all(torch.equal(s.tensor(k), want[k]) for k in base)


def test_a_delta_added_for_good_is_not_kept() -> None:
    base = base_model()
    s = Stitcher(base, PLUGINS.make_policy("average"), device="cpu")
    s.add("x", random_delta(1), removable=False)
    assert s.footprint()["masks"] == 0
    with pytest.raises(StitchError, match="for good"):
        s.remove("x")
    assert all(torch.equal(s.tensor(k), reference(base, [random_delta(1)], "average")[k]) for k in base)


def test_the_service_keeps_dense_accumulators_below_sparse_from_and_sparse_ones_from_there() -> None:
    from skillhub.stitch import dense_share_for
    from skillhub.stitchstate import DENSE_SHARE

    assert dense_share_for(10, 11) == 0.0
    assert dense_share_for(11, 11) == DENSE_SHARE
    assert dense_share_for(0, 0) == DENSE_SHARE  # 0: always sparse
    base = {"w": torch.zeros(1000)}
    dense = Stitcher(base, make_policy("average"), device="cpu", dense_share=dense_share_for(1000, 10**6))
    sparse = Stitcher(base, make_policy("average"), device="cpu", dense_share=dense_share_for(1000, 0))
    extra = ("base", "count", "accumulators")
    assert sum(dense.footprint()[k] for k in extra) >= 1000 * (4 + 8)  # θ₀ float32 and float64 sums per entry
    assert sum(sparse.footprint()[k] for k in extra) == 0  # nothing covered yet: nothing kept


def replay(s: Stitcher, ops: list[tuple[bool, int]], pool: Mapping[int, SparseDelta] | list[SparseDelta]) -> list[int]:
    """Apply ``ops`` (add or remove pool entry i; an add of an active one or a remove of an absent one is skipped);
    returns the active entries in the order they were added."""
    active: list[int] = []
    for add, i in ops:
        if add and i not in active:
            s.add(str(i), pool[i])
            active.append(i)
        elif not add and i in active:
            s.remove(str(i))
            active.remove(i)
    return active
