"""Localization: find the tiny region γₜ of a task vector that carries the skill (He et al., arXiv 2408.13656).

A strategy is a small :class:`Localizer` subclass with a typed ``Params`` model and one pure method,
``localize(task, params, ctx) -> SparseDelta``. Strategies do no I/O of their own, read no config and touch no
registry: the core resolves their params (:func:`resolve_params`) and hands them a :class:`~skillhub.taskvector.TaskVector`
that streams τ tensor by tensor from memory-mapped checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from skillhub import kernels
from skillhub.delta import Provenance, SparseDelta
from skillhub.errors import LocalizeError, SkillhubError
from skillhub.taskvector import TaskVector

if TYPE_CHECKING:
    import torch


class NoParams(BaseModel):
    """Params model for a strategy that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskObjective(Protocol):
    """Few-shot task data for data-driven strategies, as the model family prepares it.

    The strategy never sees images or labels: it asks for the task loss of the model whose *included* tensors are
    replaced by ``params`` (everything else stays θ₀). The family builds this from the examples that came with the
    drop (at most 64 per class, 1024 in all, by default) and the skill's head.
    """

    #: number of examples
    size: int

    def loss(self, params: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        """Differentiable mean task loss (e.g. cross-entropy) over a batch; ``step`` picks the batch (full batch
        when the set is small)."""
        ...

    def accuracy(self, params: Mapping[str, torch.Tensor]) -> float:
        """Accuracy over all examples, without gradients (for the log line and tests)."""
        ...


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


@dataclass
class LocalizeContext:
    """What a strategy may use besides the task vector.

    :param device: where to run tensor work (the stitcher's device, usually).
    :param seed: seed for anything random, so that a localization is reproducible.
    :param examples: a :class:`TaskObjective` for data-driven strategies, else ``None``.
    :param progress: called with (done, total) as work advances; the CLI draws a bar from it.
    """

    device: torch.device = field(default_factory=_cpu)
    seed: int = 0
    examples: Any = None
    progress: Callable[[int, int], None] | None = None

    def report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


class Localizer:
    """Base class of localization strategies.

    Subclasses set ``name`` (what config and the CLI call it), ``Params`` (a frozen pydantic model with
    ``extra="forbid"``; defaults are the strategy's documented defaults), and implement :meth:`localize`.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    #: True when the strategy needs ``ctx.examples`` (few-shot task data).
    needs_examples: ClassVar[bool] = False

    def localize(self, task: TaskVector, params: Any, ctx: LocalizeContext) -> SparseDelta:
        """Return the sparse delta γ⊙τ. Must be deterministic for a given (task, params, ctx.seed)."""
        raise NotImplementedError


def resolve_params(localizer: type[Localizer] | Any, raw: Mapping[str, Any] | None) -> BaseModel:
    """Validate raw params (from config or flags) with the strategy's own ``Params`` model."""
    try:
        return localizer.Params(**dict(raw or {}))
    except ValidationError as e:
        first = e.errors()[0]
        # a union's branch ("constrained-float", "literal['auto']") is no part of the field's name
        field_name = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or str(p).isidentifier()) or "params"
        raise LocalizeError(
            f"invalid params for strategy {localizer.name!r}: {field_name}: {first['msg']}",
            key=field_name,
            hint=f"valid params: {', '.join(localizer.Params.model_fields) or 'none'}",
        ) from None


def run_localizer(localizer_cls: type[Localizer], task: TaskVector, raw_params: Mapping[str, Any] | None,
                  ctx: LocalizeContext, provenance: Provenance) -> SparseDelta:
    """Resolve params, run the strategy, check its output, and stamp the provenance on the result."""
    params = resolve_params(localizer_cls, raw_params)
    if localizer_cls.needs_examples and ctx.examples is None:
        raise LocalizeError(f"strategy {localizer_cls.name!r} needs few-shot examples and none were given",
                            hint="add examples to the skill's drop, or choose the dataless strategy")
    try:
        delta = localizer_cls().localize(task, params, ctx)
    except SkillhubError:
        raise
    except Exception as e:  # a third-party strategy's bug is reported as a localization failure, not a crash
        raise LocalizeError(f"strategy {localizer_cls.name!r} failed: {type(e).__name__}: {e}") from e
    check_delta(delta, task, localizer_cls.name)
    return SparseDelta(delta.indices, delta.values, delta.shapes, delta.dtypes, Provenance(
        skill=provenance.skill, base=provenance.base, source=provenance.source, strategy=localizer_cls.name,
        params=params.model_dump(mode="json")))


#: Value dtypes :func:`check_delta` checks through numpy (others, bfloat16 first, through torch).
NUMPY_FLOATS = frozenset(("torch.float32", "torch.float64", "torch.float16"))


def check_delta(delta: SparseDelta, task: TaskVector, strategy: str) -> None:
    """A strategy's result must fit the task: known keys, sorted in-range indices (or, for a dense tensor, one value
    per entry of the task's tensor), finite values (FAULTS B8)."""
    import numpy as np
    import torch

    for key, values in delta.values.items():
        if key not in task.shapes:
            raise LocalizeError(f"strategy {strategy!r} returned a mask for unknown tensor {key!r}", key=key)
        numel = math.prod(task.shapes[key])
        idx = delta.indices.get(key)
        code = None  # 0 fine, 1 out of range, 2 unsorted, 3 not finite (kernels.check_entries)
        if idx is None:  # the dense form: the values are the whole tensor
            if values.numel() != numel:
                raise LocalizeError(f"strategy {strategy!r} returned {values.numel()} dense values for {key!r}, "
                                    f"which has {numel} entries", key=key)
        elif idx.numel():
            a = idx.detach().cpu().numpy()
            if values.dtype == torch.float32:  # indices and values in one compiled pass, when it is loaded
                code = kernels.check_entries(a, values.detach().cpu().numpy(), numel)
            if code is None:  # numpy: a torch call costs ~5 µs, a numpy one ~1 µs, and a model has hundreds of tensors
                code = 1 if int(a[0]) < 0 or int(a[-1]) >= numel else \
                    2 if a.size > 1 and bool((a[1:] <= a[:-1]).any()) else None
            if code == 1:
                raise LocalizeError(f"strategy {strategy!r} returned out-of-range indices for {key!r}", key=key)
            if code == 2:
                raise LocalizeError(f"strategy {strategy!r} returned unsorted or repeated indices for {key!r}",
                                    key=key)
        if code is None:  # the values are not checked yet
            finite = bool(np.isfinite(values.detach().cpu().numpy()).all()) if str(values.dtype) in NUMPY_FLOATS \
                else bool(torch.isfinite(values).all())
            code = 0 if finite else 3
        if code == 3:
            raise LocalizeError(f"strategy {strategy!r} produced NaN or Inf values for {key!r}", key=key,
                                hint="the mask is rejected; the served model is unchanged")
