"""Where and how the :class:`~skillhub.stitch.Stitcher` keeps its state: the device, and the layout the service
picks for a model's size (``[stitch] sparse_from``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from skillhub.errors import StitchError
from skillhub.stitchstate import DENSE_SHARE

if TYPE_CHECKING:
    import torch


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; anything else is passed to :class:`torch.device`."""
    import torch

    if str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StitchError(f"device {spec!r} requested but CUDA is not available", key="device",
                          hint='use device = "auto" or "cpu"')
    return dev


def dense_share_for(parameters: int, sparse_from: int) -> float:
    """The ``dense_share`` the service gives its :class:`Stitcher` for a model of ``parameters`` included entries
    (``[stitch] sparse_from``): 0 (dense accumulators from the start: flat O(mask) adds, for models whose dense state
    fits) below ``sparse_from``, else :data:`~skillhub.stitchstate.DENSE_SHARE` (sums and counts only where masks
    are, for big models)."""
    return 0.0 if parameters < sparse_from else DENSE_SHARE


def service_layout(parameters: int, sparse_from: int) -> dict[str, Any]:
    """The layout keywords the service gives its :class:`Stitcher` (``[stitch] sparse_from``): dense accumulators
    below ``sparse_from`` (:func:`dense_share_for`), from there sparse ones derived from the kept masks
    (:mod:`skillhub.stitchderive`: no state beyond the masks and the merged model)."""
    return {"dense_share": dense_share_for(parameters, sparse_from), "derived": parameters >= sparse_from}
