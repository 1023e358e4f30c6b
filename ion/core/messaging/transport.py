"""The transport contract: what processes may rely on, whatever carries the bytes.

A transport is one connection to a broker. It declares topic exchanges and
queues, binds them, publishes bodies with AMQP-like properties, and consumes
queues with a prefetch window and explicit ack/reject. ``memory://`` (the
embedded broker, :mod:`ion.core.messaging.memory`) and ``amqp://`` (RabbitMQ)
implement it; one contract test suite runs against both.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from twisted.internet import defer

from ion.core.exceptions import ConfigurationError

__all__ = [
    "Properties",
    "Delivery",
    "Transport",
    "ConsumeCallback",
    "ReturnCallback",
    "RefusedCallback",
    "ConnectionListener",
    "BrokerURL",
    "parse_broker_url",
    "split_broker_urls",
    "redacted_url",
]


@dataclass(slots=True)
class Properties:
    """AMQP basic properties the container uses.

    ``user_id`` is set by the publishing transport to its broker login; on
    RabbitMQ the broker validates it against the connection. ``expiration``
    is AMQP's per-message TTL: milliseconds, as a string of digits (``"15000"``);
    the broker discards the message once it has waited that long in a queue
    (it is never delivered after that), and the delivery carries it unchanged.
    """

    content_type: str = "application/msgpack"
    correlation_id: str | None = None
    reply_to: str | None = None
    message_id: str | None = None
    user_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    expiration: str | None = None


class Delivery:
    """One message handed to a consumer; ack or reject it exactly once."""

    __slots__ = ("body", "properties", "exchange", "routing_key", "redelivered", "_settle", "settled",
                 "received_at", "ack_after")

    def __init__(
        self,
        body: bytes,
        properties: Properties,
        exchange: str,
        routing_key: str,
        redelivered: bool,
        settle: Callable[[bool, bool], None] | None,
    ) -> None:
        self.body = body
        self.properties = properties
        self.exchange = exchange
        self.routing_key = routing_key
        self.redelivered = redelivered
        self._settle = settle
        #: True once acked or rejected, and from the start for an ``auto_ack`` consumer
        #: (``settle`` is None): the broker counted it acknowledged when it sent it.
        self.settled = settle is None
        #: When (the consumer's clock) it arrived, if its consumer had to keep it waiting; with
        #: ``properties.expiration`` it bounds how long its publisher may still wait for it.
        self.received_at: float | None = None
        #: What its acknowledgement waits for, if anything: the publisher confirm of its answer (a
        #: request of a quorum service queue, see ``ion.core.process.Receiver.confirm_replies``).
        self.ack_after: Any = None

    def ack(self) -> None:
        """Tell the broker the message is handled; frees one prefetch slot."""
        settle = self._settle
        if self.settled or settle is None:
            self._done(ack=True, requeue=False)  # raises
            return
        self.settled = True
        settle(True, False)

    def reject(self, requeue: bool = True) -> None:
        """Give the message back (``requeue``) or drop it."""
        self._done(ack=False, requeue=requeue)

    def _done(self, ack: bool, requeue: bool) -> None:
        if self.settled:
            from ion.core.exceptions import TransportError

            raise TransportError("delivery already acknowledged or rejected")
        self.settled = True
        assert self._settle is not None
        self._settle(ack, requeue)


ConsumeCallback = Callable[[Delivery], None]
#: Called with (exchange, routing_key, properties) for a mandatory message no queue took.
ReturnCallback = Callable[[str, str, Properties], None]
#: Called with (exchange, routing_key, properties, error) for an unconfirmed message the broker may
#: have dropped: it closed the channel the message went out on with an error (``error`` is a
#: :class:`~ion.core.exceptions.TransportError` with the broker's text and its ``reply_code``).
RefusedCallback = Callable[[str, str, Properties, Exception], None]
#: Called with ``"lost"`` (and the reason) or ``"restored"``.
ConnectionListener = Callable[[str, str | None], None]


class Transport(abc.ABC):
    """One connection to a broker.

    Every method returns a Deferred. Names follow AMQP 0-9-1: exchanges are
    ``topic`` unless said otherwise; a queue is bound to an exchange by a
    routing pattern; ``consume`` delivers at most ``prefetch`` unacknowledged
    messages to one consumer, round-robin among a queue's consumers.
    """

    #: The broker login this connection publishes as (``user_id`` property).
    user: str = "guest"

    def __init__(self) -> None:
        self._return_callbacks: list[ReturnCallback] = []
        self._refused_callbacks: list[RefusedCallback] = []
        self._connection_listeners: list[ConnectionListener] = []

    @abc.abstractmethod
    def connect(self) -> defer.Deferred[None]:
        """Open the connection; fails with a clear error if the broker refuses it."""

    @abc.abstractmethod
    def declare_exchange(self, name: str, kind: str = "topic", *, durable: bool = False,
                         auto_delete: bool = False) -> defer.Deferred[None]:
        """Create an exchange if it does not exist."""

    @abc.abstractmethod
    def declare_queue(self, name: str, *, durable: bool = False, exclusive: bool = False,
                      auto_delete: bool = False,
                      arguments: dict[str, Any] | None = None) -> defer.Deferred[str]:
        """Create a queue if it does not exist; fires with its name.

        ``arguments`` may hold ``x-single-active-consumer: True``.
        """

    @abc.abstractmethod
    def queue_depth(self, name: str) -> defer.Deferred[tuple[int, int] | None]:
        """``(messages ready, consumers)`` of queue ``name`` as the broker counts them now (on
        RabbitMQ a passive ``queue.declare``), or None when the broker has no such queue."""

    @abc.abstractmethod
    def delete_queue(self, name: str) -> defer.Deferred[None]:
        """Delete a queue and the messages in it (no error if it is gone)."""

    @abc.abstractmethod
    def bind(self, queue: str, exchange: str, routing_key: str) -> defer.Deferred[None]:
        """Route messages published to ``exchange`` matching ``routing_key`` into ``queue``."""

    @abc.abstractmethod
    def unbind(self, queue: str, exchange: str, routing_key: str) -> defer.Deferred[None]:
        """Undo :meth:`bind`."""

    #: What ``publish(confirm=None)`` means: ask the broker for a confirm, or not.
    confirm: bool = False

    @abc.abstractmethod
    def publish(self, exchange: str, routing_key: str, body: bytes, properties: Properties,
                *, mandatory: bool = False, confirm: bool | None = None) -> defer.Deferred[None]:
        """Send ``body``; a ``mandatory`` message that no queue takes is returned
        to the callbacks registered with :meth:`add_return_callback`.

        ``confirm=True``: the Deferred fires only once the broker has taken the
        message (a mandatory one it returns is handed to the return callbacks
        first), and fails with the broker's reason if it refused it.
        ``confirm=False``: it fires once the message is on its way; a broker
        that then refuses it (on RabbitMQ: closes the channel) reports it to
        the callbacks of :meth:`add_refused_callback`, with every other
        message published without a confirm that the closed channel may have
        dropped. ``None``: the transport's :attr:`confirm`. Requests and
        replies of conversations go without (the reply, or the timeout, is
        their confirmation); one-way messages that must arrive ask for one.
        A publish to an exchange that does not exist fails either way.
        """

    def publish_now(self, exchange: str, routing_key: str, body: bytes, properties: Properties,
                    *, mandatory: bool = False, confirm: bool | None = None) -> defer.Deferred[None] | None:
        """:meth:`publish`, returning None instead of a fired Deferred when the broker took the
        message at once (the embedded broker): the container's sends make no Deferred then.

        Unlike :meth:`publish`, the caller gives ``properties`` up (it made them for this one
        message): the transport may keep and stamp them instead of copying them."""
        return self.publish(exchange, routing_key, body, properties, mandatory=mandatory, confirm=confirm)

    @abc.abstractmethod
    def consume(self, queue: str, callback: ConsumeCallback, *, prefetch: int = 1,
                exclusive: bool = False, auto_ack: bool = False) -> defer.Deferred[str]:
        """Start delivering ``queue`` to ``callback``; fires with the consumer tag.

        ``auto_ack`` (AMQP ``no-ack``): the broker counts each message acknowledged
        as it sends it, so deliveries arrive settled, ``prefetch`` does not apply,
        and nothing is given back if the consumer stops or its connection drops.
        It saves a frame per message each way; use it only for a queue that no
        other consumer could take a message from anyway (a process's own queues).
        """

    @abc.abstractmethod
    def cancel(self, consumer_tag: str) -> defer.Deferred[None]:
        """Stop a consumer; its unacknowledged deliveries may still be settled."""

    @abc.abstractmethod
    def close(self) -> defer.Deferred[None]:
        """Close the connection; unacknowledged deliveries go back to their queues."""

    # -- notifications -------------------------------------------------------
    def add_return_callback(self, callback: ReturnCallback) -> None:
        """Be told of mandatory messages that could not be routed."""
        self._return_callbacks.append(callback)

    def remove_return_callback(self, callback: ReturnCallback) -> None:
        if callback in self._return_callbacks:
            self._return_callbacks.remove(callback)

    def add_refused_callback(self, callback: RefusedCallback) -> None:
        """Be told of unconfirmed messages the broker refused or dropped (see :meth:`publish`)."""
        self._refused_callbacks.append(callback)

    def remove_refused_callback(self, callback: RefusedCallback) -> None:
        if callback in self._refused_callbacks:
            self._refused_callbacks.remove(callback)

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Be told when the connection is lost and restored."""
        self._connection_listeners.append(listener)

    def remove_connection_listener(self, listener: ConnectionListener) -> None:
        if listener in self._connection_listeners:
            self._connection_listeners.remove(listener)

    def _notify_return(self, exchange: str, routing_key: str, properties: Properties) -> None:
        for cb in list(self._return_callbacks):
            cb(exchange, routing_key, properties)

    def _notify_refused(self, exchange: str, routing_key: str, properties: Properties, error: Exception) -> None:
        for cb in list(self._refused_callbacks):
            cb(exchange, routing_key, properties, error)

    def _notify_connection(self, event: str, reason: str | None = None) -> None:
        for listener in list(self._connection_listeners):
            listener(event, reason)


@dataclass(frozen=True)
class BrokerURL:
    """A parsed ``--broker`` URL: ``memory://`` or ``amqp://user:pass@host:port/vhost``."""

    scheme: str
    host: str = "localhost"
    port: int = 5672
    vhost: str = "/"
    username: str = "guest"
    password: str = ""

    def __str__(self) -> str:
        if self.scheme == "memory":
            return "memory://"
        vhost = "" if self.vhost == "/" else self.vhost
        return f"{self.scheme}://{self.username}@{self.host}:{self.port}/{vhost}"


#: Where a broker comma list splits: before each URL's scheme (a comma in a password stays).
_BROKER_LIST = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")


def split_broker_urls(values: str | Iterable[str] | None) -> list[str]:
    """The broker addresses of ``--broker`` values, each one URL or a comma list of the nodes of one
    cluster (``amqp://u:p@n1/v,amqp://u:p@n2/v``), in order."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [u.strip() for value in values for u in _BROKER_LIST.split(value) if u.strip()]


def redacted_url(url: str) -> str:
    """``url`` without its password (``user:***@host``), for output and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def parse_broker_url(url: str) -> BrokerURL:
    """Parse a broker URL; the password never appears in ``str()`` of the result.

    :raises ConfigurationError: for an unknown scheme, naming the ones known.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return BrokerURL("memory")
    if scheme not in ("amqp", "amqps"):
        raise ConfigurationError(
            f"No such transport: {parts.scheme or url!r}. Use memory:// or amqp://user:pass@host:port/vhost"
        )
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return BrokerURL(
        scheme=scheme,
        host=parts.hostname or "localhost",
        port=parts.port or (5671 if scheme == "amqps" else 5672),
        vhost=unquote(path) if path else "/",
        username=unquote(parts.username) if parts.username else "guest",
        password=unquote(parts.password) if parts.password else "guest",
    )
