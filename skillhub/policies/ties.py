"""``ties``: TIES-merging (Yadav et al., NeurIPS 2023) as an incremental stitch policy.

TIES trims each task vector to its top-k magnitudes (here: the mask from localization, e.g. ``dataless`` at 20%),
elects a sign per entry (the sign of the summed values), and takes the mean of the values that agree with the
elected sign, scaled by λ.

**Where the summed value is exactly 0** (values that cancel exactly: rare with real finetunes, common with
quantized or identical ones) the sign comes from ``zero_sign``:

- ``"count"`` (default): the sign of the majority of the masks there (more positive than negative values → +);
  on an equal count the entry stays θ₀. skillhub's rule from the start, kept as the default so that a registry's
  published versions rebuild to the same weights.
- ``"positive"``: + (mergekit's ``ties``, which elects + wherever the sum is ≥ 0).
- ``"majority"``: the model-wide majority sign, as in the TIES reference code (``resolve_zero_signs``): the sign of
  Σ sign(Σₜ τₜ) over every entry of every included tensor; where that sum is itself 0, the negative side, as the
  reference's disjoint merge then keeps the negative values.

Incremental form: per entry we keep the sum and count of the positive values and of the negative values. The
elected sign and the disjoint mean are functions of those four numbers, so adding or removing a task touches only
its own indices. Zero values count for neither sign (as in the reference implementation). With ``"majority"`` each
tensor also keeps its share of the model-wide balance (entries elected + minus entries elected −) and its number of
exact-zero-sum entries; when an add or remove flips the model-wide sign, only the tensors holding such entries are
recomputed (:meth:`Ties.settle`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from skillhub.hookspecs import hookimpl
from skillhub.stitch import Index, ScaleParams, StitchPolicy, zero_at

if TYPE_CHECKING:
    import torch

PER_ENTRY = ("pos_sum", "neg_sum", "pos_cnt", "neg_cnt")


class TiesParams(ScaleParams):
    """λ and the rule for entries whose summed value is exactly 0."""

    zero_sign: Literal["count", "positive", "majority"] = Field(
        "count", description="sign where Σ τ = 0: 'count' (the masks' majority there, else θ₀), 'positive' "
                             "(mergekit), 'majority' (the model-wide majority sign, the TIES reference code)")

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        # The default is left out of the dump, which goes into every version's manifest: versions published before
        # the option existed keep their identity and rebuild under the same number.
        data = handler(self)
        if self.zero_sign == "count":
            data.pop("zero_sign", None)
        return data


class Ties(StitchPolicy):
    """Sign election and disjoint mean (TIES-merging), λ-scaled."""

    name = "ties"
    Params = TiesParams
    whole_tensor = True
    totals = ("balance", "zero_sums", "zero_sign")

    def accumulators(self, numel: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        import torch

        acc = {
            "pos_sum": torch.zeros(numel, dtype=dtype, device=device),
            "neg_sum": torch.zeros(numel, dtype=dtype, device=device),
            "pos_cnt": torch.zeros(numel, dtype=torch.int32, device=device),
            "neg_cnt": torch.zeros(numel, dtype=torch.int32, device=device),
        }
        if self.params.zero_sign == "majority":
            acc["balance"] = torch.zeros(1, dtype=torch.int64, device=device)  # entries elected + minus −
            acc["zero_sums"] = torch.zeros(1, dtype=torch.int64, device=device)  # covered entries with Σ = 0
            acc["zero_sign"] = torch.zeros(1, dtype=torch.int64, device=device)  # sign they were merged with
        return acc

    def update(self, acc: dict[str, torch.Tensor], idx: Index, values: torch.Tensor, sign: int) -> None:
        import torch

        track = "balance" in acc
        if track:
            balance, zero_sums = _election(acc, idx)
        for side, sel in (("pos", values > 0), ("neg", values < 0)):
            total, cnt = acc[f"{side}_sum"], acc[f"{side}_cnt"]
            if isinstance(idx, slice):  # a dense mask: whole-tensor operations, no gather/scatter
                total[idx].add_(values.where(sel, 0), alpha=sign)
                cnt[idx].add_(sel, alpha=sign)
                if sign < 0:  # a side with no values left is exactly zero again (no rounding residue)
                    total[idx].masked_fill_(cnt[idx] == 0, 0)
                continue
            # Every index gets its value on its own side and 0 on the other (adding 0 changes nothing), which is
            # cheaper than compacting the indices of each side.
            part = values.clamp(min=0) if side == "pos" else values.clamp(max=0)
            total.index_add_(0, idx, part, alpha=sign)
            cnt.index_add_(0, idx, sel.to(torch.int32), alpha=sign)
            if sign < 0:  # only a removal can empty a side
                emptied = idx[cnt[idx] == 0]
                total[emptied] = 0
        if track:
            after_balance, after_zero_sums = _election(acc, idx)
            acc["balance"] += after_balance - balance
            acc["zero_sums"] += after_zero_sums - zero_sums

    def delta(self, acc: dict[str, torch.Tensor], count: torch.Tensor, idx: Index) -> torch.Tensor:
        import torch

        pos_sum, neg_sum = acc["pos_sum"][idx], acc["neg_sum"][idx]
        pos_cnt, neg_cnt = acc["pos_cnt"][idx], acc["neg_cnt"][idx]
        total = pos_sum + neg_sum
        positive = total > 0
        # The disjoint mean of the elected side: the positive values where Σ > 0, else the negative ones (0 where
        # there are none: Σ = 0 with no value either side).
        merged = torch.where(positive, pos_sum, neg_sum).div_(torch.where(positive, pos_cnt, neg_cnt).clamp_(min=1))
        tie = (total == 0) & (pos_cnt > 0)  # values that cancel exactly (a positive sum needs a negative one)
        if bool(tie.any()):
            rule = self.params.zero_sign
            if rule == "count":  # the majority of the masks there; an equal count keeps θ₀
                elected = torch.sign(pos_cnt - neg_cnt).to(total.dtype)
            elif rule == "positive":
                elected = torch.ones_like(total)
            else:  # the model-wide majority (settled after every add and remove)
                elected = acc["zero_sign"].to(total.dtype).expand_as(total)
            pos_mean = pos_sum / pos_cnt.clamp(min=1).to(total.dtype)
            neg_mean = neg_sum / neg_cnt.clamp(min=1).to(total.dtype)
            chosen = torch.where(elected > 0, pos_mean, torch.where(elected < 0, neg_mean, torch.zeros_like(total)))
            merged = torch.where(tie, chosen, merged)
        return merged.mul_(self.params.scale)

    def reset(self, acc: dict[str, torch.Tensor], idx: Index) -> None:
        for name in PER_ENTRY:  # the model-wide counters are not per entry
            zero_at(acc[name], idx)

    def settle(self, accs: Mapping[str, dict[str, torch.Tensor]]) -> list[str]:
        """With ``zero_sign = "majority"``: the model-wide majority sign from every tensor's balance; the tensors
        whose zero-sum entries were merged with another sign are updated and returned, to be recomputed."""
        import torch

        if self.params.zero_sign != "majority" or not accs:
            return []
        tensors = list(accs.values())
        total = int(torch.cat([a["balance"] for a in tensors]).sum())
        majority = 1 if total > 0 else -1  # a model-wide tie: the negative side, as the reference code takes
        zero_sums = torch.cat([a["zero_sums"] for a in tensors]).tolist()
        changed = []
        for (key, acc), n in zip(accs.items(), zero_sums):
            if n and int(acc["zero_sign"]) != majority:
                acc["zero_sign"].fill_(majority)
                changed.append(key)
        return changed


def _election(acc: dict[str, torch.Tensor], idx: Index) -> tuple[int, int]:
    """At ``idx``: entries elected + minus entries elected − by their sum's sign, and covered entries whose sum is
    exactly 0 (their share of the model-wide majority, and the entries that follow it)."""
    import torch

    sign = torch.sign(acc["pos_sum"][idx] + acc["neg_sum"][idx])
    covered = (acc["pos_cnt"][idx] + acc["neg_cnt"][idx]) > 0
    return int(sign.sum()), int(((sign == 0) & covered).sum())


@hookimpl
def register_stitch_policies() -> list[type[StitchPolicy]]:
    return [Ties]
