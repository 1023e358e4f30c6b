"""A hostile AMQP client: plain pika, no ioncore import, a broker login of its own.

It stands for "another application of the system": a RabbitMQ user with full rights on the
vhost, but not one of the system's operators. Blocking (pika's BlockingConnection): run its
calls in a thread (``threads.deferToThread``) so the test's reactor keeps serving the containers.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import msgpack
import pika


class PlainClient:
    """One connection and reply queue; :meth:`call` publishes an ION request and reads its reply."""

    def __init__(self, url: str, sysname: str, user_id: str | None = None, queue: str = "") -> None:
        """:param user_id: the AMQP ``user_id`` property to publish with (RabbitMQ refuses one
            that is not the connection's login; without it the receiver knows no broker user).
        :param queue: the name of the reply queue (default: one the broker names)."""
        self.sysname = sysname
        self.user_id = user_id
        self.exchange = f"ion.{sysname}"
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.queue = self.channel.queue_declare(queue, exclusive=True).method.queue
        # Replies are published to the system's exchange with reply-to as routing key.
        self.channel.queue_bind(self.queue, self.exchange, self.queue)
        self._ids = itertools.count(1)

    def publish(self, routing_key: str, body: bytes, *, correlation_id: str | None = None,
                reply_to: str | None = "") -> None:
        """Publish raw ``body`` to the system exchange; ``reply_to`` ("": our queue; None: unset)."""
        props = pika.BasicProperties(content_type="application/msgpack",
                                     reply_to=self.queue if reply_to == "" else reply_to,
                                     correlation_id=correlation_id, user_id=self.user_id)
        self.channel.basic_publish(self.exchange, routing_key, body, props)

    def replies_until(self, conv: str, timeout: float = 15) -> list[dict[str, Any]]:
        """Every reply read from our queue up to and including the one of conversation ``conv``
        (a later request's, so that its arrival proves the earlier ones had their chance)."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, _props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                self.connection.process_data_events(time_limit=0.05)
                continue
            reply = msgpack.unpackb(body, raw=False)
            got.append(reply)
            if reply.get("conv-id") == conv:
                return got
        raise AssertionError(f"no reply to {conv} within {timeout} s (got {got})")

    def call(self, receiver: str, op: str, content: Any = None, headers: dict[str, Any] | None = None,
             timeout: float = 15) -> dict[str, Any] | None:
        """An rpc request to ``receiver`` (a routing key); the reply message, or None after ``timeout``.

        ``headers`` override the ION headers: a hostile client writes what it likes there.
        """
        conv = f"{self.queue}#{next(self._ids)}"
        msg = {"sender": self.queue, "reply-to": self.queue, "receiver": receiver, "op": op, "content": content,
               "conv-id": conv, "conv-seq": 1, "protocol": "rpc", "performative": "request",
               "user-id": "ANONYMOUS", **(headers or {})}
        self.publish(receiver, msgpack.packb(msg, use_bin_type=True), correlation_id=conv)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, _props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is not None:
                reply = msgpack.unpackb(body, raw=False)
                if reply.get("conv-id") == conv:
                    return reply
                continue
            self.connection.process_data_events(time_limit=0.05)
        return None

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()
