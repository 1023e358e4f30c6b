# -*- test-case-name: tests.core.test_tap -*-
"""Per-module log levels for the container (``res/logging/loglevels.config``).

The file is a dict literal of namespace prefix → level name (``debug``,
``info``, ``warn``, ``error``, ``critical``); ``""`` sets the default. A
prefix applies to every namespace below it, as :class:`LogLevelFilterPredicate`
looks a namespace up along its dotted parents (``ion.core.messaging.memory``
falls back to ``ion.core.messaging``, then ``ion.core``, then ``ion``).
``$ION_LOGLEVELS`` names another file to use instead.

Under ``twistd``, :mod:`ion.core.tap` names :func:`stdout_observer` as the
``--logger`` factory when the user chose no ``--logfile``, ``--logger`` or
``--syslog``, so the container's log goes to stdout through the filter.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    textFileLogObserver,
)

from ion.core.config import read_literal_file, resource_root
from ion.core.exceptions import ConfigurationError

__all__ = [
    "LOGLEVELS_ENV",
    "loglevels_path",
    "read_levels",
    "level_predicate",
    "filtered_observer",
    "stdout_observer",
]

#: Environment variable naming a log-levels file to use instead of the shipped one.
LOGLEVELS_ENV = "ION_LOGLEVELS"

_ALIASES = {"warning": "warn", "fatal": "critical", "err": "error"}


def loglevels_path() -> Path:
    """``$ION_LOGLEVELS`` if set, else ``res/logging/loglevels.config``."""
    override = os.environ.get(LOGLEVELS_ENV)
    if override:
        return Path(override)
    return resource_root() / "logging" / "loglevels.config"


def _level(name: Any, namespace: str, path: Path | None) -> LogLevel:
    where = f" in {path}" if path is not None else ""
    if not isinstance(name, str):
        raise ConfigurationError(f"log level of {namespace!r}{where} must be a name, not {name!r}")
    text = name.strip().lower()
    try:
        return LogLevel.levelWithName(_ALIASES.get(text, text))
    except Exception:
        known = ", ".join(level.name for level in LogLevel.iterconstants())
        raise ConfigurationError(
            f"unknown log level {name!r} for {namespace!r}{where}; use one of {known}") from None


def read_levels(path: Path | None = None) -> dict[str, LogLevel]:
    """The levels a log-levels file sets, namespace → :class:`LogLevel`.

    :param path: the file (default: :func:`loglevels_path`); a missing default file means no levels.
    :raises ConfigurationError: for a file that is not a dict of namespace → level name.
    """
    explicit = path is not None or bool(os.environ.get(LOGLEVELS_ENV))
    path = path or loglevels_path()
    if not path.exists() and not explicit:
        return {}
    data = read_literal_file(path, "log levels file")
    if not isinstance(data, dict):
        raise ConfigurationError(f"log levels file {path} must hold a dict of namespace -> level")
    return {str(ns): _level(level, str(ns), path) for ns, level in data.items()}


def level_predicate(levels: Mapping[str, LogLevel] | None = None) -> LogLevelFilterPredicate:
    """A predicate that lets through events at or above their namespace's level.

    :param levels: namespace → level (default: read from :func:`loglevels_path`);
        ``""`` is the default level (``info`` if not given).
    """
    if levels is None:
        levels = read_levels()
    predicate = LogLevelFilterPredicate(defaultLogLevel=levels.get("", LogLevel.info))
    for namespace, level in levels.items():
        if namespace:
            predicate.setLogLevelForNamespace(namespace, level)
    return predicate


def filtered_observer(observer: ILogObserver,
                      levels: Mapping[str, LogLevel] | None = None) -> FilteringLogObserver:
    """``observer`` behind the per-module level filter."""
    predicate = cast(ILogFilterPredicate, level_predicate(levels))
    return FilteringLogObserver(observer, [predicate])


def stdout_observer(stream: IO[str] | None = None) -> FilteringLogObserver:
    """The ``twistd --logger`` factory: text lines on stdout, filtered by module level."""
    text = cast(ILogObserver, textFileLogObserver(stream if stream is not None else sys.stdout))
    return filtered_observer(text)
