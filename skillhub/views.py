"""What the service shows of its registry and its versions: the skill list (``GET /v1/skills``), the model
(``GET /v1/model``), a kept version's mask analytics (``GET /v1/analytics``) and the version history
(``GET /v1/history``), as plain JSON-ready dicts built from the records the :class:`~skillhub.hub.Hub` hands over."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from skillhub.errors import RegistryError, StitchError
from skillhub.history import version_history

if TYPE_CHECKING:
    from skillhub.analytics import AnalyticsCache
    from skillhub.publish import ModelVersion, PublishedVersions
    from skillhub.records import SkillState, VersionRow
    from skillhub.sections import SkillsSection


def skills(states: Iterable[SkillState], config: SkillsSection, active: Mapping[str, VersionRow],
           held: Mapping[str, tuple[VersionRow, str]], quality: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every registered skill: its settings (the registry's and ``[skills]``'s), the version it serves, whether the
    quality gate holds it out of the merged model and why, its accuracies, and every version it has."""
    return [{"name": s.name,
             "enabled": s.enabled and config.is_enabled(s.name),
             "pinned": config.for_skill(s.name).version or s.pinned,
             "active_version": active[s.name].version if s.name in active else None,
             # served on its own route only: the quality gate held it out of the merged model, and why
             "held": {"version": held[s.name][0].version, "reason": held[s.name][1]} if s.name in held else None,
             "accuracy": (quality.get(s.name) or {}).get("accuracy"),
             "quality": quality_note(s.name, quality, held),
             "versions": [{"version": v.version, "status": v.status, "reason": v.reason, "nnz": v.nnz,
                           "strategy": v.strategy, "params": v.params, "mask": v.mask_sha} for v in s.versions]}
            for s in states]


def served_skills(manifest: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The skills a served version holds, from its manifest alone (read-only mode and followers have no registry
    to list)."""
    cur = manifest["skills"] if manifest else {}
    return [{"name": n, "enabled": True, "pinned": None, "active_version": s["version"],
             "versions": [{"version": s["version"], "status": "READY", "reason": None, "nnz": s["nnz"],
                           "strategy": s["strategy"], "params": s["params"], "mask": s["mask"]}]}
            for n, s in sorted(cur.items())]


def quality_note(name: str, quality: Mapping[str, Any], held: Mapping[str, Any]) -> str:
    """How the quality gate judged skill ``name`` in the served version, in words."""
    if name in held:
        return "held out of the merged model by the quality gate; served on route=skill"
    if name in quality:
        return "scored on its check examples by the quality gate"
    return "no examples: passed on the smoke check alone"


def model(version: ModelVersion, *, base_sha: str, policy: str, overlap: Any, included_parameters: int
          ) -> dict[str, Any]:
    """The served version: base, policy, skills with their accuracies, held skills, overlap."""
    quality = version.manifest.get("quality") or {}
    skills_ = {n: {**e, "accuracy": (quality.get(n) or {}).get("accuracy")}
               for n, e in version.manifest["skills"].items()}
    return {"version": version.number, "base": base_sha, "policy": policy, "skills": skills_,
            "held": version.manifest.get("held") or {}, "included_parameters": included_parameters,
            "overlap": overlap, "created": version.created}


def analytics(cache: AnalyticsCache, current: ModelVersion | None, kept: Callable[[], PublishedVersions],
              version: int | None = None) -> dict[str, Any]:
    """The mask analytics of the served version ``current``, or of kept version ``version``:
    :func:`skillhub.analytics.analyze`, cached per version in ``cache``. ``kept()`` is the publisher of the kept
    versions, asked for only for a version other than the served one."""
    if version is None or (current is not None and version == current.number):
        if current is None:
            raise StitchError("no model version is being served yet", hint="drop a skill into the inbox")
        return cache.of(current.number, current.manifest)
    manifest = kept().manifest(version)
    if manifest is None:
        numbers = kept().numbers()
        raise RegistryError(f"unknown version {version}: not among the kept versions "
                            f"({', '.join(map(str, numbers)) or 'none'})", key="version",
                            hint="older versions are pruned ([state] keep_versions)")
    return cache.of(version, manifest)


def history(publisher: PublishedVersions, current: ModelVersion | None) -> list[dict[str, Any]]:
    """What each kept version changed, newest first, with the gate's decisions:
    :func:`skillhub.history.version_history` over the kept manifests (the served one as it is held in memory,
    where the gate's ``held`` note may be newer than the file)."""
    manifests = [m for n in publisher.numbers() if (current is None or n != current.number)
                 and (m := publisher.manifest(n)) is not None]
    if current is not None:
        manifests.append({**current.manifest, "version": current.number, "created": current.created})
    return version_history(manifests)
