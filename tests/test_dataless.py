"""Dataless localization: exactly k entries, the global top-|τ|, the documented tie rule, streaming."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skillhub.delta import Provenance, TaskVector
from skillhub.localize import LocalizeContext, run_localizer
from skillhub.strategies import dataless
from skillhub.strategies.dataless import Dataless, global_topk


def brute_force(tv: TaskVector, k: int) -> dict[str, list[int]]:
    """Reference: sort every non-zero entry by (-|τ|, key order, flat index) and take the first k."""
    entries = []
    for ki, key in enumerate(tv.keys):
        flat = tv.tensor(key).reshape(-1)
        for i, v in enumerate(flat.tolist()):
            if v != 0:
                entries.append((-abs(v), ki, i, key))
    entries.sort()
    out: dict[str, list[int]] = {}
    for _, _, i, key in entries[:k]:
        out.setdefault(key, []).append(i)
    return {k: sorted(v) for k, v in out.items()}


def as_lists(entries: dict) -> dict[str, list[int]]:
    return {k: v[0].tolist() for k, v in entries.items()}


def test_exactly_k_global_not_per_tensor() -> None:
    # One tensor has all the large changes: a global threshold takes only from it, a per-tensor one would not.
    base = {"big": torch.zeros(100), "small": torch.zeros(100)}
    ft = {"big": torch.linspace(1, 2, 100), "small": torch.linspace(0.001, 0.01, 100)}
    tv = TaskVector.from_state_dicts(base, ft)
    got = global_topk(tv, 20)
    assert list(got) == ["big"]
    assert got["big"][0].tolist() == list(range(80, 100))
    assert torch.equal(got["big"][1], ft["big"][80:])


def test_ties_are_taken_in_canonical_order() -> None:
    base = {"b": torch.zeros(6), "a": torch.zeros(4)}
    ft = {"a": torch.tensor([1.0, 1.0, 0.5, 1.0]), "b": torch.tensor([1.0, -1.0, 2.0, 0.0, 1.0, 1.0])}
    tv = TaskVector.from_state_dicts(base, ft)
    got = as_lists(global_topk(tv, 5))
    # 2.0 first, then the |τ| = 1 ties in key order (a before b) and flat index order.
    assert got == {"a": [0, 1, 3], "b": [0, 2]}
    assert got == brute_force(tv, 5)


def test_zero_entries_never_selected() -> None:
    base = {"w": torch.zeros(10)}
    ft = {"w": torch.tensor([0, 0, 3.0, 0, 0, 0, -1.0, 0, 0, 0])}
    delta = run_localizer(Dataless, TaskVector.from_state_dicts(base, ft), {"sparsity": 0.5}, LocalizeContext(),
                          Provenance())
    assert delta.indices["w"].tolist() == [2, 6]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), sparsity=st.floats(0.01, 1.0), quantize=st.booleans())
def test_matches_brute_force(seed: int, sparsity: float, quantize: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    base = {"x": torch.randn(7, 5, generator=g), "y": torch.randn(13, generator=g), "z": torch.randn(2, 3, 4, generator=g)}
    ft = {}
    for k, v in base.items():
        d = torch.randn(v.shape, generator=g)
        ft[k] = v + (torch.round(d * 2) / 2 if quantize else d)  # quantized deltas: many exact ties and zeros
    tv = TaskVector.from_state_dicts(base, ft)
    k = math.floor(sparsity * tv.numel)
    delta = run_localizer(Dataless, tv, {"sparsity": sparsity}, LocalizeContext(), Provenance())
    want = brute_force(tv, k)
    assert {key: i.tolist() for key, i in delta.indices.items()} == want
    nonzero = sum(int((tv.tensor(key) != 0).sum()) for key in tv.keys)
    assert delta.nnz == min(k, nonzero)
    for key, idx in delta.indices.items():
        assert idx.dtype == torch.int32
        assert torch.equal(delta.values[key], tv.tensor(key).reshape(-1)[idx.long()])


@pytest.mark.parametrize("sample_size", [64, 1 << 18])
def test_sampled_threshold_path_is_exact(monkeypatch: pytest.MonkeyPatch, sample_size: int) -> None:
    # Force the sampling path on a small model (and, with a tiny sample, the retry after an unlucky threshold).
    monkeypatch.setattr(dataless, "SAMPLE_SIZE", sample_size)
    g = torch.Generator().manual_seed(3)
    shapes = {"a": (300, 200), "b": (1000,), "c": (50, 50, 4)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ft = {k: v + torch.randn(v.shape, generator=g) * (0.01 + (torch.rand(v.shape, generator=g) < 0.02))
          for k, v in base.items()}
    tv = TaskVector.from_state_dicts(base, ft)
    monkeypatch.setattr(dataless, "SAMPLE_SIZE", min(sample_size, tv.numel // 5))
    k = tv.numel // 100
    got = global_topk(tv, k)
    flat = torch.cat([tv.tensor(key).reshape(-1).abs() for key in tv.keys])
    kth = torch.topk(flat, k).values[-1]
    assert sum(int(v[0].numel()) for v in got.values()) == k
    for key, (idx, vals) in got.items():
        assert bool((vals.abs() >= kth).all())
        assert torch.equal(vals, tv.tensor(key).reshape(-1)[idx])


def test_unlucky_sample_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = dataless._sample_threshold

    def too_high(*args: object) -> float:
        calls.append(args[-1])
        return 1e9 if len(calls) == 1 else real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(dataless, "_sample_threshold", too_high)
    monkeypatch.setattr(dataless, "SAMPLE_SIZE", 100)
    base = {"w": torch.zeros(5000)}
    ft = {"w": torch.randn(5000, generator=torch.Generator().manual_seed(1))}
    tv = TaskVector.from_state_dicts(base, ft)
    got = global_topk(tv, 50)
    assert len(calls) == 2 and calls[1] > calls[0]
    assert got["w"][0].tolist() == brute_force(tv, 50)["w"]


def test_nan_in_finetune_is_rejected() -> None:
    from skillhub.errors import CheckpointError

    base = {"w": torch.zeros(4)}
    ft = {"w": torch.tensor([1.0, float("nan"), 0.0, 2.0])}
    with pytest.raises(CheckpointError, match="'w' holds NaN or Inf"):
        run_localizer(Dataless, TaskVector.from_state_dicts(base, ft), {"sparsity": 0.5}, LocalizeContext(),
                      Provenance())


def test_params_validated() -> None:
    from skillhub.errors import LocalizeError

    tv = TaskVector.from_state_dicts({"w": torch.zeros(3)}, {"w": torch.ones(3)})
    with pytest.raises(LocalizeError, match="sparsity"):
        run_localizer(Dataless, tv, {"sparsity": 0}, LocalizeContext(), Provenance())
    with pytest.raises(LocalizeError, match="bogus"):
        run_localizer(Dataless, tv, {"bogus": 1}, LocalizeContext(), Provenance())
