"""``average``: Localize-and-Stitch's stitch (He et al., arXiv 2408.13656, eq. 3), the default policy.

θ = θ₀ + Σₜ γₜ⊙τₜ / max(Σₜ γₜ, 1): overlapping entries get the mean of the tasks' values; no scaling factor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skillhub.hookspecs import hookimpl
from skillhub.stitch import Index, StitchPolicy

if TYPE_CHECKING:
    import torch


class Average(StitchPolicy):
    """Mean of the masked task-vector values at every entry (Localize-and-Stitch)."""

    name = "average"
    whole_tensor = True

    def accumulators(self, numel: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        import torch

        return {"sum": torch.zeros(numel, dtype=dtype, device=device)}

    def update(self, acc: dict[str, torch.Tensor], idx: Index, values: torch.Tensor, sign: int) -> None:
        if isinstance(idx, slice):  # a dense mask: zeros outside it add nothing
            acc["sum"][idx].add_(values, alpha=sign)
        else:
            acc["sum"].index_add_(0, idx, values, alpha=sign)

    def delta(self, acc: dict[str, torch.Tensor], count: torch.Tensor, idx: Index) -> torch.Tensor:
        return acc["sum"][idx] / count.clamp(min=1).to(acc["sum"].dtype)


@hookimpl
def register_stitch_policies() -> list[type[StitchPolicy]]:
    return [Average]
