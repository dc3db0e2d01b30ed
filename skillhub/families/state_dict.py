"""``state_dict``: any torch model saved as safetensors. Every floating-point tensor is merged (minus the
``[base] exclude`` patterns); integer buffers (e.g. BatchNorm's ``num_batches_tracked``) keep the base's values."""

from __future__ import annotations

from skillhub.families import ModelFamily
from skillhub.hookspecs import hookimpl


class StateDictFamily(ModelFamily):
    """A generic torch state dict: merging and weight export."""

    name = "state_dict"


@hookimpl
def register_families() -> list[type[ModelFamily]]:
    return [StateDictFamily]
