"""skillhub: compose finetuned skills into one model with Localize-and-Stitch (He et al., arXiv 2408.13656).

The library is the product; the daemon, HTTP server and CLI are thin layers over it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from skillhub.errors import (
    CheckpointError,
    ConfigError,
    LocalizeError,
    PluginError,
    RegistryError,
    SkillhubError,
    StitchError,
)

#: public names and the modules that define them, imported on first use: ``import skillhub`` (and so every CLI
#: command, ``skillhub --help`` included) does not pay for torch until something needs it.
_LAZY = {
    "Checkpoint": "skillhub.checkpoint", "open_checkpoint": "skillhub.checkpoint",
    "validate_against": "skillhub.checkpoint", "write_safetensors": "skillhub.checkpoint",
    "Provenance": "skillhub.delta", "SparseDelta": "skillhub.delta", "StateDict": "skillhub.taskvector",
    "TaskVector": "skillhub.taskvector", "hookimpl": "skillhub.hookspecs", "LocalizeContext": "skillhub.localize",
    "Localizer": "skillhub.localize", "Stitcher": "skillhub.stitch", "StitchPolicy": "skillhub.stitch",
    "Hub": "skillhub.hub", "Client": "skillhub.client",
}
# ``stitch`` (the from-scratch merge) is not among them: a lazily bound name would be shadowed by the submodule
# ``skillhub.stitch`` as soon as anything imports it. Import it from there: ``from skillhub.stitch import stitch``.

if TYPE_CHECKING:
    from skillhub.checkpoint import (
        Checkpoint,
        open_checkpoint,
        validate_against,
        write_safetensors,
    )
    from skillhub.client import Client
    from skillhub.delta import Provenance, SparseDelta
    from skillhub.hookspecs import hookimpl
    from skillhub.hub import Hub
    from skillhub.localize import LocalizeContext, Localizer
    from skillhub.stitch import Stitcher, StitchPolicy
    from skillhub.taskvector import StateDict, TaskVector


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'skillhub' has no attribute {name!r}")


__all__ = [
    "Checkpoint",
    "Client",
    "CheckpointError",
    "ConfigError",
    "Hub",
    "LocalizeContext",
    "LocalizeError",
    "Localizer",
    "PluginError",
    "Provenance",
    "RegistryError",
    "SkillhubError",
    "SparseDelta",
    "StateDict",
    "StitchError",
    "StitchPolicy",
    "Stitcher",
    "TaskVector",
    "hookimpl",
    "open_checkpoint",
    "validate_against",
    "write_safetensors",
]
