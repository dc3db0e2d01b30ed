"""DARE as a skillhub localization strategy: Drop And REscale.

Yu, Yu, Yu, Huang and Li, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", ICML 2024 (arXiv 2311.03099).

DARE drops each entry of a task vector τ = θₜ − θ₀ independently with probability p and rescales the entries it
keeps by 1/(1 − p), so that the expected value of every entry, and hence of the layer outputs, is unchanged. The
paper finds that a finetune's τ survives p = 0.9 (and often 0.99) with little loss, which makes the surviving
entries of several finetunes far less likely to collide when they are added up.

In skillhub's two steps (DESIGN §1) DARE is:

- **localize** with this strategy: γ = a random Bernoulli(1 − p) mask over the non-zero entries of τ, and the
  stored values are γ⊙τ/(1 − p) (not raw τ: the rescale is part of the delta);
- **stitch** with the ``sum`` policy: θ = θ₀ + λ Σₜ γₜ⊙τₜ/(1 − p), i.e. DARE followed by task arithmetic, which is
  how the paper uses it. Set ``[localize] strategy = "dare"`` and ``[stitch] policy = "sum"`` together. (With the
  default ``average`` policy the rescaled values of overlapping skills are averaged instead of added.)

This file is an ordinary third-party plugin: it lives in the ``plugins/`` folder, is loaded by path exactly as a
user's own plugin would be, and uses only skillhub's public API. Copy it as a starting point for your own strategy.
"""

from __future__ import annotations

import zlib

import torch
from pydantic import BaseModel, ConfigDict, Field

from skillhub import LocalizeContext, LocalizeError, Localizer, SparseDelta, TaskVector, hookimpl

# torch.Generator.manual_seed takes at most 64 bits; keep the per-tensor seed a non-negative 63-bit integer.
_SEED_MASK = (1 << 63) - 1


class Dare(Localizer):
    """DARE (Yu et al. 2024): drop τ entries with probability p, rescale the rest by 1/(1 − p); use with ``sum``.

    Only non-zero entries of τ are kept. The mask depends on ``ctx.seed`` and each tensor's key, nothing else.
    """

    name = "dare"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        drop_rate: float = Field(0.9, ge=0, lt=1, description="p, the probability of dropping each entry of τ")
        rescale: bool = Field(True, description="multiply the kept entries by 1/(1 − p), as in the paper")

    def localize(self, task: TaskVector, params: Params, ctx: LocalizeContext) -> SparseDelta:
        p = params.drop_rate
        entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # One tensor at a time (never the whole model at once). `stream()` reuses one workspace for τ, which is
        # fine here because everything kept from a tensor is gathered out of it (a copy) before the next step.
        for done, (key, tau) in enumerate(task.stream(), start=1):
            flat = tau.reshape(-1)
            # The random draw of a tensor depends only on (seed, key), not on which other tensors are included or
            # in what order they are visited. It is drawn on the CPU, so the mask does not depend on the device.
            gen = torch.Generator().manual_seed((ctx.seed + zlib.crc32(key.encode("utf-8"))) & _SEED_MASK)
            # A uniform draw in [0, 1) is ≥ p with probability 1 − p (always, for p = 0).
            keep = torch.rand(flat.numel(), generator=gen) >= p
            # An entry with τ = 0 carries nothing; keeping it would only enlarge the mask file.
            keep &= flat != 0
            idx = keep.nonzero().reshape(-1)  # ascending, as a SparseDelta requires
            if idx.numel():
                values = flat[idx]  # τ at the kept entries, in the task vector's (float32 or wider) dtype
                if params.rescale:
                    values = values / (1.0 - p)
                # Values are stored in the base tensor's dtype; a large τ divided by a small 1 − p could overflow
                # a half-precision tensor. Say so here rather than let the core reject an anonymous Inf.
                if not bool(torch.isfinite(values.to(task.dtypes[key])).all()):
                    raise LocalizeError(
                        f"rescaling by 1/(1 - {p}) overflows {task.dtypes[key]} in {key!r}", key=key,
                        hint="lower drop_rate, or set rescale = false and scale with the sum policy's `scale`")
                entries[key] = (idx, values)
            ctx.report(done, len(task.keys))
        # task.sparse casts indices to the mask-file index dtype and values to each base tensor's dtype.
        return task.sparse(entries)


@hookimpl
def register_localizers() -> list[type[Localizer]]:
    return [Dare]
