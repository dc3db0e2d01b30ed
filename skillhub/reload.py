"""A config edit applied to the running service (the daemon's reload of ``config.toml``,
:meth:`skillhub.hub.Hub.apply_config`): the sections it may not change, and the skills it may not newly name.

An edit that fails here is refused as a whole and the running config stays in force (FAULTS B11): the daemon logs
the error and carries on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from skillhub.errors import ConfigError, StitchError
from skillhub.plugins import check_config

if TYPE_CHECKING:
    from skillhub.config import Config
    from skillhub.plugins import Plugins

#: config sections a live reload may not change (the edit is refused; a restart applies it)
RESTART_SECTIONS = ("base", "state", "device", "stitch", "watch", "serve", "plugins", "executor")


def check_reload(old: Config, new: Config, plugins: Plugins, known: Callable[[], Iterable[str]]) -> None:
    """Refuse (raise) the switch from ``old`` to the already validated ``new`` when it changes a section of
    :data:`RESTART_SECTIONS`, fails the config check against ``plugins``, or newly names a skill that none of
    ``known()`` (the registry's skill names, asked for last) is."""
    for field in RESTART_SECTIONS:
        if getattr(old, field) != getattr(new, field):
            raise StitchError(f"changing [{field}] needs a restart", key=field,
                              hint="restart `skillhub run` to apply it")
    check_config(new, plugins)
    check_skill_names(old, new, {*known()})


def check_skill_names(old: Config, new: Config, known: set[str]) -> None:
    """An edit may not newly name a skill the registry does not know (FAULTS B11: most likely a typo, which would
    otherwise do nothing, silently). Names already in the config before are left alone."""
    for field, before, after in (("skills.disabled", old.skills.disabled, new.skills.disabled),
                                 ("skills", old.skills.per_skill, new.skills.per_skill)):
        unknown = sorted(set(after) - set(before) - known)
        if unknown:
            raise ConfigError(f"{field}: unknown skill {unknown[0]!r}", path=new.source, key=field,
                              hint=f"known skills: {', '.join(sorted(known)) or 'none yet'}; to set up a skill "
                                   "before dropping it, give the drop a sidecar NAME.toml instead")
