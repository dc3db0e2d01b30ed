"""What the configuration asks for, resolved in one place: the strategy and params a skill is localized with, and
which version of a skill is served. The service, the CLI and the config check all ask here, so they cannot
disagree.

- **Strategy and params**, highest first: CLI flags (``skillhub localize``), the skill's ``[skills.NAME]`` table, the
  drop's sidecar, ``[localize]``. The strategy comes from the highest layer that names one (else ``[localize]``'s);
  the params from the highest layer that sets params *for that strategy*: a layer's params when it sets them, else
  ``[localize.params]`` when the strategy is ``[localize]``'s own, else none (another strategy's params would not
  validate). CLI ``--param`` flags are applied on top of what that gives.
- **The served version** of an enabled skill: its pin (``[skills.NAME] version``, else the registry's pin) when that
  version is READY, else its newest READY version. A pin on a version that is not READY (failed, or being
  re-localized) never takes the skill out of the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from skillhub.config import Config
from skillhub.records import SkillState, VersionRow


def localization(cfg: Config, skill: str | None, sidecar: Mapping[str, Any] | None = None, *,
                 strategy: str | None = None, params: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The strategy and params to localize ``skill`` with (see the module docstring for the order).

    :param strategy: a strategy asked for explicitly (CLI ``--strategy``), over everything else.
    :param params: explicit params (CLI ``--param``/``--sparsity``), applied over the resolved ones.
    """
    glob = cfg.localize
    chosen, chosen_params = glob.strategy, None
    side = sidecar or {}
    table = cfg.skills.per_skill.get(skill) if skill else None
    # The highest layer that says anything about localization wins whole: a [skills.NAME] table that sets only
    # params does not inherit the sidecar's strategy.
    for layer_strategy, layer_params in ((table.strategy, table.params) if table else (None, None),
                                         (side.get("strategy") or None, side.get("params"))):
        if layer_strategy or layer_params is not None:
            chosen, chosen_params = str(layer_strategy or glob.strategy), layer_params
            break
    if strategy and strategy != chosen:
        chosen, chosen_params = strategy, {}
    if chosen_params is None:
        chosen_params = glob.params if chosen == glob.strategy else {}
    resolved = dict(chosen_params)
    resolved.update(params or {})
    return chosen, resolved


def served_version(state: SkillState, cfg: Config) -> VersionRow | None:
    """The version of ``state`` that should be stitched in: ``None`` when the skill is disabled (registry or config)
    or has no READY version; else its pinned version if READY, else its newest READY one."""
    if not state.enabled or not cfg.skills.is_enabled(state.name):
        return None
    return state.serving(cfg.skills.for_skill(state.name).version)
