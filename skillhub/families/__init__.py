"""Model families: what a model *is* (DESIGN §3).

A family decides which tensors of a checkpoint are *included* in localization and stitching. Families that serve
inference also know how to build a runnable model from merged weights (the ``open_clip`` family, later).
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import ClassVar

from skillhub.checkpoint import FLOAT_DTYPES, Checkpoint
from skillhub.errors import ConfigError


class ModelFamily:
    """Base class of model families.

    :param include: fnmatch patterns of keys to include (empty: the family's default set).
    :param exclude: fnmatch patterns of keys to leave out of merging (they keep the base's values).
    """

    name: ClassVar[str] = ""

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        self.include = list(include)
        self.exclude = list(exclude)

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
