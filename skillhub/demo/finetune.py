"""Finetuning the demo's tower on one task: how its skills are made.

**Finetuning** (:func:`finetune`) trains the whole tower against its frozen head with SGD + momentum and gradient
clipping; DESIGN §9 found AdamW task vectors unlocalizable and SGD ones localizable. BatchNorm runs in eval mode
during finetuning (``bn="frozen"``, the default): the running statistics stay θ₀'s and the task vector lives in
the weights and the BN affine parameters only, so the included tensors are the tower's *parameters*
(:func:`included_keys`) and no statistics have to be merged. Measured on the validation splits of the seven default
tasks (one seed, during development): with BN in train mode (statistics included in the merge) the finetuned
towers averaged 0.64 accuracy (0.90 frozen), and merges fell to 0.52 (task arithmetic, best λ) and 0.38 (dataless
L&S 1%), against 0.67 and 0.69 with BN frozen. Re-estimating the BN statistics of a merged
tower on the skills' few-shot images afterwards also hurt (L&S 1%: 0.69 → 0.46): θ₀'s ImageNet statistics are
better than those of a thousand small synthetic images.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F


from skillhub.demo.tasks import Task
from skillhub.demo.tower import image_tower, logits


def _set_bn(model: nn.Module, bn: Literal["frozen", "train"]) -> None:
    model.train()
    if bn == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def finetune(model_or_state: nn.Module | Mapping[str, torch.Tensor], task: Task, head: torch.Tensor, *,
             epochs: int = 5, lr: float = 0.02, momentum: float = 0.9, clip: float = 1.0, batch_size: int = 32,
             weight_decay: float = 0.0, bn: Literal["frozen", "train"] = "frozen", seed: int = 0,
             log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Finetune the whole tower on ``task.train`` against the frozen ``head``; return the finetuned state dict.

    SGD with momentum, gradient-norm clipping and a cosine learning-rate decay (DESIGN §9: SGD task vectors are
    localizable, AdamW ones are not). ``bn="frozen"`` keeps BatchNorm in eval mode (running statistics stay θ₀'s);
    ``"train"`` updates them from the batches. The input model is not modified.
    """
    model = copy.deepcopy(model_or_state) if isinstance(model_or_state, nn.Module) else image_tower(model_or_state)
    for p in model.parameters():
        p.requires_grad_(True)
    x, y = task.train
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    _set_bn(model, bn)
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            b = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(logits(model(x[b]), head), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            running += loss.item()
        if log is not None:
            log(f"{task.name}: epoch {epoch + 1}/{epochs} loss {running / steps_per_epoch:.3f}")
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


