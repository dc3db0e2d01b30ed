"""How well a served model answers each skill, measured on the skill's own few-shot examples, and the heads it is
served with.

A drop may bring examples (tensors in the checkpoint, ``examples.safetensors`` or ``examples/<class>/*.png`` in a
folder drop). They are split once, deterministically, into a *fit* part and a *check* part (:func:`split`): within
each class, in the order they came, every ``check_every``-th example is a check example. Then, for every model a
skill is served by (θ₀, the skill's own θ₀ + γ⊙τ, a merged version):

- the head is *re-centred* on that model's features (:func:`recentre`: each class's row becomes the normalised mean
  of its fit examples' embeddings; a class without fit examples keeps its row), because merging moves the features
  the original head was fitted to (the benchmark measured about 10 points of normalised accuracy from this);
- the accuracy on the check examples is what the quality gate compares (:class:`~skillhub.gate.Gate`).

Everything here is a pure function of tensors and a runnable model; the reconciler decides when to call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from skillhub.families import Examples
from skillhub.head import Head

if TYPE_CHECKING:
    import torch

    from skillhub.families import Runtime

CHECK_EVERY = 4  # a quarter of each class's examples are held out to check, the rest fit the head
BATCH = 64


@dataclass(frozen=True)
class Split:
    """A skill's examples split into the part heads are fitted on and the part accuracy is checked on."""

    fit: Examples
    check: Examples


def split(examples: Examples, check_every: int = CHECK_EVERY) -> Split:
    """Within each class, in the order given, examples ``check_every - 1``, ``2·check_every - 1``, … are check
    examples and the rest fit examples: a function of the examples alone, so every run splits them alike. A class
    with fewer than ``check_every`` examples has none to check."""
    import torch

    labels = examples.labels.reshape(-1)
    rank = torch.zeros_like(labels)
    for c in labels.unique():
        where = (labels == c).nonzero().reshape(-1)
        rank[where] = torch.arange(len(where))
    check = (rank % check_every) == check_every - 1
    fit_idx, check_idx = (~check).nonzero().reshape(-1), check.nonzero().reshape(-1)
    return Split(Examples(examples.images[fit_idx], labels[fit_idx]),
                 Examples(examples.images[check_idx], labels[check_idx]))


def embed(runtime: Runtime, images: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    """Normalised embeddings [N, D] of example images (uint8 [N, 3, H, W], or float in [0, 1]) on ``runtime``."""
    import torch

    if images.shape[0] == 0:
        return torch.zeros(0, 0)
    return torch.cat([runtime.embed(runtime.normalise(images[i:i + batch])) for i in range(0, images.shape[0], batch)])


def recentre(head: Head, embeddings: torch.Tensor, labels: torch.Tensor) -> Head:
    """``head`` with each class's row replaced by the normalised mean of that class's ``embeddings`` (classes with no
    example keep their row); classes, scale and bias are kept."""
    import torch

    weight = head.weight.detach().clone().float()
    for c in range(weight.shape[0]):
        rows = embeddings[labels == c]
        if rows.shape[0]:
            weight[c] = torch.nn.functional.normalize(rows.float().mean(0), dim=0)
    return Head(weight.to(head.weight.dtype), head.bias, list(head.classes), head.scale)


def accuracy(head: Head, embeddings: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Top-1 accuracy of ``head`` on ``embeddings`` (``None`` when there is nothing to check)."""
    if labels.numel() == 0:
        return None
    return float((head.logits(embeddings).argmax(-1) == labels).float().mean())


@dataclass(frozen=True)
class Score:
    """A skill on one model: the head to serve it with there, and that head's accuracy on the check examples."""

    head: Head
    accuracy: float | None
    #: sha256 of the normalization statistics the model was recalibrated with (the skill route), else ``None``
    statistics: str | None = None


def score(runtime: Runtime, head: Head, examples: Split, *, refit: bool = True) -> Score:
    """The head to serve on ``runtime`` and its check accuracy. With ``refit``, ``head`` re-centred on the model's
    features of the fit examples. The check examples are never fitted on, so their accuracy is an out-of-sample
    estimate, the same kind for every model compared; the drop's own head is not scored as it is, because it was
    usually fitted on the very examples the drop carries."""
    if refit and examples.fit.labels.numel():
        head = recentre(head, embed(runtime, examples.fit.images), examples.fit.labels)
    check = embed(runtime, examples.check.images)
    return Score(head, accuracy(head, check, examples.check.labels) if check.numel() else None)


def mean_accuracy(scores: Sequence[float | None]) -> float | None:
    known = [s for s in scores if s is not None]
    return sum(known) / len(known) if known else None
