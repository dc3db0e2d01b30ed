"""Data-driven Localize-and-Stitch: a mask learned on a few labelled examples of the task.

He et al. (arXiv 2408.13656, data-driven localization) learn real-valued logits S over the included parameters
so that the model θ₀ + σ(S)⊙τ keeps the skill while σ(S) stays sparse; the binary mask is γ = [S > 0].

**The objective, exactly.** Let N be the number of included parameters, θ₀ the pretrained included tensors,
τ = θₜ − θ₀ the task vector and ℓ(θ; t) the family's few-shot task loss of batch t (``ctx.examples.loss(θ, t)``,
e.g. mean cross-entropy; tensors that are not included stay θ₀). Step t = 0, 1, …, ``steps``−1 takes one
optimiser step on the logits S (θ₀ and τ are constants) of

    J_t(S) = ℓ(θ₀ + σ(S)⊙τ; t) + λ · (1/N) · Σᵢ σ(Sᵢ)

i.e. the true L1 norm of the relaxed mask σ(S) ∈ (0, 1) — every term is positive, so ‖σ(S)‖₁ = Σ σ(Sᵢ) — divided
by N, times λ = ``l1``. Why divide by N: λ is then the cost of a completely dense mask in units of the task loss
(nats for cross-entropy), whatever the model size. Since ∂J/∂Sᵢ = σ′(Sᵢ)·(λ/N − gᵢ) with gᵢ = −τᵢ·∂ℓ/∂θᵢ (the
first-order gain of switching τᵢ on), an entry grows while its gain exceeds λ/N and shrinks otherwise; λ = 1 keeps
the entries whose gain is above that of an average entry of a dense τ worth one nat. The loss is an average over
examples and λ a budget for the whole model, so one default is meant to serve a 1k-parameter test model and an
86M-parameter ViT-B alike (measured here only on small models; ``target_sparsity`` caps the mask if it does not).
Adam, the default optimiser, is invariant to the overall scale of the gradient, which on a large model is tiny;
its ε is set far below that scale (:data:`ADAM_EPS`) so that this stays true.

**Initialisation.** S = +b on the dataless mask (the ⌊``init_sparsity``·N⌋ entries with the largest |τ| under one
global threshold, exactly as the ``dataless`` strategy picks them) and −b everywhere else, b = ``init_logit`` = 5:
σ(±5) ≈ 0.993 / 0.007, so training starts close to θ₀ + the dataless graft. With Adam a logit moves by about ``lr``
per step, so ``lr · steps ≥ 2b`` (the defaults: 0.1 · 100 = 10) lets any entry cross from off to on or back.

**The mask.** γ = [S > 0] after the last step, leaving out entries where τ = 0 (they carry nothing). If
``target_sparsity`` is set and more than ⌊target_sparsity·N⌋ logits are positive, only that many of the largest
logits are kept (ties at the cut in canonical order: sorted tensor keys, then flat index). The stored values are τ
at γ, exactly as the task vector gives them.

**Differences from the reference code** (github.com/yifei-he/Localize-and-Stitch, ``localize_utils.py``). It
averages the gradient over the whole few-shot set and takes one plain gradient step per epoch (10 epochs) with a
step size of 1e7, needed because σ′(−5) ≈ 0.007; that is not reproduced. Its "L1" update adds λ·σ′(S)·sign(S) to
the logits, which pushes them *away* from zero (on-entries further on, off-entries further off) instead of towards
a sparse mask. Here: the true L1 penalty above, Adam on the logits with ``lr`` in logit units
(``optimizer="sgd"`` gives plain gradient descent, whose ``lr`` is in raw gradient units and must be very large, as
in the reference), ``steps`` and ``lr`` as parameters, and one batch per step, chosen by the family from ``step``
(the full set when it is small), an exactly-k initial mask (the reference keeps |τ| strictly above the k-th value)
and an optional cap on the final mask.

**Memory and device.** Everything runs on ``ctx.device`` in float32. Per included parameter: S, θ₀, τ, the gradient
of S, Adam's two moments, and σ(S) and θ(S) during a step — about 8 × 4 bytes, ≈ 2.8 GB for an 86M-parameter tower,
plus the activations of one batch of the family's forward pass. That is O(model), unlike the streaming dataless
strategy. The tensors handed to the objective are float32; a family whose model runs in another dtype casts them.

**Determinism.** Anything random (a family's dropout, or its batch sampling from torch's global generator) is seeded
with ``seed`` (default: ``ctx.seed``) inside :func:`torch.random.fork_rng`, so the caller's random state is
untouched and a run is reproducible on the CPU (on CUDA, as far as the family's kernels are deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from skillhub.delta import SparseDelta
from skillhub.errors import LocalizeError
from skillhub.hookspecs import hookimpl
from skillhub.localize import LocalizeContext, Localizer
from skillhub.log import get_logger
from skillhub.strategies.topk import _select_exact, global_topk
from skillhub.taskvector import TaskVector

if TYPE_CHECKING:
    import torch

log = get_logger("skillhub.strategies.trained")

#: Adam's ε. The gradient of one logit is σ′(Sᵢ)·(λ/N − gᵢ), which on a large model is far below torch's default
#: 1e-8; with that ε Adam's steps would shrink with the model size and the logits would barely move.
ADAM_EPS = 1e-20

if TYPE_CHECKING:
    Entries = dict[str, tuple[torch.Tensor, torch.Tensor]]


class Trained(Localizer):
    """Logits S trained on few-shot examples: task loss of θ₀ + σ(S)⊙τ plus λ·mean σ(S); mask = S > 0."""

    name = "trained"
    needs_examples = True

    class Params(BaseModel):
        """The knobs of the data-driven strategy (module docstring: what each one does to the objective)."""

        model_config = ConfigDict(extra="forbid", frozen=True)
        steps: int = Field(default=100, ge=1, description="optimisation steps, one batch of the objective each")
        lr: float = Field(default=0.1, gt=0,
                          description="step size: about the change of a logit per step with Adam; raw with SGD")
        optimizer: Literal["adam", "sgd"] = Field(default="adam", description="optimiser of the logits")
        l1: float = Field(default=1.0, ge=0,
                          description="λ of the L1 penalty λ·mean σ(S), the task-loss cost of a dense mask: to first "
                                      "order an entry stays only while it lowers the loss by more than λ/N")
        init_sparsity: float = Field(default=0.01, gt=0, le=1,
                                     description="fraction of entries (the global top |τ|, as 'dataless' picks them) "
                                                 "whose logits start at +init_logit")
        init_logit: float = Field(default=5.0, gt=0, description="b: logits start at +b on the initial mask, −b off it")
        target_sparsity: float | None = Field(default=None, gt=0, le=1,
                                              description="if set, keep at most this fraction of the entries (the "
                                                          "largest positive logits); else every S > 0")
        seed: int | None = Field(default=None, ge=0,
                                 description="seed for anything random; None uses the context's seed")

    def localize(self, task: TaskVector, params: Params, ctx: LocalizeContext) -> SparseDelta:
        import torch

        objective = ctx.examples
        if objective is None or int(getattr(objective, "size", 0)) <= 0:
            raise LocalizeError(f"strategy {self.name!r}: no examples to learn the mask from",
                                hint="add labelled examples to the skill's drop, or use the dataless strategy")
        if not task.keys:
            return task.sparse({})
        seed = ctx.seed if params.seed is None else params.seed
        device = torch.device(ctx.device)
        with _forked_rng(device, seed):
            state = _State.build(task, params, device, seed)
            loss = _optimise(state, params, objective, ctx)
            entries = _mask(task, params, state)
            _log(task, params, objective, state, entries, loss)
        return task.sparse(entries)


@dataclass
class _State:
    """Device tensors of one run, per included tensor: θ₀, τ (float32) and the logits S being learned."""

    base: dict[str, torch.Tensor]
    tau: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]

    @classmethod
    def build(cls, task: TaskVector, p: Trained.Params, device: torch.device, seed: int) -> _State:
        import torch

        init = global_topk(task, math.floor(p.init_sparsity * task.numel), seed=seed)
        base: dict[str, torch.Tensor] = {}
        tau: dict[str, torch.Tensor] = {}
        logits: dict[str, torch.Tensor] = {}
        for key in task.keys:  # one tensor at a time: θ₀ and τ are moved to the device once
            base[key] = task.base.tensor(key).to(device=device, dtype=torch.float32)
            tau[key] = task.tensor(key).to(device=device, dtype=torch.float32)
            s = torch.full(task.shapes[key], -p.init_logit, dtype=torch.float32, device=device)
            if key in init:
                s.view(-1)[init[key][0].to(device)] = p.init_logit
            logits[key] = s.requires_grad_(True)
        return cls(base, tau, logits)


@contextmanager
def _forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed torch's global generators for the run and restore the caller's states afterwards."""
    import torch

    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])
    else:  # every device of that type: torch.manual_seed seeds them all, so all are restored
        count = torch.get_device_module(device.type).device_count()
        fork = torch.random.fork_rng(devices=range(count), device_type=device.type)
    with fork:
        torch.manual_seed(seed)
        yield


def _optimise(state: _State, p: Trained.Params, objective: Any, ctx: LocalizeContext) -> float:
    """Minimise ℓ(θ₀ + σ(S)⊙τ; step) + λ·mean σ(S) over S for ``p.steps`` steps; return the last objective value."""
    import torch

    params = list(state.logits.values())
    opt: torch.optim.Optimizer = (torch.optim.Adam(params, lr=p.lr, eps=ADAM_EPS) if p.optimizer == "adam"
                                  else torch.optim.SGD(params, lr=p.lr))
    n = max(sum(s.numel() for s in params), 1)
    value = math.nan
    for step in range(p.steps):
        opt.zero_grad(set_to_none=True)
        theta: dict[str, torch.Tensor] = {}
        gates = torch.zeros((), device=params[0].device)
        for key, s in state.logits.items():
            gate = torch.sigmoid(s)
            theta[key] = state.base[key] + gate * state.tau[key]
            gates = gates + gate.sum()
        loss = objective.loss(theta, step) + p.l1 * gates / n
        value = float(loss.detach())
        if not math.isfinite(value):
            raise LocalizeError(
                f"strategy 'trained': the loss became non-finite ({value}) at step {step + 1} of {p.steps}",
                hint="lower lr, or check the skill's examples and its finetuned checkpoint")
        loss.backward()
        opt.step()
        ctx.report(step + 1, p.steps)
    for key, s in state.logits.items():
        s.requires_grad_(False)
        if not bool(torch.isfinite(s).all()):
            raise LocalizeError(f"strategy 'trained': the mask logits of {key!r} became non-finite", key=key,
                                hint="lower lr, or check the skill's examples and its finetuned checkpoint")
    return value


def _mask(task: TaskVector, p: Trained.Params, state: _State) -> Entries:
    """γ = [S > 0] (and τ ≠ 0), capped at ⌊target_sparsity·N⌋ entries by the largest logits; τ values at γ."""
    import torch

    cands: dict[str, tuple[torch.Tensor, ...]] = {}
    for key in task.keys:
        s = state.logits[key].reshape(-1)
        tau = state.tau[key].reshape(-1)
        idx = torch.nonzero((s > 0) & (tau != 0)).reshape(-1)  # sorted, int64
        if task.dtype == torch.float32:
            vals = tau[idx].cpu()
        else:  # the stored values keep the task vector's own precision
            vals = task.tensor(key).reshape(-1)[idx.cpu()]
        cands[key] = (idx.cpu(), vals, s[idx].cpu())
    total = sum(int(c[0].numel()) for c in cands.values())
    if p.target_sparsity is not None:
        k = math.floor(p.target_sparsity * task.numel)
        if total > k:
            # the k largest logits, ties at the cut in canonical order (the dataless selection, on S instead of |τ|)
            return _select_exact(task, cands, k) if k > 0 else {}
    return {key: (c[0], c[1]) for key, c in cands.items() if c[0].numel()}


def _log(task: TaskVector, p: Trained.Params, objective: Any, state: _State, entries: Entries, loss: float) -> None:
    """One line: mask size and density, and few-shot accuracy of θ₀ + γ⊙τ against the full finetune θ₀ + τ."""
    import torch

    with torch.no_grad():  # one model-sized θ at a time
        acc_full = float(objective.accuracy({k: state.base[k] + state.tau[k] for k in task.keys}))
        grafted: dict[str, torch.Tensor] = {}
        for key in task.keys:
            theta = state.base[key]
            if key in entries:
                theta = theta.clone()
                idx = entries[key][0].to(theta.device)
                theta.view(-1)[idx] += state.tau[key].reshape(-1)[idx]
            grafted[key] = theta
        acc_mask = float(objective.accuracy(grafted))
    nnz = sum(int(e[0].numel()) for e in entries.values())
    (log.warning if nnz == 0 else log.info)(
        "trained mask", strategy="trained", nnz=nnz, density=nnz / max(task.numel, 1), steps=p.steps,
        final_objective=loss, accuracy_mask=acc_mask, accuracy_finetuned=acc_full)


@hookimpl
def register_localizers() -> list[type[Localizer]]:
    return [Trained]
