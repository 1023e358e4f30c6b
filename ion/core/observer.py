# -*- test-case-name: tests.core.test_agent -*-
"""The observer: logs one line per message of its system (``res/apps/observer.app``).

A debugging aid. Its queue is bound with ``#`` to the system exchange (and,
with ``events: True`` in its config or spawnargs, to the events exchange),
so it sees a copy of every message. Side effect: a request to a name nobody
consumes is no longer refused at once with a 404 (the observer's queue took
a copy), so the caller waits for its timeout instead.
"""

from __future__ import annotations

from typing import Any, ClassVar

from twisted.logger import Logger

from ion.core.process import Process, Receiver

__all__ = ["ObserverProcess", "describe"]


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
        self._log.info("{line}", line=describe(msg, exchange))
