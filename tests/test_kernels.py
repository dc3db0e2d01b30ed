"""The compiled passes over τ give numpy's answer: the same candidates, τ and |τ|, one ‖τ‖² whatever the pieces,
and masks bit for bit those of the numpy path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from skillhub import kernels
from skillhub.delta import Provenance
from skillhub.errors import CheckpointError
from skillhub.localize import LocalizeContext, run_localizer
from skillhub.strategies import topk
from skillhub.strategies.dataless import Dataless
from skillhub.taskvector import StateDict, TaskVector

pytestmark = pytest.mark.skipif(not kernels.warm(), reason="numba is not importable here (or SKILLHUB_NO_JIT)")


def pair(n: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and a finetune of ``n`` entries with exact zeros and many ties in τ (quantized steps)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=g)
    step = torch.round(torch.randn(n, generator=g) * 4) / 64  # few distinct values: ties, and zeros
    return (b + step).to(dtype), b.to(dtype)


def reference(f: torch.Tensor, b: torch.Tensor, t: float) -> tuple[np.ndarray, ...]:
    tau = (f.float() - b.float()).numpy()
    a = np.abs(tau)
    keep = a >= t if t > 0 else a > 0
    keep &= a > 0
    idx = np.flatnonzero(keep)
    return idx, tau[idx], a[idx]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, kernels.LANES - 1, 5 * kernels.LANES, 10_007])
@pytest.mark.parametrize("t", [0.0, 0.05])
def test_scan_pair_is_numpys_selection(dtype: torch.dtype, n: int, t: float) -> None:
    f, b = pair(n, dtype)
    want = reference(f, b, t)
    sqs = set()
    for size in (kernels.LANES, 3 * kernels.LANES, kernels.OUT):  # small outputs flush many times
        idx, val, ab, sq = kernels.scan_pair(f, b, t, kernels.Buffers(size), torch.float32)
        assert np.array_equal(idx.numpy(), want[0]) and idx.dtype == torch.int64
        assert np.array_equal(val.numpy(), want[1]) and np.array_equal(ab.numpy(), want[2])
        sqs.add(sq)
    tau64 = (f.float() - b.float()).double()  # τ in float32, squared and summed in float64
    assert len(sqs) == 1 and sqs.pop() == pytest.approx(float((tau64 ** 2).sum()), rel=1e-12)


def test_the_block_width_is_the_compiled_one() -> None:
    from skillhub import jitted

    assert kernels.LANES == jitted.LANES


def test_squares_are_the_same_float_from_a_scan_and_from_tau_in_pieces() -> None:
    f, b = pair(3 * 8192 + 77, torch.float32, seed=3)
    *_, sq = kernels.scan_pair(f, b, 0.1, kernels.Buffers(), torch.float32)
    tau = f - b
    acc = kernels.lanes(tau)
    assert acc is not None
    for start in range(0, tau.numel(), 8192):
        kernels.add_squares(tau[start:start + 8192], acc)
    assert kernels.total(acc) == sq
    assert kernels.lanes(tau.double()) is None  # not float32: the caller sums in its own order


def test_nan_is_never_a_candidate_and_makes_the_squares_non_finite() -> None:
    f, b = pair(1000, torch.float32)
    f[17] = math.nan
    idx, _, _, sq = kernels.scan_pair(f, b, 0.0, kernels.Buffers(), torch.float32)
    assert 17 not in set(idx.tolist()) and not math.isfinite(sq)
    tv = TaskVector(StateDict({"w": b}), StateDict({"w": f}), ["w"])
    with pytest.raises(CheckpointError, match="'w' holds NaN"):
        run_localizer(Dataless, tv, {"sparsity": 0.1}, LocalizeContext(), Provenance())


def test_pairs_it_does_not_take_fall_back() -> None:
    f, b = pair(100, torch.float16)
    assert kernels.scan_pair(f, b, 0.0, kernels.Buffers(), torch.float32) is None
    f32, b32 = pair(100, torch.float32)
    assert kernels.scan_pair(f32, b32, 0.0, kernels.Buffers(), torch.float64) is None  # τ wanted in float64
    assert kernels.scan_pair(f32, b32.to(torch.bfloat16), 0.0, kernels.Buffers(), torch.float32) is None
    out = np.full(3, -1.0, np.float32)
    assert kernels.sample_abs(f, b, 1, out, torch.float32) is False and (out == -1).all()  # untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sample_takes_one_line_in_each_stratum_uniformly(dtype: torch.dtype) -> None:
    # τ = its own flat index (exact in bfloat16 below 256), so each sampled |τ| says where it was read
    f, b = torch.arange(200, dtype=torch.float32).to(dtype), torch.zeros(200).to(dtype)
    seen = set()
    for seed in range(200):
        out = np.empty((20, 4), np.float32)
        assert kernels.sample_abs(f, b, seed, out, torch.float32) is True
        pos = out.astype(np.int64)
        assert (np.diff(pos, axis=1) == 1).all()  # a line is consecutive entries
        start = pos[:, 0]
        assert ((start // 10 == np.arange(20)) | (start == 196)).all()  # in stratum j (or at the tensor's end)
        seen.update((start[:-1] % 10).tolist())
    assert seen == set(range(10))  # every offset in a stratum is drawn
    one, again = np.empty((20, 4), np.float32), np.empty((20, 4), np.float32)
    kernels.sample_abs(f, b, 7, one, torch.float32)
    kernels.sample_abs(f, b, 7, again, torch.float32)
    assert (one == again).all()  # a seed is one sample
    short = np.empty((2, 4), np.float32)
    kernels.sample_abs(f[:3], b[:3], 1, short, torch.float32)
    assert (short == [[0, 1, 2, -1]] * 2).all()  # a tensor shorter than a line: -1 past its end


def test_the_numpy_sample_is_the_same_shape_of_sample() -> None:
    f, b = torch.arange(200, dtype=torch.float32), torch.zeros(200)
    got = topk._lines_abs(f, b, 20, torch.Generator().manual_seed(0), torch.float32).numpy().astype(np.int64)
    assert got.shape == (20, topk.LINE) and (np.diff(got, axis=1) == 1).all()
    assert (got[:, 0] // 10 == np.arange(20)).sum() >= 18  # in its stratum, but where clamped to the end
    short = topk._lines_abs(f[:3], b[:3], 1, torch.Generator().manual_seed(0), torch.float32)
    assert short.tolist() == [[0, 1, 2] + [-1] * (topk.LINE - 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.003, 0.05, 1.0])
def test_masks_are_bit_for_bit_the_numpy_paths(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                               sparsity: float) -> None:
    g = torch.Generator().manual_seed(5)
    shapes = {"emb": (300, 200), "w": (3 * 8192 + 17,), "b": (31,)}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    ft = {k: (v.float() + torch.round(torch.randn(v.shape, generator=g) * 3) / 256).to(dtype)
          for k, v in base.items()}
    monkeypatch.setattr(topk, "SAMPLE_SIZE", 512)  # the sampled threshold taken, on a small model

    def localize() -> tuple[object, dict[str, float]]:
        tv = TaskVector(StateDict(base), StateDict(ft), list(shapes), norms=True)
        return run_localizer(Dataless, tv, {"sparsity": sparsity}, LocalizeContext(), Provenance()), tv.squares

    jit, jit_sq = localize()
    monkeypatch.setattr(kernels, "_kernels", False)  # numba off: the numpy path
    plain, plain_sq = localize()
    assert jit.nnz == plain.nnz > 0 and set(jit.values) == set(plain.values)
    for key in jit.values:
        assert torch.equal(jit.values[key].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           plain.values[key].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        if key in jit.indices:
            assert torch.equal(jit.indices[key], plain.indices[key])
    for key in jit_sq:  # two float64 sums of the same exact squares, in different orders
        assert jit_sq[key] == pytest.approx(plain_sq[key], rel=1e-12)


def test_the_workspaces_warm_up_is_waited_for_at_exit_not_cut_off() -> None:
    # A daemon thread inside numba's compile (LLVM's C++) at interpreter exit aborts the process (SIGABRT, seen
    # in CI on a fresh clone: a start-up that failed at once exited -6 instead of 2). Exit must wait for it.
    import threading

    import torch

    from skillhub.job import Workspace

    before = set(threading.enumerate())
    Workspace(base=None, base_sha="", family=None, plugins=None, device=torch.device("cpu"))  # type: ignore[arg-type]
    started = [t for t in threading.enumerate() if t not in before and t.name == "skillhub-kernels"]
    for t in started:
        assert not t.daemon
        t.join(60)
    assert started or kernels.warm()  # (already finished: it ran, and the compiled path is loaded)


@pytest.mark.parametrize("k", [3, 4, 5, 6])
def test_the_compiled_selection_takes_ties_in_canonical_order(k: int) -> None:
    # |τ| = 1 ties across two tensors, more of them than places for k < 6: the first in key, then flat order
    base = {"b": torch.zeros(6), "a": torch.zeros(4)}
    ft = {"a": torch.tensor([1.0, 1.0, 0.5, 1.0]), "b": torch.tensor([1.0, -1.0, 2.0, 0.0, 1.0, 1.0])}
    tv = TaskVector(StateDict(base), StateDict(ft), ["a", "b"])
    got = {key: idx.tolist() for key, (idx, _) in topk.global_topk(tv, k).items()}
    ranked = [("b", 2), ("a", 0), ("a", 1), ("a", 3), ("b", 0), ("b", 1), ("b", 4), ("b", 5)][:k]
    want = {key: sorted(i for kk, i in ranked if kk == key) for key in ("a", "b")}
    assert got == {key: idx for key, idx in want.items() if idx}
