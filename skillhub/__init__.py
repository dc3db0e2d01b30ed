"""skillhub: compose finetuned skills into one model with Localize-and-Stitch (He et al., arXiv 2408.13656).

The library is the product; the daemon, HTTP server and CLI are thin layers over it.
"""

from __future__ import annotations

from skillhub.checkpoint import Checkpoint, open_checkpoint, validate_against, write_safetensors
from skillhub.delta import Provenance, SparseDelta, StateDict, TaskVector
from skillhub.errors import (
    CheckpointError,
    ConfigError,
    LocalizeError,
    PluginError,
    RegistryError,
    SkillhubError,
    StitchError,
)
from skillhub.hookspecs import hookimpl
from skillhub.localize import LocalizeContext, Localizer
from skillhub.stitch import Stitcher, StitchPolicy, stitch

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
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
    "stitch",
    "validate_against",
    "write_safetensors",
]
