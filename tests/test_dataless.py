"""Dataless localization: exactly k entries, the global top-|τ|, the documented tie rule, streaming."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skillhub.delta import Provenance
from skillhub.localize import LocalizeContext, run_localizer
from skillhub.strategies import topk
from skillhub.strategies.dataless import Dataless
from skillhub.strategies.topk import global_topk
from skillhub.taskvector import StateDict, TaskVector


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
    assert {key: delta.flat_indices(key).tolist() for key in delta.values} == want
    nonzero = sum(int((tv.tensor(key) != 0).sum()) for key in tv.keys)
    assert delta.nnz == min(k, nonzero)
    for key, idx in delta.indices.items():
        assert idx.dtype == torch.int32
        assert torch.equal(delta.values[key], tv.tensor(key).reshape(-1)[idx.long()])
    for key in delta.dense_keys:  # sparsity 1: τ itself
        assert torch.equal(delta.dense(key), tv.tensor(key))


@pytest.mark.parametrize("sample_size", [64, 1 << 18])
def test_sampled_threshold_path_is_exact(monkeypatch: pytest.MonkeyPatch, sample_size: int) -> None:
    # Force the sampling path on a small model (and, with a tiny sample, the retry after an unlucky threshold).
    monkeypatch.setattr(topk, "SAMPLE_SIZE", sample_size)
    g = torch.Generator().manual_seed(3)
    shapes = {"a": (300, 200), "b": (1000,), "c": (50, 50, 4)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ft = {k: v + torch.randn(v.shape, generator=g) * (0.01 + (torch.rand(v.shape, generator=g) < 0.02))
          for k, v in base.items()}
    tv = TaskVector.from_state_dicts(base, ft)
    monkeypatch.setattr(topk, "SAMPLE_SIZE", min(sample_size, tv.numel // 5))
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
    real = topk._sample_threshold

    def too_high(*args: object) -> float:
        calls.append(args[-1])
        return 1e9 if len(calls) == 1 else real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(topk, "_sample_threshold", too_high)
    monkeypatch.setattr(topk, "SAMPLE_SIZE", 100)
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


# --- scope = "tensor": the top fraction of every tensor separately (mergekit's TIES trimming) ------------------------


def brute_force_per_tensor(tv: TaskVector, sparsity: float) -> dict[str, list[int]]:
    """Reference: in each tensor alone, sort the non-zero entries by (-|τ|, flat index), take ⌊sparsity × numel⌋."""
    out: dict[str, list[int]] = {}
    for key in tv.keys:
        flat = tv.tensor(key).reshape(-1).tolist()
        k = math.floor(sparsity * len(flat))
        ranked = sorted((-abs(v), i) for i, v in enumerate(flat) if v != 0)[:k]
        if ranked:
            out[key] = sorted(i for _, i in ranked)
    return out


def test_scope_tensor_takes_the_top_of_every_tensor_not_the_global_top() -> None:
    # The same model as the global test above: per tensor, "small" gets its own 10 entries despite its tiny τ.
    base = {"big": torch.zeros(100), "small": torch.zeros(100)}
    ft = {"big": torch.linspace(1, 2, 100), "small": torch.linspace(0.001, 0.01, 100)}
    tv = TaskVector.from_state_dicts(base, ft)
    delta = run_localizer(Dataless, tv, {"sparsity": 0.1, "scope": "tensor"}, LocalizeContext(), Provenance())
    assert {k: i.tolist() for k, i in delta.indices.items()} == {"big": list(range(90, 100)),
                                                                  "small": list(range(90, 100))}
    assert torch.equal(delta.values["small"], ft["small"][90:])


def test_scope_tensor_ties_go_to_the_earliest_index_within_the_tensor() -> None:
    base = {"a": torch.zeros(6), "b": torch.zeros(5)}
    ft = {"a": torch.tensor([1.0, 2.0, 1.0, -1.0, 0.0, 1.0]), "b": torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0])}
    tv = TaskVector.from_state_dicts(base, ft)
    delta = run_localizer(Dataless, tv, {"sparsity": 0.5, "scope": "tensor"}, LocalizeContext(), Provenance())
    # a: k = 3 → 2.0, then the |τ| = 1 ties at 0 and 2; b: k = 2 but one non-zero entry only (τ = 0 never taken)
    assert {k: i.tolist() for k, i in delta.indices.items()} == {"a": [0, 1, 2], "b": [2]}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), sparsity=st.floats(0.01, 0.99), quantize=st.booleans())
def test_scope_tensor_matches_brute_force(seed: int, sparsity: float, quantize: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    base = {"x": torch.randn(7, 5, generator=g), "y": torch.randn(13, generator=g), "z": torch.randn(2, 3, 4, generator=g),
            "s": torch.randn((), generator=g)}
    ft = {}
    for k, v in base.items():
        d = torch.randn(v.shape, generator=g)
        ft[k] = v + (torch.round(d * 2) / 2 if quantize else d)
    tv = TaskVector.from_state_dicts(base, ft)
    delta = run_localizer(Dataless, tv, {"sparsity": sparsity, "scope": "tensor"}, LocalizeContext(), Provenance())
    got = {key: delta.flat_indices(key).tolist() for key in delta.values}
    assert got == brute_force_per_tensor(tv, sparsity)
    for key in tv.keys:  # exactly k_i = ⌊sparsity × numel_i⌋ per tensor, fewer only when τ has fewer non-zeros
        numel, nonzero = math.prod(tv.shapes[key]), int((tv.tensor(key) != 0).sum())
        assert delta.nnz_of(key) == min(math.floor(sparsity * numel), nonzero), key
        if key in delta.values:
            assert torch.equal(delta.dense(key)[delta.mask(key)], tv.tensor(key)[delta.mask(key)])


def test_scope_is_stamped_only_when_not_the_default() -> None:
    from skillhub.errors import LocalizeError

    tv = TaskVector.from_state_dicts({"w": torch.zeros(10)}, {"w": torch.arange(10.0)})
    plain = run_localizer(Dataless, tv, {"sparsity": 0.5}, LocalizeContext(), Provenance())
    per = run_localizer(Dataless, tv, {"sparsity": 0.5, "scope": "tensor"}, LocalizeContext(), Provenance())
    # Masks made before the option existed keep their params (and bytes, and content address).
    assert plain.provenance.params == {"sparsity": 0.5}
    assert per.provenance.params == {"sparsity": 0.5, "scope": "tensor"}
    assert Dataless.Params(**plain.provenance.params).scope == "global"
    with pytest.raises(LocalizeError, match="scope"):
        run_localizer(Dataless, tv, {"scope": "layer"}, LocalizeContext(), Provenance())


# --- sparsity 1: every non-zero entry, in the dense form -------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_sparsity_one_keeps_every_nonzero_entry_in_the_dense_form(scope: str) -> None:
    g = torch.Generator().manual_seed(4)
    base = {"full": torch.randn(8, 6, generator=g), "holes": torch.randn(40, generator=g),
            "few": torch.randn(30, generator=g), "none": torch.randn(5, generator=g),
            "half": torch.randn(4, 4, generator=g).half()}
    ft = {k: v + 0.1 for k, v in base.items()}
    ft["holes"][[3, 17]] = base["holes"][[3, 17]]  # two untouched entries: left out by being 0
    ft["few"] = base["few"].clone()
    ft["few"][[1, 2]] += 1  # 2 non-zeros of 30: indices are smaller than 30 values
    ft["none"] = base["none"].clone()
    tv = TaskVector.from_state_dicts(base, ft)
    delta = run_localizer(Dataless, tv, {"sparsity": 1.0, "scope": scope}, LocalizeContext(), Provenance())
    assert set(delta.dense_keys) == {"full", "holes", "half"} and set(delta.indices) == {"few"}
    assert "none" not in delta.values
    assert delta.values["full"].dtype == torch.float32 and delta.values["half"].dtype == torch.float16
    for key in tv.keys:
        tau = tv.tensor(key).to(tv.dtypes[key])
        assert torch.equal(delta.dense(key, tv.dtypes[key]), tau), key
        assert torch.equal(delta.mask(key), tau != 0), key
    assert delta.nnz == sum(int((tv.tensor(k) != 0).sum()) for k in tv.keys) == 48 + 38 + 2 + 16
    # The same mask as the streaming selection would give, entry for entry.
    assert {k: delta.flat_indices(k).tolist() for k in delta.values} == brute_force(tv, tv.numel)


def test_a_sparsity_one_mask_file_is_the_size_of_the_checkpoint_not_twice_it(tmp_path) -> None:
    g = torch.Generator().manual_seed(5)
    base = {f"l{i}.w": torch.randn(64, 32, generator=g) for i in range(3)}
    ft = {k: v + torch.randn(v.shape, generator=g) * 1e-2 for k, v in base.items()}
    tv = TaskVector.from_state_dicts(base, ft)
    delta = run_localizer(Dataless, tv, {"sparsity": 1.0}, LocalizeContext(), Provenance())
    path = tmp_path / "all.mask.safetensors"
    delta.save(path)
    data = 3 * 64 * 32 * 4
    assert delta.nbytes == data and path.stat().st_size < data + 2048  # values and the header, no indices


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("quantize", [False, True])
def test_tensors_read_in_pieces_give_the_same_mask_byte_for_byte(monkeypatch: pytest.MonkeyPatch, scope: str,
                                                                 quantize: bool) -> None:
    """Bounded scratch: tensors over PIECE entries are read in pieces (no buffer the size of the largest tensor);
    the mask, its values, the tie rule's choices and the recorded ‖τ‖² are the same bits as with whole tensors."""
    from skillhub.taskvector import SQUARES_DOT

    g = torch.Generator().manual_seed(11)
    shapes = {"emb": (40, 1000), "w": (3 * SQUARES_DOT + 17,), "small": (30, 7)}
    base = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    ft = {}
    for k, v in base.items():
        d = torch.randn(v.shape, generator=g) * (1 + 20 * (torch.rand(v.shape, generator=g) < 0.01))
        ft[k] = (v.float() + (torch.round(d * 2) / 2 if quantize else d * 0.01)).to(torch.bfloat16)

    def localize() -> tuple[object, dict[str, float]]:
        tv = TaskVector(StateDict(base), StateDict(ft), list(shapes), norms=True)
        delta = run_localizer(Dataless, tv, {"sparsity": 0.03, "scope": scope}, LocalizeContext(), Provenance())
        return delta, dict(tv.squares)

    whole, whole_sq = localize()
    monkeypatch.setattr(topk, "PIECE", SQUARES_DOT)  # every tensor but "small" in pieces
    monkeypatch.setattr(topk, "SAMPLE_SIZE", 256)  # and the sampled-threshold path taken
    pieces, pieces_sq = localize()
    assert whole.nnz == pieces.nnz > 0
    assert set(whole.values) == set(pieces.values)
    for key in whole.values:
        assert torch.equal(whole.indices[key], pieces.indices[key]) and whole.indices[key].dtype == torch.int32
        assert torch.equal(whole.values[key].view(torch.int16), pieces.values[key].view(torch.int16))
    assert whole_sq == pieces_sq



@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_progress_counts_every_tensor_once_from_both_workers(scope: str) -> None:
    g = torch.Generator().manual_seed(4)
    base = {k: torch.randn(60, generator=g) for k in "abcde"}
    ft = {k: v + torch.randn(60, generator=g) for k, v in base.items()}
    seen: list[tuple[int, int]] = []
    ctx = LocalizeContext(progress=lambda done, total: seen.append((done, total)))
    run_localizer(Dataless, TaskVector.from_state_dicts(base, ft), {"sparsity": 0.1, "scope": scope}, ctx,
                  Provenance())
    assert seen == [(i, 5) for i in range(1, 6)]
