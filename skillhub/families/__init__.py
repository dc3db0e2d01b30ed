"""Model families: what a model *is* (DESIGN §3).

A family decides which tensors of a checkpoint are *included* in localization and stitching, how a finetuned
checkpoint's keys map onto the base's, and, for families that serve inference, how to build a runnable model from
merged weights and what a skill's head is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, ClassVar

import torch

from skillhub.checkpoint import FLOAT_DTYPES, Checkpoint, validate_against
from skillhub.errors import ConfigError


@dataclass(frozen=True)
class Head:
    """A skill's classification head over normalised embeddings: logits = x @ weight.T (+ bias)."""

    weight: torch.Tensor  # [classes, dim]
    bias: torch.Tensor | None
    classes: list[str]
    #: logit scale (CLIP's zero-shot heads use the model's, about 100; a trained linear head uses 1)
    scale: float = 1.0

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        out = self.scale * (embeddings @ self.weight.T.to(embeddings.dtype))
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def top_k(self, embeddings: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """Per embedding, the ``k`` most probable classes as ``{"label", "index", "score"}`` (softmax scores)."""
        scores, idx = self.logits(embeddings).softmax(-1).topk(min(k, len(self.classes)), dim=-1)
        return [[{"label": self.classes[int(i)], "index": int(i), "score": float(x)} for x, i in zip(srow, irow)]
                for srow, irow in zip(scores, idx)]

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"weight": self.weight}
        if self.bias is not None:
            t["bias"] = self.bias
        return t


class Runtime:
    """A runnable merged model (families that serve inference)."""

    image_size: int = 0

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ModelFamily:
    """Base class of model families.

    :param include: fnmatch patterns of keys to include (empty: the family's default set).
    :param exclude: fnmatch patterns of keys to leave out of merging (they keep the base's values).
    :param model: the family's model identifier (``[base] model``), if it uses one.
    """

    name: ClassVar[str] = ""

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
        return base[key].dtype in FLOAT_DTYPES

    def included_keys(self, base: Checkpoint) -> list[str]:
        """The included keys of ``base``, sorted (the canonical order of tie rules)."""
        keys = [k for k in base if base[k].dtype in FLOAT_DTYPES and (
            any(fnmatchcase(k, p) for p in self.include) if self.include else self.default_included(base, k))]
        keys = [k for k in keys if not any(fnmatchcase(k, p) for p in self.exclude)]
        if not keys:
            raise ConfigError(f"no tensor of the base is included by family {self.name!r}", path=base.path,
                              key="base.include", hint="check [base] include/exclude patterns")
        return sorted(keys)

    def adapt(self, base: Checkpoint, ft: Checkpoint) -> Checkpoint:
        """Map a finetuned checkpoint's keys onto the base's (default: as they are)."""
        return ft

    def validate(self, base: Checkpoint, ft: Checkpoint) -> None:
        """Raise :class:`~skillhub.errors.CheckpointError` unless ``ft`` (adapted) fits the base."""
        validate_against(base, ft)

    def head(self, base: Checkpoint, ft: Checkpoint, sidecar: Mapping[str, Any] | None) -> Head | None:
        """The skill's head from its drop, if the family has heads."""
        return None

    def objective(self, base: Checkpoint, ft: Checkpoint, head: Head | None, sidecar: Mapping[str, Any]) -> Any:
        """The few-shot :class:`~skillhub.localize.TaskObjective` for data-driven strategies, built from the examples
        that came with the drop. Families without one raise :class:`~skillhub.errors.LocalizeError`."""
        from skillhub.errors import LocalizeError

        raise LocalizeError(f"family {self.name!r} has no task objective for data-driven localization",
                            hint="use the dataless strategy for this model family")

    def runtime(self, tensors: Mapping[str, torch.Tensor]) -> Runtime | None:
        """A runnable model on merged weights, or ``None`` when the family serves no inference."""
        return None
