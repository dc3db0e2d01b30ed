"""The registry's records: what :class:`~skillhub.registry.Registry` returns, as immutable values.

:class:`VersionRow` is one skill version as stored (identified by its source checkpoint's sha256, strategy and
params; numbered per skill), :class:`SkillState` a skill name with its settings and versions, and
:class:`RecoveryReport` what start-up recovery found and did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sqlite3


@dataclass(frozen=True)
class VersionRow:
    """One skill version as stored: identified by (source_sha, strategy, params); numbered per skill."""

    id: int
    skill: str
    version: int
    source_sha: str
    strategy: str
    params: dict[str, Any]
    status: str
    reason: str | None
    mask_sha: str | None
    nnz: int | None
    source_path: str | None
    meta: dict[str, Any]
    created: float | None
    updated: float | None

    def __hash__(self) -> int:
        # The dict fields are not hashable; these fields change whenever the row does.
        return hash((self.id, self.status, self.mask_sha, self.updated))

    @property
    def ref(self) -> str:
        """``skill@version``, for logs and messages."""
        return f"{self.skill}@{self.version}"

    @classmethod
    def from_sql(cls, r: sqlite3.Row) -> VersionRow:
        """Build from a ``SELECT * FROM versions`` row (JSON columns decoded)."""
        return cls(**{**dict(r), "params": json.loads(r["params"]), "meta": json.loads(r["meta"])})


@dataclass(frozen=True)
class SkillState:
    """A skill name with its settings and every version of it, oldest first."""

    name: str
    enabled: bool
    pinned: int | None
    latest_ready: VersionRow | None
    versions: list[VersionRow]

    @property
    def active(self) -> VersionRow | None:
        """The version that serves when the skill is enabled: :meth:`serving` with the registry's pin alone."""
        return self.serving(None)

    def serving(self, pin: int | None) -> VersionRow | None:
        """The version to serve: ``pin`` (else the registry's pin) if that version is READY, else the highest READY
        version; ``None`` when none is READY. The one rule of which version serves (:mod:`skillhub.desired`)."""
        pin = pin or self.pinned
        pinned = next((v for v in self.versions if v.version == pin and v.status == "READY"), None) if pin else None
        return pinned or self.latest_ready


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`Registry.recover` found and did."""

    removed_debris: list[Path]
    failed: list[VersionRow]  # READY rows whose mask file had gone; now FAILED
    pending: list[VersionRow]  # left for the caller to retry or fail
    removed_orphans: list[Path]  # mask files no row referenced, now in orphans/ (kept, not deleted)

    @property
    def clean(self) -> bool:
        return not (self.removed_debris or self.failed or self.pending or self.removed_orphans)
