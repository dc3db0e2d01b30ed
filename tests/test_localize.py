"""The core's check of a strategy's result (FAULTS B8), for both stored forms of a mask: sparse and dense."""

from __future__ import annotations

import pytest
import torch

from skillhub import kernels
from skillhub.delta import SparseDelta
from skillhub.errors import LocalizeError
from skillhub.localize import check_delta
from skillhub.taskvector import TaskVector

SHAPES = {"a": (2, 3), "b": (4,)}


def task() -> TaskVector:
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    return TaskVector.from_state_dicts(base, {k: v + 0.1 for k, v in base.items()})


def delta(indices: dict[str, torch.Tensor], values: dict[str, torch.Tensor],
          shapes: dict[str, tuple[int, ...]] | None = None) -> SparseDelta:
    shapes = dict(SHAPES) if shapes is None else shapes
    return SparseDelta(indices, values, shapes, {k: torch.float32 for k in shapes})


@pytest.fixture(params=["numpy", "compiled"])
def checking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways check_delta checks: the compiled pass (the service, which has it loaded) and numpy (a one-off CLI
    run)."""
    if request.param == "compiled" and not kernels.warm():
        pytest.skip("numba is not importable here (or SKILLHUB_NO_JIT)")
    if request.param == "numpy":
        monkeypatch.setattr(kernels, "_kernels", False)
    return str(request.param)


def test_a_good_sparse_and_dense_result_passes(checking: str) -> None:
    check_delta(delta({"b": torch.tensor([0, 3])}, {"a": torch.ones(6), "b": torch.ones(2)}), task(), "s")
    check_delta(delta({"b": torch.tensor([0, 3], dtype=torch.int32)}, {"b": torch.ones(2)}), task(), "s")


@pytest.mark.parametrize(("indices", "values", "message"), [
    ({"b": torch.tensor([0, 4])}, {"b": torch.ones(2)}, "out-of-range indices for 'b'"),
    ({"b": torch.tensor([2, 1])}, {"b": torch.ones(2)}, "unsorted or repeated indices for 'b'"),
    ({"b": torch.tensor([1, 1])}, {"b": torch.ones(2)}, "unsorted or repeated indices for 'b'"),
    ({"b": torch.tensor([1])}, {"b": torch.tensor([float("nan")])}, "NaN or Inf values for 'b'"),
    # the dense form (values alone) is checked too: it was skipped when only indices were walked
    ({}, {"a": torch.tensor([0.0, 1.0, float("inf"), 0.0, 0.0, 0.0])}, "NaN or Inf values for 'a'"),
])
def test_a_bad_result_is_refused_naming_the_tensor(checking: str, indices: dict, values: dict, message: str) -> None:
    with pytest.raises(LocalizeError, match=message) as e:
        check_delta(delta(indices, values), task(), "s")
    assert e.value.key in {"a", "b"}


def test_a_dense_mask_of_another_size_or_an_unknown_tensor_is_refused() -> None:
    wrong = delta({}, {"a": torch.ones(4)}, {"a": (4,), "b": (4,)})  # the strategy's own shapes disagree with τ's
    with pytest.raises(LocalizeError, match="4 dense values for 'a', which has 6 entries"):
        check_delta(wrong, task(), "s")
    unknown = delta({}, {"z": torch.ones(2)}, {**SHAPES, "z": (2,)})
    with pytest.raises(LocalizeError, match="unknown tensor 'z'"):
        check_delta(unknown, task(), "s")
