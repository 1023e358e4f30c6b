"""Processes, services and helpers shared by the process, conversation and service tests."""

from __future__ import annotations

from typing import Any

import msgpack
from twisted.internet import defer, task
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from ion.core.exceptions import ApplicationError, IllegalStateError
from ion.core.messaging import message as wire
from ion.core.messaging.message import Performative
from ion.core.messaging.transport import Delivery, Properties
from ion.core.process import Process
from ion.core.service import ServiceProcess

#: trial's Deferred assertions (successResultOf, failureResultOf, assertNoResult), usable under pytest.
sync = SynchronousTestCase()


class EchoService(ServiceProcess):
    """A service whose ops cover the reply paths: result, error codes, slow and self-answered ops."""

    service_name = "echo"

    def slc_init(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.second_answer: list[BaseException] = []

    def op_echo(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Answer with the content."""
        self.calls.append(("echo", content))
        return content

    def op_whoami(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Answer with this instance's pid."""
        return self.id

    def op_headers(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Answer with who called: claimed user, broker user, receiver."""
        return {"user-id": headers["user-id"], "broker-user": headers["broker-user"],
                "receiver": headers["receiver"]}

    def op_conflict(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        raise ApplicationError(content or "x", 409)

    def op_boom(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        raise KeyError("boom")

    def op_slow(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Answer ``"slow done"`` after ``content`` seconds of the process's clock."""
        self.calls.append(("slow", content))
        return task.deferLater(self.clock, content, lambda: "slow done")

    def op_never(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Never answer (until the returned Deferred, kept on the process, is fired)."""
        self.pending = defer.Deferred()
        return self.pending

    def op_twice(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Answer by hand, then try to answer again."""
        self.reply_ok(msg, "first")
        try:
            self.reply_ok(msg, "second")
        except IllegalStateError as exc:
            self.second_answer.append(exc)
        return None

    def op_huge(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return "y" * int(content)

    def op_agreeable(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """request protocol: agree at once, the result follows after ``content`` seconds."""
        self.agree(msg, {"eta": content})
        return task.deferLater(self.clock, content, lambda: "agreed and done")

    def op_refuser(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """request protocol: refuse, with the code given as content (default 403)."""
        if content:
            self.refuse(msg, "not today", response_code=content)
        else:
            self.refuse(msg, "not today")

    def op_agree_twice(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        self.agree(msg)
        try:
            self.refuse(msg, "changed my mind")
        except IllegalStateError as exc:
            self.second_answer.append(exc)
        return "kept my word"


class RelayService(ServiceProcess):
    """Calls another service from inside its ops (nested RPC) and reports what came back."""

    service_name = "relay"

    async def op_relay(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Call ``content['to']`` op ``content['op']`` with ``content['arg']``; answer its result."""
        result, _ = await self.rpc_send(content["to"], content["op"], content.get("arg"),
                                        timeout=content.get("timeout"))
        return result

    def op_relay_icb(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """The same with inlineCallbacks."""

        @defer.inlineCallbacks
        def run() -> Any:
            result, _ = yield self.rpc_send(content["to"], content["op"], content.get("arg"))
            return result

        return run()

    def op_echo(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return content


class Recorder(Process):
    """A process that records its lifecycle hooks into ``spawnargs['log']``."""

    def slc_terminate(self) -> None:
        self.spawnargs["log"].append(("terminate", self.proc_name))


def no_result(d: defer.Deferred[Any]) -> None:
    """Assert that ``d`` has not fired (nor is waiting on a fired chain)."""
    sync.assertNoResult(d)


def failure_of(d: defer.Deferred[Any], *types: type[BaseException]) -> BaseException:
    """The exception ``d`` failed with (which must be one of ``types``)."""
    return sync.failureResultOf(d, *types).value


def success_of(d: defer.Deferred[Any]) -> Any:
    return sync.successResultOf(d)


def lines(events: list[dict[str, Any]]) -> list[str]:
    """The formatted text of captured log events."""
    return [formatEvent(e) for e in events]


def logged(events: list[dict[str, Any]], *fragments: str) -> list[str]:
    """The captured log lines containing every one of ``fragments``."""
    return [line for line in lines(events) if all(f in line for f in fragments)]


class Probe:
    """A raw queue on the system exchange, consumed straight off the transport.

    Stands for a foreign AMQP client: it publishes raw bodies and reads what
    is sent to its queue name.
    """

    def __init__(self, container: Any, name: str = "probe") -> None:
        self.container = container
        self.name = name
        self.received: list[dict[str, Any]] = []
        transport = container.transport
        transport.declare_queue(name)
        transport.bind(name, container.exchange_name, name)
        transport.consume(name, self._on_delivery)

    def _on_delivery(self, delivery: Delivery) -> None:
        delivery.ack()
        self.received.append(wire.decode(delivery.body))

    def publish(self, routing_key: str, body: bytes, *, reply: bool = True,
                correlation_id: str = "probe#1") -> defer.Deferred[None]:
        props = Properties(reply_to=self.name, correlation_id=correlation_id) if reply else Properties()
        return self.container.transport.publish(self.container.exchange_name, routing_key, body, props)


def raw_message(**fields: Any) -> bytes:
    """A msgpack body made of exactly ``fields``."""
    return msgpack.packb(fields, use_bin_type=True)


def request_body(receiver: str, op: str, content: Any = None, **extra: Any) -> bytes:
    """A well-formed rpc request from the probe."""
    msg = wire.build(sender="probe", sender_name="probe", receiver=receiver, op=op, content=content,
                     conv_id="probe#1", extra=extra)
    return wire.encode(msg)


__all__ = [
    "EchoService", "RelayService", "Recorder", "Probe", "Performative", "sync", "no_result", "failure_of",
    "success_of", "lines", "logged", "raw_message", "request_body",
]
