"""The non-finite entries of the :class:`~skillhub.stitch.Stitcher`'s merged tensors, counted as entries change.

The smoke check of a new version (:meth:`~skillhub.stitch.Stitcher.nonfinite`) asks which merged tensor holds NaN or
±Inf. The count of each tensor is kept up to date as its merged entries are written, so the check costs O(changed
entries), not a pass over the model; a whole tensor is counted only at start-up and after a full recomputation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from skillhub.stitchstate import TensorState


def nonfinite(t: torch.Tensor) -> int:
    """Number of NaN and ±Inf entries of ``t``."""
    import torch

    return int(t.numel() - torch.count_nonzero(torch.isfinite(t))) if t.numel() else 0


class NonFinite:
    """Non-finite merged entries per tensor (id of its state -> count, when not 0), counted first over ``states``."""

    def __init__(self, states: Iterable[TensorState]) -> None:
        self.bad: dict[int, int] = {}
        for st in states:
            self.count(st)
        self.base_bad = set(self.bad)  # tensors whose θ₀ itself holds NaN/Inf

    def holds(self, st: TensorState) -> bool:
        """Whether the merged tensor of ``st`` holds a NaN or ±Inf."""
        return bool(self.bad.get(id(st)))

    def store(self, st: TensorState, idx: torch.Tensor, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write the merged entries ``pieces`` (flat positions, values; together ``idx``) and keep the tensor's
        count of non-finite entries up to date."""
        # The non-finite count changes by what idx held before and holds after. A tensor with no non-finite entry
        # (and a finite θ₀, which entries no mask covers any more return to) held none before: only the new values
        # need a look, no gather.
        sid = id(st)
        exact = sid in self.bad or sid in self.base_bad
        bad_before = nonfinite(st.merged[idx]) if exact else 0
        fresh = 0
        for flat, merged in pieces:
            st.merged[flat] = merged
            if not exact:
                fresh += nonfinite(merged)
        bad = self.bad.get(sid, 0) + (nonfinite(st.merged[idx]) if exact else fresh) - bad_before
        if bad:
            self.bad[sid] = bad
        else:
            self.bad.pop(sid, None)

    def count(self, st: TensorState) -> None:
        """Count the non-finite entries of a whole merged tensor (start-up, and after a full recomputation)."""
        bad = nonfinite(st.merged) if st.merged.is_floating_point() else 0
        if bad:
            self.bad[id(st)] = bad
        else:
            self.bad.pop(id(st), None)
