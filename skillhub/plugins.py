"""Building the plugin manager and resolving names to strategies, stitch policies and families.

Built in one function, in one order (pluggy's own recipe): hook specs, the default plugins (ordinary modules inside
the package, registered exactly like third-party ones), the ``skillhub`` entry-point group, ``*.py`` files from the
configured plugin folders, then ``check_pending()`` so that a misspelled hook fails loudly at start-up.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from skillhub import hookspecs
from skillhub.desired import localization
from skillhub.errors import ConfigError, PluginError, SkillhubError
from skillhub.families import ModelFamily
from skillhub.localize import Localizer, resolve_params
from skillhub.stitch import StitchPolicy

DEFAULT_PLUGINS = (
    "skillhub.strategies.dataless",
    "skillhub.strategies.trained",
    "skillhub.policies.average",
    "skillhub.policies.sum",
    "skillhub.policies.ties",
    "skillhub.families.state_dict",
    "skillhub.families.open_clip",
)
_KINDS = (
    ("register_localizers", Localizer, "localization strategy"),
    ("register_stitch_policies", StitchPolicy, "stitch policy"),
    ("register_families", ModelFamily, "model family"),
)


def get_plugin_manager(plugin_dirs: Iterable[str | Path] = (), *, entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh plugin manager: specs, default plugins, entry points, plugin-folder files, then ``check_pending``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        _register(pm, importlib.import_module(name), name)
    if entry_points:
        try:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        except Exception as e:
            raise PluginError(f"an entry-point plugin of group 'skillhub' failed to load: {type(e).__name__}: {e}",
                              hint="uninstall or fix that package") from e
    seen: set[Path] = set()
    for folder in plugin_dirs:
        folder = Path(folder)
        if folder.resolve() in seen:  # the same folder listed twice loads once
            continue
        seen.add(folder.resolve())
        if not folder.is_dir():
            continue  # a configured folder that does not exist yet is not an error
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith(("_", ".")):
                continue
            _register(pm, _load_file(path), f"file:{path}")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin {e.plugin!r} implements an unknown hook: {e}",
                          hint=f"known hooks: {', '.join(sorted(_hook_names()))}") from None
    return pm


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin {name!r} has an invalid hook implementation: {e}",
                          hint="compare its signature with skillhub/hookspecs.py") from None
    except ValueError as e:
        raise PluginError(f"plugin {name!r} cannot be registered: {e}") from None


def _hook_names() -> list[str]:
    return [n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "skillhub_spec")]


def _load_file(path: Path) -> ModuleType:
    """Import a plugin file under a private module name (no sys.path games)."""
    mod_name = "skillhub_plugin_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise PluginError("cannot load plugin file", path=path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise PluginError(f"plugin failed to import: {type(e).__name__}: {e}", path=path,
                          hint="fix the file or move it out of the plugin folder") from e
    return module


@dataclass(frozen=True)
class Plugins:
    """What the plugins registered, by name."""

    manager: pluggy.PluginManager
    localizers: Mapping[str, type[Localizer]]
    policies: Mapping[str, type[StitchPolicy]]
    families: Mapping[str, type[ModelFamily]]
    origins: Mapping[tuple[str, str], str]  # (kind, name) -> plugin name

    def localizer(self, name: str) -> type[Localizer]:
        return _lookup(self.localizers, name, "localization strategy", "localize.strategy")

    def policy(self, name: str) -> type[StitchPolicy]:
        return _lookup(self.policies, name, "stitch policy", "stitch.policy")

    def family(self, name: str) -> type[ModelFamily]:
        return _lookup(self.families, name, "model family", "base.family")

    def make_policy(self, name: str, params: Mapping[str, Any] | None = None) -> StitchPolicy:
        cls = self.policy(name)
        try:
            return cls(resolve_params(cls, params))
        except Exception as e:
            raise PluginError(str(e).replace("strategy", "stitch policy"), key="stitch.params") from None


def _lookup(table: Mapping[str, Any], name: str, kind: str, field: str) -> Any:
    if name not in table:
        raise PluginError(f"unknown {kind} {name!r}", key=field,
                          hint=f"available: {', '.join(sorted(table)) or 'none'}; `skillhub plugins` lists them")
    return table[name]


def load_plugins(plugin_dirs: Iterable[str | Path] = (), *, entry_points: bool = True) -> Plugins:
    """Build the plugin manager and collect every registration, rejecting duplicate names with a hint."""
    pm = get_plugin_manager(plugin_dirs, entry_points=entry_points)
    tables: list[dict[str, Any]] = []
    origins: dict[tuple[str, str], str] = {}
    for hook_name, base_cls, kind in _KINDS:
        table: dict[str, Any] = {}
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order
            plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
            try:
                result = impl.function()
            except Exception as e:
                raise PluginError(f"plugin {plugin_name!r} failed in {hook_name}: {type(e).__name__}: {e}") from e
            if result is not None and not isinstance(result, (list, tuple)):
                raise PluginError(f"plugin {plugin_name!r}: {hook_name} returned {result!r}, not a list",
                                  hint=f"return [{getattr(result, '__name__', 'YourClass')}]")
            for cls in result or []:
                if not (isinstance(cls, type) and issubclass(cls, base_cls)) or not getattr(cls, "name", ""):
                    raise PluginError(f"plugin {plugin_name!r} registered {cls!r}, not a named {base_cls.__name__} "
                                      "subclass", hint=f"return classes deriving from {base_cls.__name__} with a name")
                if cls.name in table:
                    raise PluginError(
                        f"{kind} {cls.name!r} registered twice: by {origins[(kind, cls.name)]!r} and by "
                        f"{plugin_name!r}", hint="rename one of them, or remove the duplicate plugin file")
                table[cls.name] = cls
                origins[(kind, cls.name)] = plugin_name
        tables.append(table)
    return Plugins(pm, tables[0], tables[1], tables[2], origins)


def _check_fallback(name: str | None, plugins: Plugins) -> None:
    if name is not None and plugins.localizer(name).needs_examples:
        raise PluginError(f"fallback strategy {name!r} needs examples itself",
                          hint="fall back to a dataless strategy, such as \"dataless\"")


def check_config(cfg: Any, plugins: Plugins) -> None:
    """Check that every strategy, policy and family the config names exists and that their params validate,
    globally and per skill, so that a bad config fails at start-up (exit 2) rather than at the first drop."""
    checks: list[tuple[str, Any]] = [
        ("base.family", lambda: plugins.family(cfg.base.family)),
        ("localize", lambda: resolve_params(plugins.localizer(cfg.localize.strategy), cfg.localize.params)),
        ("stitch", lambda: plugins.make_policy(cfg.stitch.policy, cfg.stitch.params)),
        ("localize.fallback", lambda: _check_fallback(cfg.localize.fallback, plugins)),
    ]
    for name in cfg.skills.per_skill:
        def one(name: str = name) -> None:
            strategy, params = localization(cfg, name)  # as the service will resolve it
            resolve_params(plugins.localizer(strategy), params)
        checks.append((f"skills.{name}", one))
    for field, check in checks:
        try:
            check()
        except SkillhubError as e:
            raise ConfigError(f"{field}: {e.message}", path=getattr(cfg, "source", None), key=field,
                              hint=e.hint) from None
