"""The distance check (FAULTS B7, B9) without a pass of its own: ‖τ‖² recorded by the localizer's pass over τ
(whole tensors or cache-sized pieces), ‖θ₀‖² kept per base fingerprint; the same number and the same refusal as a
full pass over both models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from skillhub import ops
from skillhub.checkpoint import open_checkpoint, write_safetensors
from skillhub.errors import CheckpointError
from skillhub.families.state_dict import StateDictFamily
from skillhub.fingerprints import fingerprint
from skillhub.ops import base_squares, localize_checkpoint
from skillhub.plugins import load_plugins
from skillhub.taskvector import (
    SQUARES_DOT,
    StateDict,
    TaskVector,
    squares_of,
    sum_of_squares,
)

SHAPES = {"a.w": (300, 200), "b.w": (7,), "c.w": (50, 41)}
PLUGINS = load_plugins([], entry_points=False)


def model(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in SHAPES.items()}


def reference(base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor]) -> float:
    """‖τ‖/‖θ₀‖ in float64, the plain way (τ in float32, as the task vector computes it)."""
    tau = math.sqrt(sum(float(((ft[k] - base[k]).double() ** 2).sum()) for k in SHAPES))
    return tau / math.sqrt(sum(float((base[k].double() ** 2).sum()) for k in SHAPES))


def test_sum_of_squares_is_float64_exact_squares_and_finiteness() -> None:
    t = torch.randn(3 * SQUARES_DOT + 17, generator=torch.Generator().manual_seed(1))
    assert sum_of_squares(t) == pytest.approx(float((t.double() ** 2).sum()), rel=1e-13)
    assert sum_of_squares(torch.zeros(0)) == 0.0
    bf = t.to(torch.bfloat16)  # no numpy dtype: the torch path, same steps
    assert sum_of_squares(bf) == pytest.approx(float((bf.double() ** 2).sum()), rel=1e-13)
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[SQUARES_DOT + 5] = bad
        assert not math.isfinite(sum_of_squares(u))
    # pieces of whole dot steps, each result passed on as the next start: the same float as at once
    total = 0.0
    for start in range(0, t.numel(), 2 * SQUARES_DOT):
        total = sum_of_squares(t[start:start + 2 * SQUARES_DOT], start=total)
    assert total == sum_of_squares(t)


def test_recorded_norms_equal_a_full_pass_whichever_pass_recorded_them() -> None:
    base, ft = model(0), model(1)
    full = TaskVector.from_state_dicts(base, ft).relative_norm()  # nothing recorded: its own pass over τ and θ₀
    assert full == pytest.approx(reference(base, ft), rel=1e-12)
    whole = TaskVector(StateDict(base), StateDict(ft), SHAPES, norms=True)
    for k in whole.keys:
        whole.tensor(k)
    pieces = TaskVector(StateDict(base), StateDict(ft), SHAPES, norms=True)
    work = torch.empty(SQUARES_DOT)
    for k in pieces.keys:
        got = torch.cat([p.clone() for _, p in pieces.pieces(k, work)])
        assert torch.equal(got, (ft[k] - base[k]).reshape(-1))
    cached = squares_of(StateDict(base), sorted(SHAPES))
    assert set(whole.squares) == set(SHAPES) and whole.squares == pieces.squares  # recorded by the passes
    plain = TaskVector.from_state_dicts(base, ft)  # norms not asked for: the cheaper finiteness check, no record
    for k in plain.keys:
        plain.tensor(k)
    assert plain.squares == {} and plain.relative_norm(cached) == full
    assert whole.relative_norm(cached) == pieces.relative_norm(cached) == full


def test_pieces_refuse_nan_like_a_whole_tensor() -> None:
    base, ft = model(0), model(1)
    ft["a.w"][200, 3] = float("nan")
    for norms in (False, True):
        task = TaskVector(StateDict(base), StateDict(ft), SHAPES, norms=norms)
        with pytest.raises(CheckpointError, match="tensor 'a.w' holds NaN or Inf"):
            for _ in task.pieces("a.w", torch.empty(SQUARES_DOT)):
                pass
        with pytest.raises(CheckpointError, match="tensor 'a.w' holds NaN or Inf"):
            task.tensor("a.w")


def _localize(tmp_path: Path, base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], *, base_sha: str | None):
    write_safetensors(tmp_path / "base.safetensors", base, {})
    write_safetensors(tmp_path / "ft.safetensors", ft, {})
    fam, b = StateDictFamily(), open_checkpoint(tmp_path / "base.safetensors")
    f = open_checkpoint(tmp_path / "ft.safetensors")
    return localize_checkpoint(b, fam.prepare(b, f), family=fam, localizer="dataless", params={"sparsity": 0.05},
                               plugins=PLUGINS, skill="s", base_sha=base_sha, max_relative_delta=0.5)


def test_cached_base_norms_give_the_same_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, other = model(0), model(7)  # another model of the same shapes: ‖τ‖/‖θ₀‖ ≈ √2
    monkeypatch.setattr(ops, "_BASE_SQUARES", {})
    with pytest.raises(CheckpointError) as first:
        _localize(tmp_path, base, other, base_sha=None)  # computed beside the localization, then kept
    sha = fingerprint(open_checkpoint(tmp_path / "base.safetensors"))
    assert list(ops._BASE_SQUARES) == [(sha, tuple(sorted(SHAPES)))]
    calls = []
    monkeypatch.setattr(ops, "squares_of", lambda *a: calls.append(a) or squares_of(*a))
    with pytest.raises(CheckpointError) as again:
        _localize(tmp_path, base, other, base_sha=sha)  # from the cache: no pass over θ₀
    assert calls == []
    assert str(first.value) == str(again.value)
    rel = reference(base, other)
    assert f"{rel:.3g}× the base's norm" in str(again.value) and "max_relative_delta" in str(again.value)
    # a finetune close to the base passes, with the base's norms from the cache
    near = {k: v + 0.01 * model(3)[k] for k, v in base.items()}
    assert _localize(tmp_path, base, near, base_sha=sha).delta.nnz > 0
    assert calls == []


def test_base_squares_warm_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_BASE_SQUARES", {})
    base = model(0)
    write_safetensors(tmp_path / "base.safetensors", base, {})
    b = open_checkpoint(tmp_path / "base.safetensors")
    got = base_squares(b, sorted(SHAPES), "f" * 64)
    assert ops._BASE_SQUARES[("f" * 64, tuple(sorted(SHAPES)))] is got
    assert got == pytest.approx({k: float((v.double() ** 2).sum()) for k, v in base.items()}, rel=1e-13)
