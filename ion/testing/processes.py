"""A child OS process whose output a test (or a benchmark) waits on, without sleeping.

``wait_for(text)`` fires once the output holds ``text``; it fails, with the
end of the output, on a timeout or when the child exits first. ``stop()``
sends SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.error import ProcessExitedAlready

__all__ = ["WatchedProcess", "in_forked_child"]


def in_forked_child(fn: Callable[[], str], limit: int = 4096) -> str:
    """What ``fn()`` returns when run in a forked child of this process (at most ``limit`` bytes of
    it, sent back through a pipe): for what a fork must not share with its parent (random pools)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(w, fn().encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        return os.read(r, limit).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)


class WatchedProcess(protocol.ProcessProtocol):
    """A child process whose output is kept; ``wait_for(text)`` fires once a line holds ``text``."""

    def __init__(self, name: str = "child") -> None:
        self.name = name
        self.output = b""
        self.waiting: list[tuple[bytes, defer.Deferred[None]]] = []
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.exit_code: int | None = None

    def outReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self._got(data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self._got(data)

    def _got(self, data: bytes) -> None:
        self.output += data
        for item in list(self.waiting):
            if item[0] in self.output:
                self.waiting.remove(item)
                item[1].callback(None)

    def wait_for(self, text: bytes, timeout: float = 60) -> defer.Deferred[None]:
        """Fire once the output holds ``text``; fail if the child exits first or ``timeout`` passes."""
        from twisted.internet import reactor

        d: defer.Deferred[None] = defer.Deferred()
        if text in self.output:
            d.callback(None)
            return d
        if self.exit_code is not None:
            d.errback(RuntimeError(f"{self.name} exited ({self.exit_code}); its output:\n{self.tail()}"))
            return d
        self.waiting.append((text, d))

        def timed_out(f: Any) -> Any:
            if f.check(defer.TimeoutError):
                raise RuntimeError(f"{self.name} did not print {text.decode()!r} within {timeout:g} s; "
                                   f"its output:\n{self.tail()}")
            return f

        return d.addTimeout(timeout, reactor).addErrback(timed_out)

    def processEnded(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        value = reason.value
        self.exit_code = value.exitCode if value.exitCode is not None else -(value.signal or 0)
        for _text, d in self.waiting:
            d.errback(RuntimeError(f"{self.name} exited ({self.exit_code}); its output:\n{self.tail()}"))
        self.waiting = []
        self.ended.callback(self.exit_code)

    def tail(self, n: int = 3000) -> str:
        return self.output.decode(errors="replace")[-n:]

    @defer.inlineCallbacks
    def stop(self, timeout: float = 30) -> Any:
        """SIGTERM, then SIGKILL if it has not ended within ``timeout`` seconds."""
        from twisted.internet import reactor

        if self.exit_code is not None:
            return self.exit_code
        if self.transport is not None:
            try:
                self.transport.signalProcess("TERM")
            except ProcessExitedAlready:
                pass
        timer = reactor.callLater(timeout, self._kill)
        code = yield self.ended
        if timer.active():
            timer.cancel()
        return code

    def _kill(self) -> None:
        if self.transport is not None:
            try:
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
