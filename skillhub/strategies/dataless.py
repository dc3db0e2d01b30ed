"""Dataless Localize-and-Stitch: γ = the k largest |τ| over all included tensors together.

He et al. (arXiv 2408.13656, §3.1, "dataless") take one global threshold for the whole model, not one per tensor.

**Exactly k.** k = ⌊sparsity × included parameters⌋. The reference code keeps entries strictly above the k-th
value, which drops every tie and yields k − 1 (or far fewer with quantized weights). Here the mask has exactly k
entries, chosen by this deterministic rule: larger |τ| first; among entries whose |τ| equals the k-th largest value,
the earliest in *canonical order* win (included tensors in sorted key order, then flat row-major index). The only
exception: entries with τ = 0 carry nothing and are never selected, so a task vector with fewer than k non-zeros
gets all its non-zeros.

**Streaming, in bounded memory** (:mod:`skillhub.strategies.topk`). The model is never concatenated, and no
scratch buffer is sized to the largest tensor: tensors over :data:`~skillhub.strategies.topk.PIECE` entries are read
in pieces of that size. A random sample of |τ| (about 2¹⁷ entries in lines of 16 neighbours, one line per stratum
of the whole model, so every tensor in proportion to its size) gives a threshold t that, with a wide statistical
margin (6σ of the count above it, σ estimated from the lines), lies just below the k-th largest value. One pass
over the tensors keeps the candidates |τ| ≥ t (about 1.14 k of them on the benchmark's model); an exact selection
among the candidates finishes the job. If the sample was unlucky and fewer than k candidates pass, the threshold
is lowered and the pass repeated, so the result is always exact; only the time depends on the sample.

**Sparsity 1** keeps every non-zero entry, so there is nothing to select: one pass computes τ per tensor and keeps
it whole, in the dense form of :class:`~skillhub.delta.SparseDelta` (zeros mark the entries left out) wherever that is
no larger than indices plus values, with no index array, no |τ| copy and no float64 anywhere.

**scope = "tensor"** takes k_i = ⌊sparsity × numel_i⌋ entries from every tensor separately (the same tie rule within
the tensor: earliest flat index first; τ = 0 never): TIES-merging as mergekit implements it (which keeps at least one
entry of a non-empty tensor). The default, ``"global"``, is the papers' rule (TIES and Localize-and-Stitch alike).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from skillhub.delta import SparseDelta, index_dtype
from skillhub.errors import LocalizeError
from skillhub.hookspecs import hookimpl
from skillhub.localize import LocalizeContext, Localizer
from skillhub.strategies.topk import global_topk, per_tensor_topk
from skillhub.taskvector import TaskVector

if TYPE_CHECKING:
    import torch

    Entries = dict[str, tuple[torch.Tensor | None, torch.Tensor]]


class Dataless(Localizer):
    """The k largest |τ| over all included tensors (one global threshold), exactly k of them."""

    name = "dataless"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        sparsity: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = Field(
            0.01, description="fraction of included parameters kept in the mask, or 'auto': the service picks the "
                              "smallest of auto_ladder whose localized model keeps auto_keep of the finetune's "
                              "accuracy on the drop's examples (skillhub.autosparsity)")
        scope: Literal["global", "tensor"] = Field(
            "global", description="'global': one threshold over all included tensors (the papers); 'tensor': the "
                                  "top sparsity of every tensor separately (mergekit's TIES trimming)")
        auto_keep: float = Field(0.99, gt=0, le=1, description="with sparsity 'auto': the share of the finetune's "
                                                               "accuracy the localized model must keep")
        auto_ladder: tuple[Annotated[float, Field(gt=0, le=1)], ...] = Field(
            (0.01, 0.02, 0.05, 0.1, 0.2), min_length=1, description="with sparsity 'auto': the sparsities tried")

        @model_serializer(mode="wrap")
        def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
            # Defaults of options added later are left out of the dump, which is stamped into every mask file:
            # masks made before an option existed keep their params, bytes and content address (and match their
            # config again). The auto_* options only mean something with sparsity "auto".
            data = handler(self)
            if self.scope == "global":
                data.pop("scope", None)
            if self.sparsity != "auto":
                data.pop("auto_keep", None)
                data.pop("auto_ladder", None)
            return data

    def localize(self, task: TaskVector, params: Params, ctx: LocalizeContext) -> SparseDelta:
        if params.sparsity == "auto":
            raise LocalizeError("sparsity 'auto' is chosen from a skill's examples by the ladder "
                                "(skillhub.autosparsity.localize_auto: the service, `skillhub localize`, `skillhub "
                                "merge`), not by the strategy alone", key="localize.params.sparsity",
                                hint="give a number here, e.g. 0.01, or localize through localize_auto")
        if params.sparsity >= 1:
            return task.sparse(every_nonzero(task, progress=ctx.report))
        if params.scope == "tensor":
            return task.sparse(per_tensor_topk(task, params.sparsity, progress=ctx.report))
        k = math.floor(params.sparsity * task.numel)
        return task.sparse(global_topk(task, k, seed=ctx.seed, progress=ctx.report))


def every_nonzero(task: TaskVector, *, progress: Callable[[int, int], None] | None = None) -> Entries:
    """Per tensor, every entry with τ ≠ 0: in the dense form (``(None, τ)``, zeros left out by being zero) when that
    is no larger than indices plus values, else as sorted indices and values. τ is computed once, in the task
    vector's dtype, and kept as it is (no |τ|, no index array for a dense tensor)."""
    import torch

    out: Entries = {}
    for done, key in enumerate(task.keys, start=1):
        flat = task.tensor(key).reshape(-1)
        nnz, numel = int(torch.count_nonzero(flat)), flat.numel()
        vsize = task.dtypes[key].itemsize
        if nnz and numel * vsize <= nnz * (index_dtype(numel).itemsize + vsize):
            out[key] = (None, flat)
        elif nnz:
            idx = flat.nonzero().reshape(-1)
            out[key] = (idx, flat[idx])
        if progress is not None:
            progress(done, len(task.keys))
    return out


@hookimpl
def register_localizers() -> list[type[Localizer]]:
    return [Dataless]
