"""What can still be served when the registry database cannot be opened (FAULTS C5).

A corrupt ``registry.sqlite3`` (or one missing next to mask files) is never replaced by a fresh, empty registry: that
would silently forget every skill. The service instead serves the newest published version it can *verify* from
files alone: a manifest under ``models/`` made for this base whose every mask file is present and still hashes to its
name. Mutations are refused until the registry is restored (:data:`RECOVERY_STEPS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skillhub.atomic import sha256_file
from skillhub.delta import SparseDelta
from skillhub.errors import RegistryCorruptError, SkillhubError
from skillhub.log import get_logger
from skillhub.publish import Publisher
from skillhub.registry import Registry

log = get_logger("skillhub.recovery")

RECOVERY_STEPS = (
    "the service serves its last verified version read-only and refuses changes until the registry is restored: "
    "stop it; run `skillhub doctor` to see what is damaged; `skillhub restore BACKUP` the newest backup (or move "
    "registry.sqlite3 and masks/ aside to start empty, then drop the checkpoints again); start it again"
)


def check_registry_is_current(registry: Registry, state: Path) -> None:
    """Refuse (close ``registry`` and raise) a registry older than the version being served: its ``-wal`` file was
    lost, say. Replaying it would silently drop the skills it forgot; the caller serves read-only instead."""
    current = Publisher.peek_current(state / "models") or {}
    lost = registry.unknown_masks({s["mask"] for s in current.get("skills", {}).values() if s.get("mask")})
    if lost:
        registry.close()
        raise RegistryCorruptError(
            f"the registry does not know {len(lost)} mask(s) that served version {current.get('version')} uses: it "
            "lost recent changes (was registry.sqlite3-wal deleted or not restored with it?)",
            path=state / "registry.sqlite3", hint="it was left untouched; restore it (with its -wal file) from a "
                                                  "backup, or run `skillhub doctor`")


def last_verified(publisher: Publisher, registry: Registry, base_sha: str, policy: str,
                  policy_params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, SparseDelta]] | None:
    """The newest published version that files alone vouch for: (its manifest, its masks by skill), or None.

    The ``current`` version is tried first, then older ones newest first. A version qualifies when it was made for
    ``base_sha`` with this stitch ``policy`` and ``policy_params`` (so stitching its masks again gives the same
    weights) and each of its skills' mask files is present and hashes to the name the manifest gives it.
    """
    current = publisher.current_number()
    numbers = sorted(publisher.numbers(), reverse=True)
    if current in numbers:
        numbers.remove(current)
        numbers.insert(0, current)
    for number in numbers:
        manifest = publisher.manifest(number)
        if manifest is None or (manifest.get("base"), manifest.get("policy"), manifest.get("policy_params")) != (
                base_sha, policy, policy_params):
            continue
        try:
            masks = {name: _verified_mask(registry, str(entry.get("mask")))
                     for name, entry in dict(manifest.get("skills") or {}).items()}
        except (SkillhubError, OSError, AttributeError) as e:
            log.warning("version_not_verifiable", version=number, error=str(e))
            continue
        manifest.setdefault("version", number)
        return manifest, masks
    return None


def _verified_mask(registry: Registry, sha: str) -> SparseDelta:
    path = registry.mask_path(sha)  # raises on anything but a sha256 hex digest
    if sha256_file(path) != sha:
        raise OSError(f"{path} does not match its sha256")
    return SparseDelta.load(path)
