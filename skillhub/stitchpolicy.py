"""What a stitch policy is (the plugin author's contract, used by :class:`~skillhub.stitch.Stitcher`): per-entry
accumulators that one skill's values are added to and removed from, and the merged delta they give.

Built-in policies (:mod:`skillhub.policies`): ``average`` (Localize-and-Stitch), ``sum`` (task arithmetic, λ) and
``ties`` (TIES-merging's elected sign). Import these names from :mod:`skillhub.stitch` as before, or from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

from skillhub.localize import NoParams

if TYPE_CHECKING:
    import torch

#: What policies get as ``idx``: int64 indices, or (``whole_tensor`` policies) a slice of the flat tensor, or a bool
#: mask over it (``reset`` only).
Index: TypeAlias = "torch.Tensor | slice"


def zero_at(t: torch.Tensor, idx: Index) -> None:
    """``t[idx] = 0``, in place and without a temporary index array for a bool mask."""
    import torch

    if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
        t.masked_fill_(idx, 0)
    else:
        t[idx] = 0


class ScaleParams(BaseModel):
    """Params of policies with a scaling factor λ (``sum``, ``ties``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    scale: float = Field(1.0, description="λ, the scaling factor applied to the merged task vector")


class StitchPolicy:
    """Base class of stitch policies. Subclasses set ``name`` and ``Params`` and implement the three methods.

    All tensors passed in are flat (1-D) and on the stitcher's device; ``idx`` is an int64 tensor of unique indices,
    or, for a policy that sets ``whole_tensor``, possibly a ``slice`` of the flat tensor (``update`` then gets one
    value per entry of the slice, 0 where the mask does not reach: a zero value must change nothing) or, in
    ``reset``, a bool mask.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    #: True when ``update``, ``delta`` and ``reset`` also take slices (and ``reset`` bool masks) for ``idx``: dense
    #: masks are then stitched with whole-tensor operations. Without it a dense mask reaches the policy as the
    #: indices of its non-zero values (the same result, through gather/scatter).
    whole_tensor: ClassVar[bool] = False
    #: Names of accumulators that hold one value per tensor rather than one per entry (TIES's model-wide balance).
    #: The stitcher keeps every other accumulator only where masks are (:mod:`skillhub.stitchstate`), so it asks
    #: for them in pieces of any length, possibly 0; these it keeps once per tensor and passes along with each piece.
    totals: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params: Any = params if params is not None else self.Params()

    def accumulators(self, numel: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Fresh, zeroed per-entry accumulators for ``numel`` entries (a whole tensor, or the entries of it that
        masks cover: ``idx`` then counts within those), plus the ``totals``."""
        raise NotImplementedError

    def update(self, acc: dict[str, torch.Tensor], idx: Index, values: torch.Tensor, sign: int) -> None:
        """Add (``sign`` = +1) or remove (−1) one skill's values at ``idx``."""
        raise NotImplementedError

    def delta(self, acc: dict[str, torch.Tensor], count: torch.Tensor, idx: Index) -> torch.Tensor:
        """The merged delta (θ − θ₀) at ``idx``, from the accumulators and the mask count there."""
        raise NotImplementedError

    def reset(self, acc: dict[str, torch.Tensor], idx: Index) -> None:
        """Zero the accumulators at ``idx`` (called where no mask is active any more)."""
        for t in acc.values():
            zero_at(t, idx)

    def settle(self, accs: Mapping[str, dict[str, torch.Tensor]]) -> list[str]:
        """Called after every whole add or remove with the accumulators of every tensor (for a tensor kept sparse,
        only its ``totals``); returns the keys whose merged tensors must be recomputed because some model-wide
        quantity changed (TIES's model-wide majority sign). The default policy has none."""
        return []
