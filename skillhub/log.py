"""Logging and progress: structlog (readable on a terminal, JSON lines otherwise) and a tqdm bar on terminals.

structlog is imported, and configured, only once a logger is used (:func:`get_logger`): a command that
never logs, such as the offline ``skillhub stitch``, does not load it (with its asyncio, ssl and rich imports).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

#: the configuration asked for (level, JSON or not) and not yet applied, because structlog is not imported yet
_pending: tuple[str, bool] | None = None


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Set up structlog once for the process: JSON when stderr is not a terminal, colourless key=value otherwise.
    Applied now if structlog is loaded already, else when the first logger is asked for."""
    global _pending
    _pending = (level, not sys.stderr.isatty() if json is None else json)
    if "structlog" in sys.modules:
        _apply()


def _apply() -> None:
    global _pending
    if _pending is None:
        return
    (level, json), _pending = _pending, None
    import structlog

    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "skillhub") -> Any:
    """A structlog logger for ``name``. structlog is imported (and the pending configuration applied) when the
    logger is first used, not when it is made: modules make theirs at import, and merely importing them (as loading
    the built-in plugins does) costs no logging machinery."""
    return _LazyLogger(name)


class _LazyLogger:
    """structlog's logger for one name, fetched on first use (every attribute is structlog's)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._logger is None:
            _apply()
            import structlog

            self._logger = structlog.get_logger(self._name)
        return getattr(self._logger, attr)


class Progress:
    """A progress callback ``(done, total)``: a tqdm bar on a terminal, nothing otherwise (log events suffice)."""

    def __init__(self, desc: str, *, enabled: bool | None = None) -> None:
        self.desc = desc
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.desc, file=sys.stderr, leave=False)
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress(desc: str) -> Callable[[int, int], None]:
    return Progress(desc)
