# -*- test-case-name: tests.core.test_tap,tests.core.test_log -*-
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
While the interactive shell runs on that same terminal it takes the lines
(:func:`set_console`): it writes each above its prompt and redraws the prompt
and what the user was typing below it.

:class:`LogLimiter` keeps what a peer can make us log per message (garbage,
expired messages, unknown ops, late replies) to one line per *kind* per
interval: the first of a kind is logged at once, the others of its interval
are counted, and when the interval ends (one timer for the whole limiter,
armed only while something is counted) a line says how many were not logged,
with the last of them as the example. ``flush()`` says it at once (terminate).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)

from ion.core.config import read_literal_file, resource_root
from ion.core.exceptions import ConfigurationError
from ion.core.trace import current_trace_id

__all__ = [
    "LOGLEVELS_ENV",
    "loglevels_path",
    "read_levels",
    "level_predicate",
    "filtered_observer",
    "stdout_observer",
    "text_observer",
    "format_event",
    "set_console",
    "LogLimiter",
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


#: Where log lines go instead of stdout while an interactive console (the shell) owns the terminal.
_console: Callable[[str], None] | None = None


def set_console(writer: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Send the stdout log's lines to ``writer`` (None: back to stdout); returns the previous one.

    The shell sets it while it runs on the terminal stdout is on, so that a log line is
    written above its prompt, which it then redraws with the line being typed, instead of
    landing in the middle of them.
    """
    global _console
    previous, _console = _console, writer
    return previous


class _ConsoleAwareStream:
    """The stream of :func:`stdout_observer`: ``stream``, or the console while one is set."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream  # the real stdout, taken once: twistd later points sys.stdout at the log

    def write(self, text: str) -> None:
        console = _console
        if console is not None:
            try:
                console(text)
                return
            except Exception:  # a broken console never loses the log line
                pass
        self.stream.write(text)

    def flush(self) -> None:
        if _console is None:
            self.stream.flush()


def _event_time(when: float | None) -> str:
    return formatTime(when, timeFormatRFC3339)


def format_event(event: dict[str, Any]) -> str | None:
    """An event as the classic text line, with `` trace=<trace id>`` at the end of its first line
    when it was logged while an op handled a message (:func:`ion.core.trace.current_trace_id`: the
    observer runs in the code that logs, so the op's context is the current one)."""
    text = formatEventAsClassicLogText(event, formatTime=_event_time)
    if not text:
        return text
    trace_id = event.get("ion_trace") or current_trace_id()
    if trace_id is None:
        return text
    first, newline, rest = text.partition("\n")
    return f"{first} trace={trace_id}{newline}{rest}"


def text_observer(stream: IO[str]) -> ILogObserver:
    """Text lines on ``stream``, each with the trace id of the message being handled (:func:`format_event`)."""
    return cast(ILogObserver, FileLogObserver(stream, format_event))


def stdout_observer(stream: IO[str] | None = None) -> FilteringLogObserver:
    """The ``twistd --logger`` factory: text lines on stdout (or the shell, see :func:`set_console`),
    filtered by module level; a line logged while an op handles a message ends with ``trace=<id>``."""
    out = _ConsoleAwareStream(stream if stream is not None else sys.stdout)
    return filtered_observer(text_observer(cast(IO[str], out)))


#: The log file ``twistd --logfile`` named for a container (see :func:`file_observer`).
_logfile: str | None = None


def use_logfile(path: str) -> str:
    """Have :func:`file_observer` write to ``path``; the ``twistd --logger`` name to give."""
    global _logfile
    _logfile = path
    return "ion.core.log.file_observer"


def file_observer() -> FilteringLogObserver:
    """The ``twistd --logger`` factory for a container with ``--logfile``: twistd's rotating log file
    (``LogFile``, 1 MB a file), the same lines as :func:`stdout_observer` (filtered by module level,
    ``trace=<id>`` on a line logged while an op handles a message)."""
    from twisted.python.logfile import LogFile

    if _logfile is None:
        raise ConfigurationError("file_observer needs the log file's path (use_logfile)")
    return filtered_observer(text_observer(cast(IO[str], LogFile.fromFullPath(_logfile))))


# -- rate limiting ---------------------------------------------------------------------------------------
#: Seconds of one window of :class:`LogLimiter`: one line per kind per window.
LIMIT_INTERVAL: Final = 10.0
#: Kinds a :class:`LogLimiter` tracks at most; beyond, new kinds share one window.
LIMIT_MAX_KINDS: Final = 1000
_OVERFLOW: Final = ("ion.core.log", "other kinds")


@dataclass
class _Window:
    """One kind's current window: opened when its last line was logged."""

    opened: float
    suppressed: int = 0
    #: The last event not logged: (logger, level, format, fields), the example of the summary.
    sample: tuple[Logger, LogLevel, str, dict[str, Any]] | None = field(default=None, repr=False)


class LogLimiter:
    """One log line per *kind* per ``interval`` seconds, the rest counted (see the module notes).

    ``kind`` is any hashable the caller chooses, e.g. ``("bad-message", queue)``;
    choose it from what the process controls (a queue, a pid), never from what
    a peer sends (an op name, a sender), or a peer makes as many kinds as lines.
    Each line goes through the caller's own :class:`Logger` (its namespace is what
    per-module levels filter on), with the same format and fields; a summary adds
    ``ion_suppressed`` (how many) and ``ion_window`` (over how many seconds).

    :param clock: the process's clock (a ``task.Clock`` in tests).
    :param interval: seconds of a window.
    :param max_kinds: kinds tracked at most (past ones are forgotten first).
    """

    def __init__(self, clock: IReactorTime, interval: float = LIMIT_INTERVAL,
                 max_kinds: int = LIMIT_MAX_KINDS) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self.clock = clock
        self.interval = float(interval)
        self.max_kinds = max_kinds
        self._windows: dict[Hashable, _Window] = {}
        self._timer: IDelayedCall | None = None
        #: Lines not logged so far, over all kinds (for tests and stats).
        self.suppressed_total = 0

    def warn(self, logger: Logger, kind: Hashable, format: str, **fields: Any) -> bool:
        """``logger.warn(format, **fields)`` unless ``kind`` was logged in this window; True if logged."""
        return self.emit(logger, LogLevel.warn, kind, format, **fields)

    def info(self, logger: Logger, kind: Hashable, format: str, **fields: Any) -> bool:
        """Like :meth:`warn`, at info level."""
        return self.emit(logger, LogLevel.info, kind, format, **fields)

    def emit(self, logger: Logger, level: LogLevel, kind: Hashable, format: str, **fields: Any) -> bool:
        """Log ``format`` with ``fields`` at ``level`` through ``logger``, or count it (see the class)."""
        now = self.clock.seconds()
        window = self._windows.get(kind)
        if window is None and len(self._windows) >= self.max_kinds:
            self._forget_closed(now)
            if len(self._windows) >= self.max_kinds:
                kind = _OVERFLOW
                window = self._windows.get(kind)
        if window is not None and now < window.opened + self.interval:
            window.suppressed += 1
            window.sample = (logger, level, format, dict(fields))
            self.suppressed_total += 1
            self._arm()
            return False
        if window is not None and window.suppressed:
            # Its window ended and the timer has not said so yet: this line says it.
            logger.emit(level, format + " (and {ion_suppressed:,} more like it in the last {ion_window} s, "
                        "not logged)", ion_suppressed=window.suppressed,
                        ion_window=_seconds(now - window.opened), **fields)
        else:
            logger.emit(level, format, **fields)
        self._windows[kind] = _Window(now)
        return True

    def flush(self) -> int:
        """Log the count of every kind with lines not logged, now (a process ending); the number of lines."""
        return self._summarise(self.clock.seconds(), everything=True)

    def pending(self) -> int:
        """Lines counted and not yet reported."""
        return sum(w.suppressed for w in self._windows.values())

    # -- the timer ------------------------------------------------------------------------------------
    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            return
        due = min(w.opened + self.interval for w in self._windows.values() if w.suppressed)
        self._timer = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._summarise(self.clock.seconds(), everything=False)
        if any(w.suppressed for w in self._windows.values()):
            self._arm()

    def _summarise(self, now: float, *, everything: bool) -> int:
        lines = 0
        for kind, window in list(self._windows.items()):
            if not window.suppressed or (not everything and now < window.opened + self.interval):
                continue
            assert window.sample is not None
            logger, level, format, fields = window.sample
            logger.emit(level, "{ion_suppressed:,} more like this in the last {ion_window} s, not logged; "
                        "the last: " + format, ion_suppressed=window.suppressed,
                        ion_window=_seconds(now - window.opened), **fields)
            lines += 1
            # The summary is this window's line: the next window starts now.
            self._windows[kind] = _Window(now)
        if everything and self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None
        return lines

    def _forget_closed(self, now: float) -> None:
        for kind, window in list(self._windows.items()):
            if not window.suppressed and now >= window.opened + self.interval:
                del self._windows[kind]


def _seconds(elapsed: float) -> str:
    return f"{elapsed:.0f}" if elapsed >= 10 else f"{elapsed:.1f}".rstrip("0").rstrip(".")
