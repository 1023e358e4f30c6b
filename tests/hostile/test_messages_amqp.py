"""Every hostile message of ``messages.py``, published with plain pika to a service on RabbitMQ.

The second runner of the message corpus (the first, ``test_messages.py``, uses the embedded
broker): a foreign AMQP client logged in as a broker user of its own publishes each raw body
to ``<sys>.echo`` with the case's ``reply_to`` and ``correlation_id``, then a well-formed echo
request. The service handles its queue in order, so once that request's reply is in, every
reply the case would get has arrived: no waiting for silence. Each case checks the reply code
(or that nothing came back), the log line, that the op never ran, and that the service is
still ACTIVE and answering.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import msgpack
import pytest
import pytest_twisted
from twisted.internet import threads

from ion.core.lifecycle import State
from ion.testing import ContainerFactory, client_process
from tests.core.support import EchoService, lines
from tests.hostile.messages import MAX_MESSAGE_SIZE, PROBE, TARGET, Case, body_of, check_answer, params, request
from tests.hostile.pika_client import PlainClient

pytestmark = pytest.mark.amqp

SYS = "hostile-msg"
SENTINEL = "probe#sentinel"


def _publish_case(url: str, user: str, case: Case) -> list[dict[str, Any]]:
    """Publish the case, then a sentinel request; the replies read up to the sentinel's, less it."""
    client = PlainClient(url, SYS, user_id=user, queue=PROBE)
    try:
        client.publish(f"{SYS}.{TARGET}", body_of(case), correlation_id=case.correlation_id,
                       reply_to=case.reply_to)
        sentinel = request("echo", "sentinel", conv_id=SENTINEL, receiver=f"{SYS}.{TARGET}")
        client.publish(f"{SYS}.{TARGET}", msgpack.packb(sentinel, use_bin_type=True), correlation_id=SENTINEL)
        replies = client.replies_until(SENTINEL)
    finally:
        client.close()
    assert replies[-1]["status"] == "OK" and replies[-1]["content"] == "sentinel"
    return replies[:-1]


@pytest.mark.parametrize("case", params())
@pytest_twisted.ensureDeferred
async def test_hostile_message_over_rabbitmq(case: Case, rabbitmq: Any, amqp_url: str, amqp_user: Any,
                                             tmp_path: Path, log_events: list[dict[str, Any]]) -> None:
    factory = ContainerFactory(broker_url=amqp_url)
    try:
        container = await factory(sysname=SYS, config={"ion.core.messaging": {"max_message_size": MAX_MESSAGE_SIZE}})
        await container.spawn(EchoService)
        svc = container.proc_manager.find(TARGET)
        assert isinstance(svc, EchoService)
        vhost = unquote(urlsplit(amqp_url).path.lstrip("/")) or "/"
        url = rabbitmq.url(vhost, amqp_user.name, amqp_user.password)
        received = await threads.deferToThread(_publish_case, url, amqp_user.name, case)
        check_answer(case, received, lines(log_events), amqp_user.name)
        if case.expect != 200:
            assert svc.calls == [("echo", "sentinel")], svc.calls  # only the well-formed request ran
        assert svc.state is State.ACTIVE
        checker = await client_process(container)
        content, _ = await checker.rpc_send(svc.id, "ping", "still there?")
        assert content["pong"] == "still there?"
    finally:
        await factory.teardown()
