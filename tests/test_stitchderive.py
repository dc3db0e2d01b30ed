"""The derived layout (``Stitcher(derived=True)``): no sparse accumulators stored, every change recomputed from the
kept masks, equal bit for bit to a stitch from scratch of the active set, for every policy that can be derived."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_stitch import replay

from skillhub.delta import Provenance, SparseDelta
from skillhub.errors import StitchError
from skillhub.plugins import load_plugins
from skillhub.stitch import Stitcher, StitchPolicy, service_layout, stitch
from skillhub.stitchderive import derive, intersect

SHAPES = {"w": (9, 7), "b": (11,)}
PLUGINS = load_plugins([], entry_points=False)
#: Every registered policy, TIES with each zero-sum rule (``majority`` keeps per-tensor totals too)
POLICIES = {"average": ("average", {}), "sum": ("sum", {"scale": 0.7}), "ties": ("ties", {"scale": 0.9}),
            "ties+": ("ties", {"zero_sign": "positive"}), "ties*": ("ties", {"zero_sign": "majority"})}
STATE = ("base", "count", "accumulators", "positions")


def policy(name: str) -> StitchPolicy:
    return PLUGINS.make_policy(*POLICIES[name])


def base_model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def random_delta(seed: int, density: float = 0.3) -> SparseDelta:
    """Sparse masks with values of every magnitude (so that float sums round) and some exact ties (multiples of
    0.5, for TIES's zero sums)."""
    g = torch.Generator().manual_seed(seed)
    idx, val = {}, {}
    for k, s in SHAPES.items():
        n = math.prod(s)
        keep = (torch.rand(n, generator=g) < density).nonzero().squeeze(1)
        v = torch.randn(keep.numel(), generator=g) * torch.exp2(torch.randint(-30, 30, (keep.numel(),), generator=g))
        half = torch.rand(keep.numel(), generator=g) < 0.3
        v[half] = torch.round(v[half].clamp(-3, 3) * 2) / 2 + 0.5
        if keep.numel():
            idx[k], val[k] = keep.to(torch.int32), v
    return SparseDelta(idx, val, dict(SHAPES), {k: torch.float32 for k in SHAPES}, Provenance(skill=str(seed)))


POOL = {i: random_delta(200 + i, density=0.15 + 0.1 * (i % 3)) for i in range(6)}


def extra(s: Stitcher) -> int:
    """The stitcher's state beyond the merged tensors, the masks and the policy's per-tensor totals."""
    fp = s.footprint()
    totals = sum(t.numel() * t.element_size() for st in s._state.values() if not st.dense
                 for t in st.totals.values())
    return sum(fp[k] for k in STATE) - totals


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=1, max_size=30),
       name=st.sampled_from(sorted(POLICIES)), accumulate=st.sampled_from([torch.float64, torch.float32]))
def test_derived_equals_a_stitch_from_scratch_bit_for_bit(ops: list[tuple[bool, int]], name: str,
                                                         accumulate: torch.dtype) -> None:
    """Even with float32 sums of values of wildly different magnitudes (where add/remove leaves residues in
    stored sums): each change recomputes its entries from the masks, in the order of the active skills."""
    base = base_model()
    s = Stitcher(base, policy(name), device="cpu", accumulate=accumulate, dense_share=2.0, derived=True)
    assert s.derived
    active = replay(s, ops, POOL)
    fresh = stitch(base, {str(i): POOL[i] for i in active}, policy(name), accumulate=accumulate)
    stored = Stitcher(base, policy(name), device="cpu", accumulate=accumulate, dense_share=2.0)
    for i in active:
        stored.add(str(i), POOL[i])
    for k in base:
        assert torch.equal(s.tensor(k), fresh[k]), k
        # per-tensor totals (TIES majority's balance) as a stitch from scratch keeps them
        assert {n: t.tolist() for n, t in s._state[k].totals.items()} == \
            {n: t.tolist() for n, t in stored._state[k].totals.items()}
        want = sum((POOL[i].mask(k).to(torch.int16) for i in active), torch.zeros(SHAPES[k], dtype=torch.int16))
        assert torch.equal(s.count(k), want)
    assert extra(s) == 0
    covered = sum(int(torch.count_nonzero(s.count(k))) for k in base)
    overlapping = sum(int(torch.count_nonzero(s.count(k) >= 2)) for k in base)
    assert s.overlap() == {"covered": covered, "overlapping": overlapping}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_the_derived_state_is_the_masks_and_theta0_is_not_copied(name: str) -> None:
    base = base_model()
    s = Stitcher(base, policy(name), device="cpu", dense_share=2.0, derived=True)  # none of these tensors dense
    for i in range(3):
        s.add(str(i), POOL[i])
        assert extra(s) == 0
        assert s.footprint()["masks"] == sum(d.values[k].numel() * d.values[k].element_size() +
                                             d.indices[k].numel() * d.indices[k].element_size()
                                             for d in list(POOL.values())[:i + 1] for k in d.indices)
    # θ₀ of covered entries is read from the tensors given, not from a copy of them
    assert all(s._state[k].theta0.data_ptr() == base[k].data_ptr() for k in base)
    for i in range(3):
        s.remove(str(i))
    assert all(torch.equal(s.tensor(k), base[k]) for k in base)


def test_a_mostly_covered_tensor_turns_dense_by_replaying_the_masks_and_back() -> None:
    base = base_model()
    small, big = random_delta(8, density=0.05), random_delta(7, density=0.9)
    s = Stitcher(base, policy("average"), device="cpu", dense_share=0.5, derived=True)
    s.add("small", small)
    assert not any(st.dense for st in s._state.values())
    s.add("big", big)
    assert all(st.dense for st in s._state.values())
    s.add("more", POOL[1])  # on the dense accumulators built from the masks
    assert extra(s) > 0
    want = stitch(base, {"small": small, "big": big, "more": POOL[1]}, policy("average"))
    assert all(torch.equal(s.tensor(k), want[k]) for k in base)
    s.remove("big")
    s.remove("more")  # below a quarter of dense_share: the dense state is dropped, the masks hold it all
    assert not any(st.dense for st in s._state.values()) and extra(s) == 0
    s.add("more", POOL[1])
    want = stitch(base, {"small": small, "more": POOL[1]}, policy("average"))
    assert all(torch.equal(s.tensor(k), want[k]) for k in base)


def test_a_delta_added_for_good_is_kept_in_the_derived_layout() -> None:
    base = base_model()
    s = Stitcher(base, policy("average"), device="cpu", dense_share=2.0, derived=True)
    s.add("x", POOL[0], removable=False)
    s.add("y", POOL[1])
    assert s.footprint()["masks"] > 0  # the state is the masks: x's entries are needed to recompute y's
    with pytest.raises(StitchError, match="for good"):
        s.remove("x")
    s.remove("y")
    want = stitch(base, {"x": POOL[0]}, policy("average"))
    assert all(torch.equal(s.tensor(k), want[k]) for k in base)


@pytest.mark.parametrize("sizes", [(0, 5), (5, 0), (40, 7), (7, 40), (30, 30)])
def test_intersect_finds_the_common_entries_of_two_sorted_arrays(sizes: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(sum(sizes))
    a, b = (torch.randperm(60, generator=g)[:n].sort().values.to(torch.int32) for n in sizes)
    in_a, in_b = intersect(a, b)
    common = sorted(set(a.tolist()) & set(b.tolist()))
    assert a[in_a].tolist() == common and b[in_b].tolist() == common


def test_derive_adds_the_sources_in_order_where_they_cover() -> None:
    pos = torch.tensor([1, 4, 6], dtype=torch.int32)
    sources = [(torch.tensor([0, 4, 6], dtype=torch.int32), torch.tensor([9.0, 1.0, 2.0])),
               (torch.tensor([4, 5], dtype=torch.int32), torch.tensor([3.0, 7.0]))]
    acc, count = derive(pos, sources, policy("average"), torch.float64)
    assert count.tolist() == [0, 2, 1] and acc["sum"].tolist() == [0.0, 4.0, 2.0]


def test_the_service_derives_the_sparse_state_from_sparse_from_on() -> None:
    assert service_layout(10, 11) == {"dense_share": 0.0, "derived": False}  # the 85M default path: as before
    assert service_layout(11, 11)["derived"] and service_layout(11, 11)["dense_share"] > 0
    base = {"w": torch.zeros(1000)}
    assert Stitcher(base, policy("average"), device="cpu", **service_layout(1000, 10)).derived
    assert not Stitcher(base, policy("average"), device="cpu", **service_layout(1000, 10**6)).derived


def test_entries_freed_while_a_tensor_waits_to_be_recomputed_are_theta0() -> None:
    """TIES majority: exact zero sums make the model-wide sign settle and the tensor stale; a removal then frees
    entries that the recomputation (of the entries masks still cover) never visits."""
    base = {"w": torch.arange(8, dtype=torch.float32)}
    shapes, dtypes = {"w": (8,)}, {"w": torch.float32}

    def mask(idx: list[int], values: list[float]) -> SparseDelta:
        return SparseDelta({"w": torch.tensor(idx, dtype=torch.int32)}, {"w": torch.tensor(values)}, shapes, dtypes)

    up, down = mask([0, 1, 2, 6], [1.0, 1.0, 1.0, 2.0]), mask([0, 1, 5], [-1.0, -1.0, -3.0])
    s = Stitcher(base, policy("ties*"), device="cpu", dense_share=2.0, derived=True)
    s.add("up", up)
    s.add("down", down)
    assert s._state["w"].stale  # the zero sums at 0 and 1 follow the model-wide sign, settled after the add
    s.remove("up")
    want = stitch(base, {"down": down}, policy("ties*"))
    assert torch.equal(s.tensor("w"), want["w"]) and s.tensor("w")[2] == 2.0
