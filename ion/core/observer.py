# -*- test-case-name: tests.core.test_agent -*-
"""The observer: logs one line per message of its system (``res/apps/observer.app``).

A debugging aid. Its queue is bound with ``#`` to the system exchange (and,
with ``events: True`` in its config or spawnargs, to the events exchange),
so it sees a copy of every message. It keeps its last :data:`TAIL` lines
(``tail``: read by the web console, :mod:`ion.core.console`, and answered by
its ``tail`` op to other containers' consoles). Side effect: a request to a name nobody
consumes is no longer refused at once with a 404 (the observer's queue took
a copy), so the caller waits for its timeout instead.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, ClassVar

from twisted.logger import Logger

from ion.core.process import Process, Receiver

__all__ = ["ObserverProcess", "describe", "TAIL"]

#: Lines an observer keeps for the console.
TAIL = 200


def describe(msg: dict[str, Any], exchange: str = "") -> str:
    """One line for a message: who, to whom, which op, in which conversation."""
    status = msg.get("status")
    code = msg.get("response-code")
    tail = f" {status} {code}" if status and status != "OK" else ""
    where = f"{exchange} " if exchange else ""
    return (f"{where}{msg.get('sender-name') or '?'}({msg.get('sender')}) -> {msg.get('receiver')}: "
            f"{msg.get('op')} [{msg.get('protocol')}/{msg.get('performative')}] "
            f"conv={msg.get('conv-id')}#{msg.get('conv-seq')}{tail}")


class ObserverProcess(Process):
    """Sees every message of the system and logs one line for each."""

    name: ClassVar[str | None] = "observer"
    _log = Logger()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = 0
        #: The last :data:`TAIL` lines: ``{time, line}`` (wall-clock seconds).
        self.tail: deque[dict[str, Any]] = deque(maxlen=TAIL)

    def receivers_to_create(self) -> list[Receiver]:
        receivers = super().receivers_to_create()
        queue = f"{self.sysname}.observer.{self.id}"
        receivers.append(Receiver(self, queue, self._observe, bindings=["#"]))
        if self.get_config("events", False):
            receivers.append(Receiver(self, queue + ".events", self._observe,
                                      exchange=self.container.events_exchange, bindings=["#"]))
        return receivers

    def _observe(self, msg: dict[str, Any], receiver: Receiver) -> None:
        self.seen += 1
        exchange = "events" if receiver.exchange else ""
        line = describe(msg, exchange)
        self.tail.append({"time": time.time(), "line": line, "observer": self.id})
        self._log.info("{line}", line=line)

    def op_tail(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """The last lines seen (at most :data:`TAIL`), oldest first: ``[{time, line, observer}]``."""
        return list(self.tail)
