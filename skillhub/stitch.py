"""Stitching: combine the sparse deltas of the active skills into merged weights, incrementally.

Localize-and-Stitch (He et al., arXiv 2408.13656, §3.2): θ = θ₀ + Σₜ γₜ⊙τₜ / max(Σₜ γₜ, 1). Where masks overlap
the tasks' values are averaged; entries in no mask stay exactly θ₀; there is no scaling factor.

The :class:`Stitcher` keeps, per included tensor and on its device: θ₀, the merged tensor, the per-entry mask count
C = Σₜ γₜ, and the policy's accumulators (for ``average``, Σ = Σₜ γₜ⊙τₜ). Adding or removing a skill updates the
accumulators at that skill's indices and recomputes the merged entries there only, so its cost is proportional to
the mask, not to the model or the number of skills (DESIGN §2).

Accumulators are float64 by default. Masked τ values are stored in the base dtype (float32 at most for usual
models), and sums of a few float32 values are exact in float64, so an add followed by a remove restores the
accumulators bit for bit: no drift, however many cycles. Where the count returns to 0 the accumulators are reset to
0 and the merged entry to θ₀ exactly, whatever the accumulator dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from skillhub.delta import SparseDelta
from skillhub.errors import StitchError
from skillhub.localize import NoParams

COUNT_DTYPE = torch.int16
COUNT_MAX = torch.iinfo(COUNT_DTYPE).max


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; anything else is passed to :class:`torch.device`."""
    if str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StitchError(f"device {spec!r} requested but CUDA is not available", key="device",
                          hint='use device = "auto" or "cpu"')
    return dev


class ScaleParams(BaseModel):
    """Params of policies with a scaling factor λ (``sum``, ``ties``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    scale: float = Field(1.0, description="λ, the scaling factor applied to the merged task vector")


class StitchPolicy:
    """Base class of stitch policies. Subclasses set ``name`` and ``Params`` and implement the three methods.

    All tensors passed in are flat (1-D) and on the stitcher's device; ``idx`` is an int64 tensor of unique indices.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params: Any = params if params is not None else self.Params()

    def accumulators(self, numel: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Fresh, zeroed per-entry accumulators for a tensor of ``numel`` elements."""
        raise NotImplementedError

    def update(self, acc: dict[str, torch.Tensor], idx: torch.Tensor, values: torch.Tensor, sign: int) -> None:
        """Add (``sign`` = +1) or remove (−1) one skill's values at ``idx``."""
        raise NotImplementedError

    def delta(self, acc: dict[str, torch.Tensor], count: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The merged delta (θ − θ₀) at ``idx``, from the accumulators and the mask count there."""
        raise NotImplementedError

    def reset(self, acc: dict[str, torch.Tensor], idx: torch.Tensor) -> None:
        """Zero the accumulators at ``idx`` (called where no mask is active any more)."""
        for t in acc.values():
            t[idx] = 0


class _TensorState:
    __slots__ = ("base", "merged", "count", "acc", "shape")

    def __init__(self, base: torch.Tensor, policy: StitchPolicy, device: torch.device, dtype: torch.dtype) -> None:
        self.shape = tuple(base.shape)
        self.base = base.detach().reshape(-1).to(device, copy=True)
        self.merged = self.base.clone()
        self.count = torch.zeros(self.base.numel(), dtype=COUNT_DTYPE, device=device)
        self.acc = policy.accumulators(self.base.numel(), device, dtype)
        # Touch the fresh (lazily zero-mapped) memory now: start-up pays the page faults, not the first add.
        self.count.zero_()
        for t in self.acc.values():
            t.zero_()


class Stitcher:
    """Incremental stitcher over the included tensors of one base model.

    :param base: θ₀ for every included tensor (``{key: tensor}``); copied to ``device``.
    :param policy: the stitch policy (``average`` is Localize-and-Stitch).
    :param device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:1"``...
    :param accumulate: accumulator dtype; float64 (default) makes add/remove cycles drift-free.
    """

    def __init__(self, base: Mapping[str, torch.Tensor], policy: StitchPolicy, *, device: str | torch.device = "auto",
                 accumulate: torch.dtype = torch.float64) -> None:
        self.device = resolve_device(device)
        self.policy = policy
        self.accumulate = accumulate
        self._state = {k: _TensorState(t, policy, self.device, accumulate) for k, t in base.items()}
        self._tasks: dict[str, SparseDelta] = {}
        self._covered = 0
        self._overlapping = 0

    @property
    def keys(self) -> list[str]:
        return list(self._state)

    @property
    def active(self) -> list[str]:
        """Ids of the skills currently stitched in, in the order they were added."""
        return list(self._tasks)

    def check(self, delta: SparseDelta) -> None:
        """Raise :class:`StitchError` unless ``delta`` fits this base (keys and shapes)."""
        for key, shape in delta.shapes.items():
            if key not in self._state:
                raise StitchError(f"mask covers tensor {key!r}, which the base does not include", key=key,
                                  hint="the mask was made for another base model or family")
            if tuple(shape) != self._state[key].shape:
                raise StitchError(f"mask shape {list(shape)} for {key!r} differs from the base's "
                                  f"{list(self._state[key].shape)}", key=key)

    def add(self, task_id: str, delta: SparseDelta) -> None:
        """Stitch one skill in; cost O(its mask)."""
        if task_id in self._tasks:
            raise StitchError(f"skill {task_id!r} is already stitched in", key=task_id)
        self.check(delta)
        delta = delta.to(self.device)
        for key, idx in delta.indices.items():
            if idx.numel() and int(self._state[key].count[idx.long()].max()) >= COUNT_MAX:
                raise StitchError(f"more than {COUNT_MAX} masks overlap in {key!r}", key=key)
        done: list[str] = []
        try:
            self._apply(delta, +1, done)
        except BaseException:
            # All or nothing (FAULTS C8): a device running out of memory half-way must not leave half a skill in.
            self._apply(delta, -1, keys=done)
            raise
        self._tasks[task_id] = delta

    def remove(self, task_id: str) -> SparseDelta:
        """Take one skill out; cost O(its mask). Entries no mask covers any more become exactly θ₀."""
        if task_id not in self._tasks:
            raise StitchError(f"skill {task_id!r} is not stitched in", key=task_id)
        delta = self._tasks.pop(task_id)
        self._apply(delta, -1)
        return delta

    def _apply(self, delta: SparseDelta, sign: int, done: list[str] | None = None,
               keys: list[str] | None = None) -> None:
        """Add (``sign`` = +1) or take out (-1) one mask's entries, tensor by tensor (only ``keys`` if given),
        appending each finished tensor's key to ``done``."""
        for key in delta.indices if keys is None else keys:
            idx = delta.indices[key]
            if idx.numel() == 0:
                continue
            st = self._state[key]
            # Allocate before the first in-place change, so running out of memory leaves this tensor as it was.
            idx = idx.long()
            before = st.count[idx]
            step = torch.full_like(idx, sign, dtype=COUNT_DTYPE)
            values = delta.values[key].to(self.accumulate)
            st.count.index_add_(0, idx, step)
            try:
                self.policy.update(st.acc, idx, values, sign)
            except BaseException:
                st.count.index_add_(0, idx, step, alpha=-1)
                raise
            count = st.count[idx]
            # Coverage statistics kept incrementally, so reading them is O(1), not a pass over the model.
            self._covered += int((count > 0).sum()) - int((before > 0).sum())
            self._overlapping += int((count > 1).sum()) - int((before > 1).sum())
            idle = idx[count == 0]
            if idle.numel():
                self.policy.reset(st.acc, idle)
            merged = st.base[idx].to(self.accumulate) + self.policy.delta(st.acc, count, idx)
            st.merged[idx] = merged.to(st.base.dtype)
            if idle.numel():
                st.merged[idle] = st.base[idle]
            if done is not None:
                done.append(key)

    def tensor(self, key: str) -> torch.Tensor:
        """The live merged tensor (do not modify; use :meth:`snapshot` for a copy that stays fixed)."""
        st = self._state[key]
        return st.merged.reshape(st.shape)

    def snapshot(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """An immutable copy of the merged included tensors (what a published version holds)."""
        return {k: st.merged.reshape(st.shape).to(device, copy=True) for k, st in self._state.items()}

    def count(self, key: str) -> torch.Tensor:
        """Per-entry number of active masks covering ``key`` (a copy)."""
        st = self._state[key]
        return st.count.reshape(st.shape).clone()

    def overlap(self) -> dict[str, int]:
        """Entries covered by at least one mask and by two or more, over all tensors (kept incrementally)."""
        return {"covered": self._covered, "overlapping": self._overlapping}


def stitch(base: Mapping[str, torch.Tensor], deltas: Mapping[str, SparseDelta], policy: StitchPolicy,
           *, device: str | torch.device = "cpu", accumulate: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Stitch from scratch: θ₀ with every delta added (one pass per skill). Returns CPU tensors."""
    s = Stitcher(base, policy, device=device, accumulate=accumulate)
    for task_id, delta in deltas.items():
        s.add(task_id, delta)
    return s.snapshot()
