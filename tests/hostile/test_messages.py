"""Every hostile message of ``messages.py``, published raw to a service on the embedded broker.

Each case runs on a fresh :class:`~ion.testing.ClockedSystem` (``memory://`` broker,
time moves only when pumped): the reply code or the drop, the log line, the op never
called, and the service still ACTIVE and answering afterwards.
"""

from __future__ import annotations

from typing import Any

import pytest

from ion.core.lifecycle import State
from ion.core.messaging.transport import Properties
from ion.core.process import Process
from ion.testing import ClockedSystem
from tests.core.support import EchoService, Probe, lines
from tests.hostile.messages import CASES, MAX_MESSAGE_SIZE, PROBE, TARGET, Case, body_of, check_answer, params


def test_case_ids_are_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", params())
def test_hostile_message(case: Case, log_events: list[dict[str, Any]]) -> None:
    system = ClockedSystem(config={"ion.core.messaging": {"max_message_size": MAX_MESSAGE_SIZE}})
    svc = system.spawn(EchoService)
    assert isinstance(svc, EchoService) and svc.service_name == TARGET
    probe = Probe(system.container, PROBE)
    props = Properties(reply_to=case.reply_to, correlation_id=case.correlation_id)
    system.result(system.container.transport.publish(system.container.exchange_name, svc.resolve(TARGET),
                                                     body_of(case), props))
    system.pump()
    check_answer(case, probe.received, lines(log_events), system.container.transport.user)
    if case.expect != 200:
        assert svc.calls == []

    # Still there: ACTIVE, and a well-formed request is answered.
    assert svc.state is State.ACTIVE
    client = system.spawn(Process, name="checker")
    content, _ = system.result(client.rpc_send(svc.id, "ping", "still there?"))
    assert content["pong"] == "still there?"
    content, _ = system.result(client.rpc_send(TARGET, "echo", "and serving"))
    assert content == "and serving"
