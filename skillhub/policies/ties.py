"""``ties``: TIES-merging (Yadav et al., NeurIPS 2023) as an incremental stitch policy.

TIES trims each task vector to its top-k magnitudes (here: the mask from localization, e.g. ``dataless`` at 20%),
elects a sign per entry (the sign of the summed values; on an exact tie, the sign of the majority of masks), and
takes the mean of the values that agree with the elected sign, scaled by λ.

Incremental form: per entry we keep the sum and count of the positive values and of the negative values. The
elected sign and the disjoint mean are functions of those four numbers, so adding or removing a task touches only
its own indices. Zero values count for neither sign (as in the reference implementation).
"""

from __future__ import annotations

import torch
from skillhub.hookspecs import hookimpl
from skillhub.stitch import ScaleParams, StitchPolicy


class Ties(StitchPolicy):
    """Sign election and disjoint mean (TIES-merging), λ-scaled."""

    name = "ties"
    Params = ScaleParams

    def accumulators(self, numel: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {
            "pos_sum": torch.zeros(numel, dtype=dtype, device=device),
            "neg_sum": torch.zeros(numel, dtype=dtype, device=device),
            "pos_cnt": torch.zeros(numel, dtype=torch.int32, device=device),
            "neg_cnt": torch.zeros(numel, dtype=torch.int32, device=device),
        }

    def update(self, acc: dict[str, torch.Tensor], idx: torch.Tensor, values: torch.Tensor, sign: int) -> None:
        for side, sel in (("pos", values > 0), ("neg", values < 0)):
            i = idx[sel]
            acc[f"{side}_sum"].index_add_(0, i, values[sel], alpha=sign)
            acc[f"{side}_cnt"].index_add_(0, i, torch.full_like(i, sign, dtype=torch.int32))
            # A side with no values left is exactly zero again (no rounding residue).
            empty = i[acc[f"{side}_cnt"][i] == 0]
            acc[f"{side}_sum"][empty] = 0

    def delta(self, acc: dict[str, torch.Tensor], count: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        pos_sum, neg_sum = acc["pos_sum"][idx], acc["neg_sum"][idx]
        pos_cnt, neg_cnt = acc["pos_cnt"][idx], acc["neg_cnt"][idx]
        elected = torch.sign(pos_sum + neg_sum)
        majority = torch.sign(pos_cnt - neg_cnt).to(elected.dtype)
        elected = torch.where(elected == 0, majority, elected)
        pos_mean = pos_sum / pos_cnt.clamp(min=1).to(pos_sum.dtype)
        neg_mean = neg_sum / neg_cnt.clamp(min=1).to(neg_sum.dtype)
        zero = torch.zeros_like(pos_mean)
        merged = torch.where(elected > 0, pos_mean, torch.where(elected < 0, neg_mean, zero))
        return merged * self.params.scale


@hookimpl
def register_stitch_policies() -> list[type[StitchPolicy]]:
    return [Ties]
