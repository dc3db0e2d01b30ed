"""``sparsity = "auto"``: a mask as large as the skill needs.

One fixed sparsity does not fit every model and skill (on a 3.4M-parameter CNN one skill's localized model kept ~80%
of its finetune's accuracy at 1% and ~98% at 5%). With examples, the service localizes at each rung of a ladder of
sparsities, smallest first, and keeps the first mask whose localized model θ₀ + γ⊙τ classifies the *fit* examples
at least ``keep`` × as well as the finetune does (the finetune's included tensors, θ₀ + τ, with the same head). The
check examples are left alone: the quality gate's estimate stays unbiased. When no rung reaches the target, the
largest is kept and the record says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from skillhub.log import get_logger

if TYPE_CHECKING:
    from skillhub.delta import SparseDelta
    from skillhub.families import Prepared
    from skillhub.routing import SkillPatcher

log = get_logger("skillhub.autosparsity")
R = TypeVar("R")


@dataclass(frozen=True)
class Choice:
    """The mask kept, its sparsity, and what was measured on the way."""

    delta: SparseDelta
    sparsity: float
    finetune: float  # the finetune's accuracy on the fit examples
    accuracy: dict[float, float]  # sparsity -> the localized model's accuracy, for every rung tried
    reached: bool  # whether the kept rung reached keep × finetune

    def record(self, keep: float) -> dict[str, Any]:
        """What the registry keeps about the choice (JSON)."""
        return {"sparsity": self.sparsity, "keep": keep, "finetune_accuracy": self.finetune, "reached": self.reached,
                "accuracy": {repr(s): a for s, a in self.accuracy.items()}}


def choose(localize: Callable[[float], SparseDelta], accuracy: Callable[[SparseDelta], float], *,
           ladder: Sequence[float], keep: float) -> Choice:
    """Localize at each of ``ladder`` (smallest first) until the localized model's ``accuracy`` reaches ``keep`` ×
    the finetune's (the dense mask, sparsity 1)."""
    finetune = accuracy(localize(1.0))
    tried: dict[float, float] = {}
    delta = None
    for s in sorted(set(ladder)):
        delta = localize(s)
        tried[s] = accuracy(delta)
        if tried[s] >= keep * finetune:
            return Choice(delta, s, finetune, tried, True)
    assert delta is not None  # the ladder is never empty (params validation)
    return Choice(delta, max(tried), finetune, tried, False)


def wants_auto(params: Mapping[str, Any] | None) -> bool:
    """Whether ``params`` ask for the ladder (``sparsity = "auto"``)."""
    return (params or {}).get("sparsity") == "auto"


def localize_auto(run: Callable[[Mapping[str, Any]], R], delta_of: Callable[[R], SparseDelta],
                  params: Mapping[str, Any], prepared: Prepared, scorer: Callable[[], SkillPatcher | None], *,
                  skill: str = "", tag: str = "auto") -> tuple[R, dict[str, Any]]:
    """``sparsity = "auto"`` as the service, ``skillhub localize`` and ``skillhub merge`` all run it: localize with
    ``run`` (called with numeric sparsities only, so every mask is stamped with the sparsity it was made at) at each
    rung of ``auto_ladder`` and keep the first whose localized model, patched into ``scorer()`` (asked for only when
    ``prepared`` has a head and examples), classifies the fit examples at least ``auto_keep`` × as well as the
    finetune. Without a head, examples or a runnable model, the smallest rung, and the record says why. Returns
    ``run``'s result for the kept rung and the record for the registry."""
    from skillhub.quality import accuracy as accuracy_of
    from skillhub.quality import embed, split
    from skillhub.strategies.dataless import Dataless

    p = Dataless.Params.model_validate(dict(params))
    ladder, keep = sorted(p.auto_ladder), p.auto_keep
    head, examples = prepared.head, prepared.examples
    patcher, why = None, prepared.examples_error or "no examples or no head in the drop"
    if head is not None and examples is not None:
        patcher, why = scorer(), "the model family runs no model to score masks on"
    if head is None or examples is None or patcher is None:
        log.info("auto_sparsity_without_examples", skill=skill, sparsity=ladder[0], reason=why)
        return run({**params, "sparsity": ladder[0]}), {"sparsity": ladder[0], "reason": why}
    fit = split(examples).fit
    results: dict[float, R] = {}

    def localize(s: float) -> SparseDelta:
        results[s] = run({**params, "sparsity": s})
        return delta_of(results[s])

    def accuracy(delta: SparseDelta) -> float:
        rt = patcher.use(f"{tag}:{delta.nnz}", delta)
        return accuracy_of(head, embed(rt, fit.images), fit.labels) or 0.0

    try:
        choice = choose(localize, accuracy, ladder=ladder, keep=keep)
    finally:
        patcher.restore()
    log.info("auto_sparsity", skill=skill, sparsity=choice.sparsity, finetune=round(choice.finetune, 4),
             accuracy={repr(s): round(a, 4) for s, a in choice.accuracy.items()}, reached=choice.reached)
    return results[choice.sparsity], choice.record(keep)
