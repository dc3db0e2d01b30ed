"""Normalization statistics re-estimated on example images: the ``recalibrate_statistics`` hook's work for models
with BatchNorm layers (:mod:`skillhub.hookspecs`).

A merged (or localized) model's weights see other features than θ₀'s did, but its BatchNorm layers still normalise
with θ₀'s running means and variances. :func:`batchnorm_statistics` re-estimates them the way
``torch.optim.swa_utils.update_bn`` does (each BatchNorm layer in train mode with ``momentum=None``, so its running
statistics become the equal-weight average over the batches seen), on a fixed, seeded interleaving of the images in
equal batches, and hands back the new tensors with the model left exactly as it was (eval mode, its own statistics).
Only BatchNorm layers change mode: dropout and the rest stay in eval.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

BATCH = 64  # images per forward pass: batch statistics of 64 are close to the population's, and fit in memory
SEED = 0  # the interleaving's seed: a function of the images alone, so a restart recalibrates alike


def batchnorm_statistics(model: nn.Module, images: torch.Tensor, forward: Callable[[torch.Tensor], object], *,
                         prefix: str = "", batch: int = BATCH) -> dict[str, torch.Tensor]:
    """New ``running_mean`` / ``running_var`` of every BatchNorm layer of ``model``, estimated on ``images``.

    :param model: the module whose BatchNorm layers are re-estimated; it is left as it was.
    :param images: the inputs [N, ...] (all of them; they are cut into batches here).
    :param forward: runs ``model`` on one batch of ``images`` (normalising them first if it needs to: the raw
        images are batched, so a large set never exists at the model's input size all at once).
    :param prefix: prepended to the layers' state-dict names (the key under which the caller's checkpoint has them).
    :param batch: images per forward pass; the images are split into equal batches of at most this many.
    :return: ``{prefix + layer + ".running_mean": ..., ... ".running_var": ...}``; ``{}`` without BatchNorm layers
        or images.
    """
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    layers = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}
    n = int(images.shape[0])
    if not layers or n < 2:  # one image has no variance to estimate
        return {}
    saved = {name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum,
                    m.training) for name, m in layers.items()}
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED))
    chunks = max(1, -(-n // batch))
    # Equal parts (sizes differ by at most one): no ragged tail of one image, which BatchNorm refuses in train mode.
    parts = [p for p in torch.tensor_split(order, chunks) if p.numel()]
    try:
        for m in layers.values():
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches seen
            m.training = True  # this layer only: a fused BatchNorm+activation's children (dropout) stay in eval
        with torch.no_grad():
            for idx in parts:
                forward(images[idx])
        return {f"{prefix}{name}.{stat}": getattr(m, stat).detach().clone()
                for name, m in layers.items() for stat in ("running_mean", "running_var")}
    finally:
        with torch.no_grad():
            for name, m in layers.items():
                mean, var, count, momentum, training = saved[name]
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
                m.momentum = momentum
                m.training = training
