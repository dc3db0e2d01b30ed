"""The one exception hierarchy of skillhub.

The library raises these; the CLI prints ``str(error)`` as one line and exits with ``error.exit_code``; the daemon
logs them and carries on. Every error names the thing it is about (a path, a key, a field) and, where there is one,
the fix (``hint``).
"""

from __future__ import annotations

from pathlib import Path


class SkillhubError(Exception):
    """Base of every error skillhub raises on purpose.

    :param message: what went wrong, naming the offending thing.
    :param path: the file or folder concerned, if any.
    :param key: the tensor key, config field or skill name concerned, if any.
    :param hint: what the user should do about it.
    """

    #: process exit code the CLI uses for this error (DESIGN §8: 2 = usage/config, 1 = anything else)
    exit_code: int = 1

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = Path(path) if path is not None else None
        self.key = key
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(f"{printable(str(self.path))}: ")
        parts.append(self.message)
        if self.hint:
            parts.append(f". Hint: {self.hint}")
        return "".join(parts)

    def __reduce__(self) -> tuple[object, ...]:
        # Errors travel back from localization workers in other processes (skillhub.executor): pickled whole, with
        # path, key and hint, whatever the subclass's constructor takes.
        return _restore, (type(self), self.__dict__.copy())


def _restore(cls: type[SkillhubError], state: dict[str, object]) -> SkillhubError:
    error = cls.__new__(cls)
    error.__dict__.update(state)
    Exception.__init__(error, str(error))
    return error


def printable(text: str) -> str:
    """``text`` safe to log or print: control characters, escapes and undecodable bytes escaped, so a hostile file
    name cannot forge log lines (FAULTS A11)."""
    return text if text.isprintable() else text.encode("unicode_escape", "backslashreplace").decode("ascii")


class ConfigError(SkillhubError):
    """``config.toml``, an environment override or a CLI flag is invalid."""

    exit_code = 2


class UsageError(SkillhubError):
    """A command was called wrongly (missing argument, conflicting flags)."""

    exit_code = 2


class PluginError(SkillhubError):
    """A plugin failed to load, registered a duplicate name, or declared an unknown hook."""

    exit_code = 2


class CheckpointError(SkillhubError):
    """A tensor file is unreadable, malformed, hostile, or does not match the base model."""


class LocalizeError(SkillhubError):
    """A localization strategy could not produce a mask (bad params, bad task data, non-finite result)."""


class StitchError(SkillhubError):
    """The stitcher was asked for something inconsistent (unknown task, a mask that does not fit the base)."""


class RegistryError(SkillhubError):
    """The state folder or its SQLite registry cannot be used as asked."""


class RegistryCorruptError(RegistryError):
    """The registry database is damaged, or missing next to mask files: it is left untouched, and the service can
    only serve its last verified version read-only (FAULTS C5)."""


class DiskFullError(RegistryError):
    """A write to the state folder failed for lack of space; nothing was changed, and the step can be retried once
    space returns (FAULTS C4)."""


class ExecutorError(ConfigError):
    """The executor that runs localization jobs (``[executor]``) cannot be used as configured: Ray is not
    installed, or its cluster cannot be reached at start-up."""


class JobLostError(SkillhubError):
    """A localization job never came back: its worker process died (killed, out of memory) or its cluster went
    away. Nothing was stored; the drop stays pending and is localized again."""


class FollowerError(RegistryError):
    """A read-only replica (``skillhub run --follow``) was asked to change something: only the primary writes the
    state folder (answered with 409)."""


class StateLockedError(RegistryError):
    """Another live process holds the state folder."""

    def __init__(self, path: str | Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"state folder already in use by {who}",
            path=path,
            hint="stop that process first, or point --state at another folder",
        )
        self.pid = pid
