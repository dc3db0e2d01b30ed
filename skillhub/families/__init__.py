"""Model families: what a model *is* (DESIGN §3).

A family decides which tensors of a checkpoint are *included* in localization and stitching, how a finetuned
checkpoint's keys map onto the base's, and, for families that serve inference, how to build a runnable model from
merged weights and what a skill's head is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, ClassVar

from skillhub.checkpoint import Checkpoint, check_tensor_dtypes, validate_against
from skillhub.errors import ConfigError, LocalizeError
from skillhub.head import Head
from skillhub.header import float_dtypes
from skillhub.localize import TaskObjective

if TYPE_CHECKING:
    import torch

__all__ = ["Examples", "Head", "ModelFamily", "Prepared", "Runtime"]


@dataclass(frozen=True)
class Examples:
    """A skill's few-shot examples as they came with the drop: images [N, 3, H, W] (uint8, or float in [0, 1]) and
    integer labels [N] (indices into the head's classes)."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class Prepared:
    """What :meth:`ModelFamily.prepare` derives from one finetuned checkpoint."""

    #: the checkpoint with its keys mapped onto the base's, validated against it
    checkpoint: Checkpoint
    #: the skill's classification head (families with heads), else ``None``
    head: Head | None = None
    #: the few-shot examples, when asked for
    examples: Examples | None = None
    #: why there are no examples although they were asked for (the caller falls back to a dataless strategy)
    examples_error: str | None = None


class Runtime:
    """A runnable merged model (families that serve inference)."""

    image_size: int = 0

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Example images (uint8 [N, 3, H, W], or float in [0, 1]) → the normalised batch :meth:`embed` takes."""
        raise NotImplementedError

    def to(self, device: torch.device) -> None:
        """Move the model to ``device`` (:mod:`skillhub.placement`); :meth:`embed` then takes CPU batches and gives
        CPU embeddings. The default keeps a runtime that does not implement it on the CPU."""

    def pack(self) -> None:
        """Optionally make the model's floating tensors views of one buffer, so that the skill route patches a
        mask in with one scatter rather than a few per tensor. The default leaves the model as it is."""

    def tensors(self) -> Mapping[str, torch.Tensor]:
        """The model's own tensors by checkpoint key, live: writing into them changes the model (the skill route
        patches a skill's γ⊙τ into a runtime built on θ₀ this way)."""
        raise NotImplementedError


class ModelFamily:
    """Base class of model families.

    :param include: fnmatch patterns of keys to include (empty: the family's default set).
    :param exclude: fnmatch patterns of keys to leave out of merging (they keep the base's values).
    :param model: the family's model identifier (``[base] model``), if it uses one.
    """

    name: ClassVar[str] = ""
    #: whether :meth:`examples` reads few-shot examples from a drop (the service then keeps them to score the skill)
    reads_examples: ClassVar[bool] = False

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = (), *, model: str | None = None) -> None:
        self.include = list(include)
        self.exclude = list(exclude)
        self.model = model

    @classmethod
    def from_config(cls, base: Any) -> ModelFamily:
        """Build from a ``[base]`` config section."""
        return cls(base.include, base.exclude, model=base.model)

    def default_included(self, base: Checkpoint, key: str) -> bool:
        """Whether ``key`` is merged when no ``include`` patterns are configured."""
        return base[key].dtype in float_dtypes()

    def included_keys(self, base: Checkpoint) -> list[str]:
        """The included keys of ``base``, sorted (the canonical order of tie rules)."""
        floats = float_dtypes()
        keys = [k for k in base if base[k].dtype in floats and (
            any(fnmatchcase(k, p) for p in self.include) if self.include else self.default_included(base, k))]
        keys = [k for k in keys if not any(fnmatchcase(k, p) for p in self.exclude)]
        if not keys:
            raise ConfigError(f"no tensor of the base is included by family {self.name!r}", path=base.path,
                              key="base.include", hint="check [base] include/exclude patterns")
        return sorted(keys)

    def prepare(self, base: Checkpoint, ft: Checkpoint, sidecar: Mapping[str, Any] | None = None, *,
                examples: bool = False) -> Prepared:
        """Everything the family derives from a finetuned checkpoint, in one call on a checkpoint opened once: its
        keys mapped onto the base's, checked against the base (architecture, float dtypes of the included tensors),
        the skill's head, and (``examples=True``, for data-driven strategies) its few-shot examples.

        Raises :class:`~skillhub.errors.CheckpointError` when the checkpoint does not fit the base; an unusable
        example set raises :class:`~skillhub.errors.LocalizeError` (the caller may fall back to a dataless strategy).
        """
        adapted = self.adapt(base, ft)
        self.validate(base, adapted)
        check_tensor_dtypes(adapted, self.included_keys(base))
        head = self.head(base, ft, sidecar)
        return Prepared(adapted, head, self.examples(ft, head.classes if head else None) if examples else None)

    def adapt(self, base: Checkpoint, ft: Checkpoint) -> Checkpoint:
        """Map a finetuned checkpoint's keys onto the base's (default: as they are)."""
        return ft

    def validate(self, base: Checkpoint, ft: Checkpoint) -> None:
        """Raise :class:`~skillhub.errors.CheckpointError` unless ``ft`` (adapted) fits the base."""
        validate_against(base, ft)

    def head(self, base: Checkpoint, ft: Checkpoint, sidecar: Mapping[str, Any] | None) -> Head | None:
        """The skill's head from its drop, if the family has heads."""
        return None

    def examples(self, ft: Checkpoint, classes: Sequence[str] | None = None) -> Examples:
        """The few-shot examples that came with the drop (``classes``: the head's class names). Families without a task objective raise
        :class:`~skillhub.errors.LocalizeError`."""
        raise LocalizeError(f"family {self.name!r} has no task objective for data-driven localization",
                            hint="use the dataless strategy for this model family")

    def objective(self, base: Checkpoint, head: Head | None, examples: Examples) -> TaskObjective:
        """The few-shot :class:`~skillhub.localize.TaskObjective` for data-driven strategies: the task loss of the
        base with its included tensors replaced, on ``examples``. The one objective of the family: the service,
        the CLI and the benchmarks all localize through it."""
        raise LocalizeError(f"family {self.name!r} has no task objective for data-driven localization",
                            hint="use the dataless strategy for this model family")

    def runtime(self, tensors: Mapping[str, torch.Tensor]) -> Runtime | None:
        """A runnable model on merged weights, or ``None`` when the family serves no inference."""
        return None
