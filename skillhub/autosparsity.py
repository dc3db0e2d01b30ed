"""``sparsity = "auto"``: a mask as large as the skill needs.

One fixed sparsity does not fit every model and skill (on a 3.4M-parameter CNN one skill's localized model kept ~80%
of its finetune's accuracy at 1% and ~98% at 5%). With examples, the service localizes at each rung of a ladder of
sparsities, smallest first, and keeps the first mask whose localized model θ₀ + γ⊙τ classifies the *fit* examples
at least ``keep`` × as well as the finetune does (the finetune's included tensors, θ₀ + τ, with the same head). The
check examples are left alone: the quality gate's estimate stays unbiased. When no rung reaches the target, the
largest is kept and the record says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from skillhub.delta import SparseDelta


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
