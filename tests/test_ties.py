"""TIES: the rule for entries whose summed value is exactly 0 (``zero_sign``), on hand-made cases and against the
TIES reference code's algorithm, incrementally (a model-wide sign that flips recomputes the tie entries elsewhere)."""

from __future__ import annotations

import pytest
import torch

from skillhub.delta import SparseDelta
from skillhub.errors import PluginError
from skillhub.plugins import load_plugins
from skillhub.stitch import Stitcher, stitch

SHAPES = {"v": (6,), "w": (4,)}
PLUGINS = load_plugins([], entry_points=False)
BASE = {"v": torch.linspace(-1, 1, 6), "w": torch.tensor([0.25, -0.5, 1.0, 2.0])}


def delta(w: list[float] | None = None, v: list[float] | None = None, dense: bool = False) -> SparseDelta:
    """A mask over the non-zero values given (``dense``: in the dense form, no indices)."""
    idx, val = {}, {}
    for key, values in (("w", w), ("v", v)):
        if values is None:
            continue
        t = torch.tensor(values, dtype=torch.float32)
        if dense:
            val[key] = t
        else:
            idx[key] = t.nonzero().reshape(-1).to(torch.int32)
            val[key] = t[idx[key].long()]
    return SparseDelta(idx, val, dict(SHAPES), dict.fromkeys(SHAPES, torch.float32))


def ties(zero_sign: str | None = None, scale: float = 1.0):
    params: dict[str, object] = {"scale": scale}
    if zero_sign is not None:
        params["zero_sign"] = zero_sign
    return PLUGINS.make_policy("ties", params)


def reference_code(deltas: list[SparseDelta], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The TIES reference algorithm over the flattened model (keys in sorted order), in float64: elect the sign of
    the sum; where it is 0, the sign of the sum of all elected signs; then the mean of the values whose sign is
    positive where the elected sign is positive, negative otherwise (so a model-wide tie takes the negative side)."""
    keys = sorted(SHAPES)
    flat = torch.stack([torch.cat([d.dense(k, torch.float64).reshape(-1) for k in keys]) for d in deltas])
    sign = torch.sign(flat.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign > 0, flat > 0, flat < 0)
    chosen = flat * keep
    merged = chosen.sum(0) / (chosen != 0).sum(0).clamp(min=1)
    out, start = {}, 0
    for k in keys:
        n = BASE[k].numel()
        out[k] = (BASE[k].double() + scale * merged[start:start + n]).float()
        start += n
    return out


A = delta(w=[1, 1, 0, 0], v=[1, 1, 1, 1, 0, 0])
B = delta(w=[-1, -0.5, 0, 0])
C = delta(w=[0, -0.5, 0, 0])
FLIP = delta(v=[-2, -2, -2, -2, -1, -1])  # turns the v entries negative: the model-wide majority becomes −


@pytest.mark.parametrize(("rule", "w0", "w1"), [
    (None, 0.0, -0.5),  # default "count": a 1:1 tie stays θ₀; 1 positive against 2 negatives elects −
    ("count", 0.0, -0.5),
    ("positive", 1.0, 1.0),  # mergekit: + wherever Σ ≥ 0
    ("majority", 1.0, 1.0),  # the model-wide majority is + (four v entries elected +)
])
def test_zero_sum_entries_follow_the_rule(rule: str | None, w0: float, w1: float) -> None:
    merged = stitch(BASE, {"a": A, "b": B, "c": C}, ties(rule))
    assert merged["w"][0] == BASE["w"][0] + w0
    assert merged["w"][1] == BASE["w"][1] + w1
    assert torch.equal(merged["w"][2:], BASE["w"][2:])
    assert torch.equal(merged["v"][:4], BASE["v"][:4] + 1)


def test_majority_matches_the_reference_code_and_follows_a_flip_incrementally() -> None:
    s = Stitcher(BASE, ties("majority", scale=0.5), device="cpu")
    for name, d in (("a", A), ("b", B), ("c", C)):
        s.add(name, d)
    want = reference_code([A, B, C], scale=0.5)
    assert all(torch.equal(s.tensor(k), want[k]) for k in SHAPES)
    assert float(s.tensor("w")[0] - BASE["w"][0]) == 0.5  # elected + with the model
    # FLIP touches only v, yet the tie entries of w must now take the negative side.
    s.add("flip", FLIP)
    want = reference_code([A, B, C, FLIP], scale=0.5)
    assert all(torch.equal(s.tensor(k), want[k]) for k in SHAPES)
    assert float(s.tensor("w")[0] - BASE["w"][0]) == -0.5 and float(s.tensor("w")[1] - BASE["w"][1]) == -0.25
    fresh = stitch(BASE, {"a": A, "b": B, "c": C, "flip": FLIP}, ties("majority", scale=0.5))
    assert all(torch.equal(s.tensor(k), fresh[k]) for k in SHAPES)
    s.remove("flip")
    want = reference_code([A, B, C], scale=0.5)
    assert all(torch.equal(s.tensor(k), want[k]) for k in SHAPES)
    for name in ("a", "b", "c"):
        s.remove(name)
    assert all(torch.equal(s.tensor(k), BASE[k]) for k in SHAPES)


def test_a_model_wide_tie_takes_the_negative_side_as_the_reference_code_does() -> None:
    # w0 ties (+1, −1); w1 is elected + by A alone and v5 − by D: the model-wide sum of signs is 0.
    a, b, d = delta(w=[1, 1, 0, 0]), delta(w=[-1, 0, 0, 0]), delta(v=[0, 0, 0, 0, 0, -1])
    merged = stitch(BASE, {"a": a, "b": b, "d": d}, ties("majority"))
    assert merged["w"][0] == BASE["w"][0] - 1
    want = reference_code([a, b, d])
    assert all(torch.equal(merged[k], want[k]) for k in SHAPES)


@pytest.mark.parametrize("rule", ["count", "positive", "majority"])
def test_dense_and_sparse_masks_give_the_same_ties(rule: str) -> None:
    dense = [delta(w=[1, 1, 0, 0], v=[1, 1, 1, 1, 0, 0], dense=True), delta(w=[-1, -0.5, 0, 0], dense=True), C,
             delta(v=[-2, -2, -2, -2, -1, -1], dense=True)]
    a = stitch(BASE, {str(i): d for i, d in enumerate(dense)}, ties(rule))
    b = stitch(BASE, {str(i): d for i, d in enumerate([A, B, C, FLIP])}, ties(rule))
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)


def test_the_default_rule_stays_out_of_the_params_dump() -> None:
    # A version's manifest holds the policy params: versions published before the option existed keep their identity.
    assert ties().params.model_dump(mode="json") == {"scale": 1.0}
    assert ties("majority").params.model_dump(mode="json") == {"scale": 1.0, "zero_sign": "majority"}
    assert ties("count").params == ties().params
    with pytest.raises(PluginError, match="zero_sign"):
        ties("sometimes")
