"""The version history: what each published version changed, read from the kept manifests (``state/models/<n>/
manifest.json``, :mod:`skillhub.publish`), and the quality gate's decisions recorded in them (:mod:`skillhub.gate`).

Between a version and the one kept before it, a skill is

- ``added``: served now, not before; ``removed``: served before, not now;
- ``updated``: served in both from different checkpoints (a new skill version, or a pin that rolled it back);
- ``relocalized``: the same checkpoint with another mask (a strategy or params change).

The gate's decisions are each version's ``quality`` (accuracy per route on the skill's check examples) and
``held`` (skills kept out of the merged model, served on their own route, with the reason).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["version_history"]


def _change(before: Mapping[str, Any], after: Mapping[str, Any]) -> str | None:
    if before.get("source") != after.get("source") or before.get("version") != after.get("version"):
        return "updated"
    if before.get("mask") != after.get("mask"):
        return "relocalized"
    return None


def version_history(manifests: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per manifest (each with its ``version`` number), newest first: ``{"version", "created", "skills":
    {NAME: skill version}, "previous", "added", "removed", "updated", "relocalized", "held": {NAME: reason},
    "accuracy": {NAME: {route: accuracy}}}``. ``previous`` is the number the changes are counted from (``None`` for
    the oldest kept version, whose skills all count as added)."""
    ordered = sorted((m for m in manifests if isinstance(m.get("version"), int)), key=lambda m: m["version"])
    out: list[dict[str, Any]] = []
    before: Mapping[str, Any] = {}
    previous: int | None = None
    for m in ordered:
        skills: Mapping[str, Any] = m.get("skills") or {}
        changes: dict[str, list[dict[str, Any]]] = {"updated": [], "relocalized": []}
        for name in sorted(set(skills) & set(before)):
            kind = _change(before[name], skills[name])
            if kind is not None:
                changes[kind].append({"name": name, "from": before[name].get("version"),
                                      "to": skills[name].get("version"), "strategy": skills[name].get("strategy"),
                                      "params": skills[name].get("params")})
        quality = m.get("quality") or {}
        out.append({
            "version": m["version"], "created": m.get("created"), "previous": previous,
            "skills": {n: e.get("version") for n, e in sorted(skills.items())},
            "added": [{"name": n, "version": skills[n].get("version"), "strategy": skills[n].get("strategy")}
                      for n in sorted(set(skills) - set(before))],
            "removed": [{"name": n, "version": before[n].get("version")} for n in sorted(set(before) - set(skills))],
            **changes,
            "held": {n: (h or {}).get("reason") for n, h in sorted((m.get("held") or {}).items())},
            "accuracy": {n: dict((q or {}).get("accuracy") or {}) for n, q in sorted(quality.items())},
        })
        before, previous = skills, m["version"]
    return out[::-1]
