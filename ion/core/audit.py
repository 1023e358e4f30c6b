# -*- test-case-name: tests.core.test_audit -*-
"""The audit trail of actions that change the system (DESIGN §10).

Every control operation (:func:`ion.core.security.control`) and every op
marked :func:`audited` (a deploy) is recorded where it runs, once its
outcome is known — allowed and done, failed, or refused (403) — as one JSON
object:

``time`` (UTC, ISO 8601), ``container``, ``system``, ``user`` (the message's
``broker-user``: the identity the broker validated; ``null`` when it has
none), ``claimed_user`` (the ``user-id`` header the caller wrote, for the
record only), ``sender`` and ``sender_name`` (claims too), ``action``, ``target`` (process name and pid),
``op``, ``args`` (the request's content as JSON, cut to 1,000 characters),
``result`` (``ok``, ``error`` or ``refused``), ``code`` (200, or the error
reply's code) and ``error`` (its message, cut).

Each record is

* published as an event ``control.<action>`` on the system's events
  exchange, so one observer sees the actions of the whole system;
* logged at info level;
* appended to the audit file (JSON lines) when ``ion.core.audit: path`` is
  set in the container's own config (``twistd cc`` sets it beside its log
  file, or to ``ion-audit.jsonl`` in its working folder when it logs to
  the terminal). The file is opened append-only, without following a
  symlink, readable by its owner only (made so if it existed), never a FIFO
  or device; lines are written whole and in order, off the reactor thread;
  lines a failed write left are written before the next record.

Actions the system's own services take on its cache for every fetch (lock,
publish, staging, unpack) are control operations but not audited:
:func:`control` ``(..., audited=False)``.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core.config import Settings

if TYPE_CHECKING:
    from ion.core.container import Container

__all__ = ["AuditSettings", "AuditLog", "audited", "ARGS_LIMIT"]

#: Characters of a request's content (as JSON) and of an error kept in a record.
ARGS_LIMIT = 1000

F = TypeVar("F", bound=Callable[..., Any])

@dataclass(frozen=True)
class AuditSettings(Settings):
    """``ion.core.audit`` (read from the container's own layers).

    :ivar path: the audit file (JSON lines); None: records are published and logged only.
    """

    SECTION: ClassVar[str] = "ion.core.audit"

    path: str | None = None


def audited(action: str) -> Callable[[F], F]:
    """Record each call of an ``op_*`` method that is not a control operation (e.g. ``"deploy.run"``)."""

    from ion.core.security import AUDITED_ATTR

    def mark(op: F) -> F:
        setattr(op, AUDITED_ATTR, action)
        return op

    return mark


def _cut(text: str) -> str:
    return text if len(text) <= ARGS_LIMIT else text[:ARGS_LIMIT] + f"... ({len(text) - ARGS_LIMIT} more)"


def _args(content: Any) -> str:
    if hasattr(content, "DESCRIPTOR"):  # a protobuf message
        from google.protobuf.json_format import MessageToJson

        text = f"{content.DESCRIPTOR.full_name} {MessageToJson(content, indent=None)}"
    else:
        text = json.dumps(content, default=repr, sort_keys=True, ensure_ascii=False)
    return _cut(text)


#: Lines kept for a later attempt when the audit file cannot be written (the oldest dropped beyond).
MAX_UNWRITTEN = 10_000


def _open_append(path: str) -> int:
    """The audit file, opened to append: never through a symlink, never a FIFO or device (it could
    block a pool thread for good), and readable by its owner only, even if it existed."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"the audit file {path} is not a regular file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class AuditLog:
    """Records a container's audited actions (see the module notes)."""

    _log = Logger()

    def __init__(self, container: Container) -> None:
        self.container = container
        self._fd: int | None = None
        self._path: str | None = None
        self._last: defer.Deferred[None] = defer.succeed(None)
        #: Lines a failed write left (written before the next one; see ``_write_blocking``).
        self._unwritten: list[bytes] = []
        #: Records dropped because the file could not be written for too long (logged).
        self.lost = 0

    @property
    def path(self) -> str | None:
        config = self.container.config
        settings = AuditSettings.from_config(
            lambda key, default: config.container_get(AuditSettings.SECTION, key, default))
        return settings.path

    def watch(self, result: Any, msg: Mapping[str, Any], action: str, target: str) -> Any:
        """Record the outcome of ``result`` (an op's value, Deferred or Failure) once known; hand it on."""
        if isinstance(result, defer.Deferred):
            def done(value: Any) -> Any:
                self.record(msg, action, target, value if isinstance(value, Failure) else None)
                return value

            return result.addBoth(done)
        self.record(msg, action, target, result if isinstance(result, Failure) else None)
        return result

    def record(self, msg: Mapping[str, Any], action: str, target: str, failure: Failure | None = None) -> dict[str, Any]:
        """Record one action: allowed and done (``failure`` None), or failed/refused."""
        from ion.core.security import UnauthorizedError

        c = self.container
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
            "container": c.id, "system": c.sysname, "user": msg.get("broker-user"),
            "claimed_user": msg.get("user-id"), "sender": msg.get("sender"),
            "sender_name": msg.get("sender-name"), "action": action, "target": target,
            "op": msg.get("op"), "args": _args(msg.get("content")), "result": "ok", "code": 200, "error": None,
        }
        if failure is not None:
            exc = failure.value
            code = getattr(exc, "code", None)
            entry.update(result="refused" if isinstance(exc, UnauthorizedError) else "error",
                         code=code if isinstance(code, int) else 500,
                         error=_cut(f"{type(exc).__name__}: {exc}"))
        self._log.info("audit: {user!r} {action} on {target}: {result} {code}", user=entry["user"], action=action,
                       target=target, result=entry["result"], code=entry["code"])
        c.publish_event(f"control.{action}", entry)
        path = self.path
        if path:
            self._append(path, entry)
        return entry

    def _append(self, path: str, entry: Mapping[str, Any]) -> None:
        line = (json.dumps(entry, ensure_ascii=False, default=repr) + "\n").encode()

        def write(_: Any) -> defer.Deferred[None]:
            return self.container.blocking.run(self._write_blocking, path, line)

        def failed(f: Failure) -> None:
            self._log.error("audit record not written to {path}: {e}", path=path, e=f.getErrorMessage())

        # Chained: the records reach the file in the order of the actions.
        self._last = self._last.addCallback(write).addErrback(failed)

    def _write_blocking(self, path: str, line: bytes) -> None:
        """Append ``line`` (and any line a failed write left), in order; raises on failure, keeping
        the lines not written for the next attempt (at most :data:`MAX_UNWRITTEN`)."""
        self._unwritten.append(line)
        if len(self._unwritten) > MAX_UNWRITTEN:
            lost = len(self._unwritten) - MAX_UNWRITTEN
            del self._unwritten[:lost]
            self.lost += lost
            self._log.error("{n} audit records lost: the audit file {path} could not be written for "
                            "{max} records", n=lost, path=path, max=MAX_UNWRITTEN)
        if self._fd is None or self._path != path:
            self.close()
            self._fd = _open_append(path)
            self._path = path
        while self._unwritten:
            data = memoryview(self._unwritten[0])
            try:
                while data:  # one write of one line on an O_APPEND file: lines never interleave
                    data = data[os.write(self._fd, data):]
            finally:
                if data:  # a short write, then an error: the rest (not the whole line) is left
                    self._unwritten[0] = bytes(data)
            self._unwritten.pop(0)

    def flush(self) -> defer.Deferred[None]:
        """Fires once every record asked for so far is written (or its failure logged)."""
        d: defer.Deferred[None] = defer.Deferred()
        self._last.addBoth(lambda _: d.callback(None))
        return d

    def stop(self) -> defer.Deferred[None]:
        """Write what is pending, then close the file (closing a local file does not block); records
        that still could not be written are counted in a log line, never dropped unsaid."""
        def close(_: Any) -> None:
            if self._unwritten:
                self._log.error("{n} audit records not written to {path} at stop", n=len(self._unwritten),
                                path=self._path or self.path)
            self.close()

        return self.flush().addCallback(close)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
