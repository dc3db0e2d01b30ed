"""``sum``: task arithmetic (Ilharco et al., ICLR 2023) as a stitch policy: θ = θ₀ + λ Σₜ γₜ⊙τₜ.

With a dense mask (sparsity 1) this is exactly task arithmetic; with sparse masks it is "localized task arithmetic".
λ is usually chosen on held-out data (0.3 to 0.5 is typical for 8 tasks).
"""

from __future__ import annotations

import torch
from skillhub.hookspecs import hookimpl
from skillhub.stitch import ScaleParams, StitchPolicy


class Sum(StitchPolicy):
    """λ times the sum of the masked task-vector values."""

    name = "sum"
    Params = ScaleParams

    def accumulators(self, numel: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"sum": torch.zeros(numel, dtype=dtype, device=device)}

    def update(self, acc: dict[str, torch.Tensor], idx: torch.Tensor, values: torch.Tensor, sign: int) -> None:
        acc["sum"].index_add_(0, idx, values, alpha=sign)

    def delta(self, acc: dict[str, torch.Tensor], count: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return acc["sum"][idx] * self.params.scale


@hookimpl
def register_stitch_policies() -> list[type[StitchPolicy]]:
    return [Sum]
