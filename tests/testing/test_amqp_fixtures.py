"""The RabbitMQ helpers of ion.testing: broker logins made for a test."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from ion.core.messaging.amqp import AmqpTransport
from ion.core.messaging.transport import Delivery, Properties, parse_broker_url
from ion.testing.rabbitmq import BrokerLogin


def test_broker_login_url_quotes_name_password_and_vhost() -> None:
    """BrokerLogin.url is an amqp:// URL that parses back to the same login and vhost."""
    login = BrokerLogin("al ice", "p@ss/w:rd", "127.0.0.1", 5679, "ion/test")
    parsed = parse_broker_url(login.url)
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.vhost) == (
        "al ice", "p@ss/w:rd", "127.0.0.1", 5679, "ion/test")
    assert BrokerLogin("u", "p", "h", 1, "/").url == "amqp://u:p@h:1/"


@pytest.mark.amqp
@pytest_twisted.ensureDeferred
async def test_amqp_user_logs_in_on_the_test_vhost(amqp_user: Any, amqp_url: str) -> None:
    """amqp_user is a fresh non-guest user with rights on the test's vhost; what it publishes
    carries its name as the broker-validated user_id."""
    assert amqp_user.name != "guest" and amqp_user.name.startswith("ion-user-")
    assert parse_broker_url(amqp_user.url).vhost == parse_broker_url(amqp_url).vhost
    transport = AmqpTransport(amqp_user.url)
    await transport.connect()
    try:
        queue = await transport.declare_queue("", exclusive=True)
        got: defer.Deferred[Delivery] = defer.Deferred()

        def on_delivery(delivery: Delivery) -> None:
            delivery.ack()
            got.callback(delivery)

        await transport.consume(queue, on_delivery)
        await transport.publish("", queue, b"x", Properties())
        delivery = await got.addTimeout(30, reactor)
        assert delivery.properties.user_id == amqp_user.name
    finally:
        await transport.close()
