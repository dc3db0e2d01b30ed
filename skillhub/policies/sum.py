"""``sum``: task arithmetic (Ilharco et al., ICLR 2023) as a stitch policy: θ = θ₀ + λ Σₜ γₜ⊙τₜ.

With a dense mask (sparsity 1) this is exactly task arithmetic; with sparse masks it is "localized task arithmetic".
λ is usually chosen on held-out data (0.3 to 0.5 is typical for 8 tasks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skillhub.hookspecs import hookimpl
from skillhub.policies.average import Average
from skillhub.stitch import Index, ScaleParams, StitchPolicy

if TYPE_CHECKING:
    import torch


class Sum(Average):
    """λ times the sum of the masked task-vector values (the same running sum as ``average``, read differently)."""

    name = "sum"
    Params = ScaleParams

    def delta(self, acc: dict[str, torch.Tensor], count: torch.Tensor, idx: Index) -> torch.Tensor:
        return acc["sum"][idx] * self.params.scale


@hookimpl
def register_stitch_policies() -> list[type[StitchPolicy]]:
    return [Sum]
