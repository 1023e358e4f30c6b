"""Conversations (DESIGN §6): rpc, request and generic protocols, timeouts, late replies, clean-up.

Everything here runs on a :class:`~ion.testing.ClockedSystem`: messages move
only when the test pumps, and timeouts fire only when it advances the clock.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, task

from ion.core.conversation import ConversationTable
from ion.core.exceptions import (
    ConversationError,
    ConversationTimeout,
    IllegalStateError,
    ReceivedApplicationError,
    ReceivedContainerError,
    ReceivedError,
    TransportError,
)
from ion.core.lifecycle import State
from ion.core.messaging.message import Performative, Protocol
from ion.core.process import Process
from ion.core.service import ServiceProcess
from ion.testing import ClockedSystem

from .support import EchoService, failure_of, logged, no_result, success_of


def _echo_and_client(system: ClockedSystem) -> tuple[EchoService, Process]:
    svc = system.spawn(EchoService)
    client = system.spawn(Process, name="client")
    assert isinstance(svc, EchoService)
    return svc, client


# -- rpc: answers --------------------------------------------------------------------------------


def test_rpc_ok_content_and_headers(system: ClockedSystem) -> None:
    """A successful rpc fires with the op's result and an inform_result reply: OK, 200, conv-seq 2."""
    svc, client = _echo_and_client(system)
    content, headers = system.result(client.rpc_send("echo", "echo", {"a": [1, 2]}))
    assert content == {"a": [1, 2]}
    assert headers["status"] == "OK"
    assert headers["response-code"] == 200
    assert headers["conv-seq"] == 2
    assert headers["performative"] == Performative.INFORM_RESULT
    assert headers["protocol"] == Protocol.RPC
    assert headers["conv-id"] == f"{client.id}#1"
    assert headers["sender"] == svc.id
    assert headers["receiver"] == client.backend_name


def test_rpc_application_error_keeps_code_and_message(system: ClockedSystem) -> None:
    """An op raising ApplicationError('x', 409) fails the caller with a 409 ReceivedApplicationError."""
    svc, client = _echo_and_client(system)
    d = client.rpc_send("echo", "conflict", "x")
    system.pump()
    err = failure_of(d, ReceivedApplicationError)
    assert isinstance(err, ReceivedApplicationError)
    assert err.response_code == 409
    assert err.message == "x"
    assert err.remote_error == "ApplicationError"
    assert err.headers["status"] == "ERROR"
    assert err.headers["performative"] == Performative.FAILURE
    assert svc.state is State.ACTIVE


def test_rpc_other_exception_is_container_error_500(system: ClockedSystem,
                                                     log_events: list[dict[str, Any]]) -> None:
    """Any other exception in an op is a 500 ReceivedContainerError naming the exception class."""
    svc, client = _echo_and_client(system)
    d = client.rpc_send("echo", "boom")
    system.pump()
    err = failure_of(d, ReceivedContainerError)
    assert isinstance(err, ReceivedContainerError)
    assert err.response_code == 500
    assert err.content["error"] == "KeyError"
    assert "boom" in err.message
    assert svc.state is State.ACTIVE
    assert logged(log_events, "'boom'", "failed", client.backend_name)


def test_rpc_unknown_op_is_404_and_leaves_no_conversation(system: ClockedSystem) -> None:
    """An unknown op answers 404 UnknownOperation and the responder keeps no conversation for it."""
    svc, client = _echo_and_client(system)
    d = client.rpc_send("echo", "no_such_op")
    system.pump()
    err = failure_of(d, ReceivedApplicationError)
    assert isinstance(err, ReceivedApplicationError)
    assert err.response_code == 404
    assert err.remote_error == "UnknownOperation"
    assert "no_such_op" in err.message
    assert len(svc.conversations) == 0
    assert len(client.conversations) == 0


def test_rpc_to_unbound_name_fails_promptly_with_404(system: ClockedSystem) -> None:
    """An rpc to a name no queue is bound to fails with a 404 ConversationError without any timeout."""
    client = system.spawn(Process)
    d = client.rpc_send("nobody", "anything", timeout=60)
    system.pump()  # no time passes
    err = failure_of(d, ConversationError)
    assert isinstance(err, ConversationError)
    assert not isinstance(err, ConversationTimeout)
    assert err.response_code == 404
    assert "clocked.nobody" in err.message
    assert len(client.conversations) == 0


def test_rpc_result_that_cannot_be_encoded_becomes_500(system: ClockedSystem) -> None:
    """An op result msgpack cannot carry is answered as a 500 error, not a lost reply."""

    class Odd(ServiceProcess):
        service_name = "odd"

        def op_obj(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
            return object()

    svc = system.spawn(Odd)
    client = system.spawn(Process)
    d = client.rpc_send("odd", "obj")
    system.pump()
    err = failure_of(d, ReceivedContainerError)
    assert isinstance(err, ReceivedContainerError)
    assert err.remote_error == "MessageError"
    assert svc.state is State.ACTIVE
    assert len(svc.conversations) == 0


# -- rpc: timeouts and late replies ------------------------------------------------------------------


def test_rpc_timeout_default_comes_from_config() -> None:
    """With no timeout given, ion.core.process.rpc_timeout bounds the wait: nothing before, 408 after."""
    system = ClockedSystem(config={"ion.core.process": {"rpc_timeout": 3}})
    _svc, client = _echo_and_client(system)
    d = client.rpc_send("echo", "never")
    system.advance(2.9)
    no_result(d)
    system.advance(0.2)
    err = failure_of(d, ConversationTimeout)
    assert isinstance(err, ConversationTimeout)
    assert err.response_code == 408
    assert "within 3 s" in err.message
    assert len(client.conversations) == 0


def test_rpc_explicit_timeout_overrides_config(system: ClockedSystem) -> None:
    """A timeout given to rpc_send wins over the configured default (15 s)."""
    _svc, client = _echo_and_client(system)
    d = client.rpc_send("echo", "never", timeout=1)
    system.advance(0.5)
    no_result(d)
    system.advance(0.6)
    failure_of(d, ConversationTimeout)


def test_late_reply_is_logged_and_dropped(system: ClockedSystem, log_events: list[dict[str, Any]]) -> None:
    """A reply after the caller timed out is counted, logged with its sender and dropped; calls go on."""
    svc, client = _echo_and_client(system)
    d = client.rpc_send("echo", "slow", 2, timeout=1)
    system.pump()  # the op starts at t=0
    system.advance(1)
    failure_of(d, ConversationTimeout)
    assert client.conversations.late_messages == 0
    system.advance(1)  # the op answers now
    assert client.conversations.late_messages == 1
    assert logged(log_events, "late inform_result", svc.id)
    content, _ = system.result(client.rpc_send("echo", "echo", "still fine"))
    assert content == "still fine"
    assert svc.state is State.ACTIVE and client.state is State.ACTIVE
    assert len(svc.conversations) == 0 and len(client.conversations) == 0


def test_cancelled_rpc_is_collected_and_its_reply_dropped(system: ClockedSystem) -> None:
    """Cancelling an rpc's Deferred ends the conversation; its reply later counts as late."""
    _svc, client = _echo_and_client(system)
    d = client.rpc_send("echo", "slow", 1)
    system.pump()
    d.cancel()
    failure_of(d, defer.CancelledError)
    assert len(client.conversations) == 0
    system.advance(1)
    assert client.conversations.late_messages == 1


def test_no_conversation_left_after_1000_sequential_calls(system: ClockedSystem) -> None:
    """1,000 rpcs one after the other leave both the caller's and the responder's tables empty."""
    svc, client = _echo_and_client(system)
    for i in range(1000):
        content, _ = system.result(client.rpc_send("echo", "echo", i))
        assert content == i
    assert len(client.conversations) == 0
    assert len(svc.conversations) == 0
    assert client.conversations.late_messages == 0


def test_no_conversation_left_after_1000_timed_out_calls(system: ClockedSystem) -> None:
    """1,000 rpcs that time out leave both tables empty; every reply that comes is counted late.

    Each op takes 2 s and each caller waits 1 s: a request that waited out its caller's
    timeout behind the op in hand is dropped, never run (#14); the others are answered late.
    """
    svc, client = _echo_and_client(system)
    for _ in range(1000):
        d = client.rpc_send("echo", "slow", 2, timeout=1)
        system.advance(1)
        failure_of(d, ConversationTimeout)
    for _ in range(2000):  # let the responder work through the backlog
        if not svc.conversations.responding and not any(r.buffered or r.inflight for r in svc.receivers):
            break
        system.advance(1)
    system.pump()
    assert len(client.conversations) == 0
    assert len(svc.conversations) == 0
    assert 0 < len(svc.calls) < 1000
    assert client.conversations.late_messages == len(svc.calls)


def test_100_concurrent_rpcs_pair_replies_with_calls(system: ClockedSystem) -> None:
    """100 rpcs in flight at once from one process all succeed, each with its own reply."""
    svc, client = _echo_and_client(system)
    ds = [client.rpc_send("echo", "echo", {"n": i}) for i in range(100)]
    assert len(client.conversations.initiated) == 100
    results = system.result(defer.gatherResults(ds))
    assert [content for content, _ in results] == [{"n": i} for i in range(100)]
    assert [headers["conv-id"] for _, headers in results] == [f"{client.id}#{i + 1}" for i in range(100)]
    assert len(client.conversations) == 0 and len(svc.conversations) == 0


# -- request protocol ------------------------------------------------------------------------------------


def test_request_agree_then_result(system: ClockedSystem) -> None:
    """request(): the agree reaches on_agree first, the result fires the Deferred later."""
    _svc, client = _echo_and_client(system)
    agreed: list[tuple[Any, dict[str, Any]]] = []
    d = client.request("echo", "agreeable", 2, on_agree=lambda content, headers: agreed.append((content, headers)))
    system.pump()
    assert [content for content, _ in agreed] == [{"eta": 2}]
    assert agreed[0][1]["performative"] == Performative.AGREE
    assert agreed[0][1]["conv-seq"] == 2
    no_result(d)
    system.advance(2)
    content, headers = success_of(d)
    assert content == "agreed and done"
    assert headers["performative"] == Performative.INFORM_RESULT
    assert headers["protocol"] == Protocol.REQUEST
    assert headers["conv-seq"] == 3
    assert len(client.conversations) == 0


def test_request_refused_is_403(system: ClockedSystem) -> None:
    """A refuse fails the request with a 403 ReceivedApplicationError carrying the reason."""
    svc, client = _echo_and_client(system)
    agreed: list[Any] = []
    d = client.request("echo", "refuser", on_agree=lambda c, h: agreed.append(c))
    system.pump()
    err = failure_of(d, ReceivedApplicationError)
    assert isinstance(err, ReceivedApplicationError)
    assert err.response_code == 403
    assert err.message == "not today"
    assert err.headers["performative"] == Performative.REFUSE
    assert agreed == []
    assert len(svc.conversations) == 0 and len(client.conversations) == 0


def test_request_refused_with_given_code(system: ClockedSystem) -> None:
    """A refuse with its own 4xx code reaches the caller with that code."""
    _svc, client = _echo_and_client(system)
    d = client.request("echo", "refuser", 401)
    system.pump()
    err = failure_of(d, ReceivedApplicationError)
    assert isinstance(err, ReceivedApplicationError)
    assert err.response_code == 401


def test_request_times_out_after_agree(system: ClockedSystem) -> None:
    """An agreed request whose result never comes ends in a 408 timeout."""
    _svc, client = _echo_and_client(system)
    agreed: list[Any] = []
    d = client.request("echo", "agreeable", 100, timeout=5, on_agree=lambda c, h: agreed.append(c))
    system.advance(4)
    assert agreed == [{"eta": 100}]
    no_result(d)
    system.advance(1)
    failure_of(d, ConversationTimeout)


def test_answering_twice_raises_illegal_state_at_responder(system: ClockedSystem) -> None:
    """A second answer to one rpc raises IllegalStateError at the responder; the caller sees the first."""
    svc, client = _echo_and_client(system)
    content, _ = system.result(client.rpc_send("echo", "twice"))
    assert content == "first"
    assert len(svc.second_answer) == 1
    assert isinstance(svc.second_answer[0], IllegalStateError)
    system.pump()
    assert client.conversations.late_messages == 0  # the second answer was never sent


def test_refuse_after_agree_raises_illegal_state(system: ClockedSystem) -> None:
    """After agreeing, the responder cannot refuse; the result still follows."""
    svc, client = _echo_and_client(system)
    content, _ = system.result(client.request("echo", "agree_twice"))
    assert content == "kept my word"
    assert isinstance(svc.second_answer[0], IllegalStateError)


def test_agree_in_an_rpc_is_illegal(system: ClockedSystem) -> None:
    """agree() belongs to the request protocol; in an rpc it fails the op (500 IllegalStateError)."""
    _svc, client = _echo_and_client(system)
    d = client.rpc_send("echo", "agreeable", 1)
    system.pump()
    err = failure_of(d, ReceivedContainerError)
    assert isinstance(err, ReceivedContainerError)
    assert err.remote_error == "IllegalStateError"


def test_reply_after_the_op_ended_raises(system: ClockedSystem) -> None:
    """Once an op's result has been sent, replying to that request again raises IllegalStateError."""
    client = system.spawn(Process)
    kept: list[dict[str, Any]] = []

    class Keeper(ServiceProcess):
        service_name = "keeper"

        def op_keep(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
            kept.append(msg)
            return "done"

    keeper = system.spawn(Keeper)
    system.result(client.rpc_send("keeper", "keep"))
    with pytest.raises(IllegalStateError):
        keeper.reply_ok(kept[0], "again")


# -- generic protocol --------------------------------------------------------------------------------------


class ChatService(ServiceProcess):
    """Answers each ``chat`` message in a generic conversation with content + 1."""

    service_name = "chat"

    def slc_init(self) -> None:
        self.seen: list[tuple[str, Any, int]] = []
        self.ended: list[Any] = []

    def op_chat(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        self.seen.append((headers["receiver"], content, headers["conv-seq"]))
        if content == "stop":
            return self.reply_ok(msg, "stopped")
        return self.reply(msg, "chat", content + 1, performative=Performative.INFORM)

    def op_end(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        self.ended.append(content)


def test_converse_exchanges_several_messages_then_end(system: ClockedSystem) -> None:
    """converse(): the handler gets every answer, later messages go to the answering pid, end() ends it."""
    chat = system.spawn(ChatService)
    client = system.spawn(Process)
    got: list[tuple[Any, int]] = []

    def handler(conv: Any, content: Any, headers: dict[str, Any]) -> None:
        got.append((content, headers["conv-seq"]))
        if content < 5:
            conv.send("chat", content + 1)
        else:
            conv.end("bye")

    conv = client.converse("chat", "chat", 0, handler=handler)
    system.pump()
    assert got == [(1, 2), (3, 4), (5, 6)]
    assert chat.seen == [("clocked.chat", 0, 1), (chat.id, 2, 3), (chat.id, 4, 5)]
    assert conv.state == "ENDED"
    assert success_of(conv.deferred) == (None, {})
    assert chat.ended == ["bye"]
    assert len(client.conversations) == 0 and len(chat.conversations) == 0
    assert chat.conversations.late_messages == 0


def test_converse_sticks_to_the_instance_that_answered(system: ClockedSystem) -> None:
    """With two instances of a service, every message after the first goes to the one that answered."""
    first = system.spawn(ChatService)
    second = system.spawn(ChatService)
    client = system.spawn(Process)
    convs = []
    for _ in range(2):
        def handler(conv: Any, content: Any, headers: dict[str, Any]) -> None:
            if content < 7:
                conv.send("chat", content + 1)
            else:
                conv.end()

        convs.append(client.converse("chat", "chat", 0, handler=handler))
    system.pump()
    for chat in (first, second):
        # each instance served one whole conversation: its first message by name, the rest by pid
        assert [receiver for receiver, _, _ in chat.seen] == ["clocked.chat"] + [chat.id] * 3
    assert all(c.state == "ENDED" for c in convs)


def test_converse_ended_by_the_responder(system: ClockedSystem) -> None:
    """A final inform_result from the peer ends the conversation; the handler and Deferred see it."""
    system.spawn(ChatService)
    client = system.spawn(Process)
    got: list[Any] = []
    conv = client.converse("chat", "chat", "stop", handler=lambda c, content, h: got.append(content))
    content, headers = system.result(conv.deferred)
    assert content == "stopped"
    assert headers["performative"] == Performative.INFORM_RESULT
    assert got == ["stopped"]
    with pytest.raises(IllegalStateError):
        conv.send("chat", 1)


def test_converse_ends_by_idle_timeout(system: ClockedSystem) -> None:
    """A generic conversation with no message for idle_timeout seconds fails with a timeout."""
    system.spawn(ChatService)
    client = system.spawn(Process)
    got: list[Any] = []
    conv = client.converse("chat", "chat", 0, handler=lambda c, content, h: got.append(content), idle_timeout=5)
    system.pump()
    assert got == [1]
    system.advance(4)
    conv.send("chat", 10)  # activity (ours, then the answer) restarts the idle timer
    system.pump()
    system.advance(4)
    assert got == [1, 11]
    no_result(conv.deferred)
    system.advance(1.1)
    failure_of(conv.deferred, ConversationTimeout)
    assert conv.state == "TIMEOUT"
    assert len(client.conversations) == 0


def test_only_generic_conversations_send_more(system: ClockedSystem) -> None:
    """Conversation.send on an rpc conversation raises IllegalStateError."""
    _svc, client = _echo_and_client(system)
    conv = client._start(Protocol.RPC, "echo", "echo", 1, None, None)
    with pytest.raises(IllegalStateError):
        conv.send("echo", 2)
    system.result(conv.deferred)


# -- the machine itself ----------------------------------------------------------------------------------


class _FakeProcess:
    id = "fake.1"


def test_unexpected_event_is_logged_and_ignored(log_events: list[dict[str, Any]]) -> None:
    """An event the protocol does not allow (agree in an rpc) leaves the state as it was and is logged."""
    clock = task.Clock()
    table = ConversationTable(_FakeProcess(), clock)
    conv = table.start(Protocol.RPC, "x.y", "op", 10)
    conv.event(Performative.AGREE, {"sender": "intruder.7", "content": None})
    assert conv.state == "REQUESTED"
    assert logged(log_events, "unexpected", "intruder.7")
    no_result(conv.deferred)
    clock.advance(10)
    failure_of(conv.deferred, ConversationTimeout)


def test_events_after_the_end_change_nothing() -> None:
    """After a final state, further events (a late timeout, a reply) neither change nor refire it."""
    clock = task.Clock()
    table = ConversationTable(_FakeProcess(), clock)
    conv = table.start(Protocol.RPC, "x.y", "op", 10)
    conv.event(Performative.INFORM_RESULT, {"content": 1})
    assert success_of(conv.deferred) == (1, {"content": 1})
    conv.event("timeout")
    conv.event(Performative.FAILURE, {"response-code": 500})
    assert conv.state == "DONE"
    assert len(table) == 0
    # The table's timer stays armed after the last call (cheaper than a timer per call): it fires
    # once, for nothing, and is not armed again.
    clock.advance(10)
    assert conv.state == "DONE" and not clock.getDelayedCalls()


def test_emptied_timeouts_are_kept_for_the_next_call_and_dropped_by_the_timer() -> None:
    """A timeout's set of waiting calls is kept when its last call ends (the next call with it needs
    one), a few at most: a caller with a new timeout per call does not grow the table; the timer drops
    those still empty when it fires, and then is not armed again; the calls still time out."""
    clock = task.Clock()
    table = ConversationTable(_FakeProcess(), clock)
    for i in range(50):  # a new timeout per call
        conv = table.start(Protocol.RPC, "x.y", "op", 10 + i / 100)
        conv.event(Performative.INFORM_RESULT, {"content": i})
    assert len(table) == 0
    assert 0 < len(table._waiting) <= 8 and not any(table._waiting.values())
    clock.advance(11)  # the timer, armed by the first call, fires for nothing
    assert table._waiting == {} and not clock.getDelayedCalls()
    # A call after that, with one of those timeouts, is timed out as ever.
    late = table.start(Protocol.RPC, "x.y", "op", 10)
    clock.advance(10)
    failure_of(late.deferred, ConversationTimeout)
    assert len(table) == 0 and table._waiting == {} and not clock.getDelayedCalls()


def test_fail_all_ends_every_open_conversation() -> None:
    """fail_all errs every open conversation with ConversationError and empties the table."""
    table = ConversationTable(_FakeProcess(), task.Clock())
    convs = [table.start(Protocol.RPC, "x.y", "op", 10) for _ in range(3)]
    table.fail_all("going away")
    for conv in convs:
        err = failure_of(conv.deferred, ConversationError)
        assert isinstance(err, ReceivedError)
        assert err.message == "going away"
    assert len(table) == 0


# -- publisher confirms ---------------------------------------------------------------------------------
def test_requests_and_replies_ask_for_no_confirm_one_way_sends_choose(system: ClockedSystem,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """rpc and request messages, and their replies, are published with ``confirm=False`` (the
    reply or the timeout confirms them); a one-way send passes its ``confirm`` through (None:
    the transport's default, ``publisher_confirms``)."""
    svc, client = _echo_and_client(system)
    transport = system.container.transport
    seen: list[tuple[str, bool | None]] = []
    real_publish = transport.publish_now  # (the process's sends: publish, without a Deferred when taken at once)

    def publish_now(exchange: str, routing_key: str, body: bytes, properties: Any, *, mandatory: bool = False,
                    confirm: bool | None = None) -> Any:
        seen.append((routing_key, confirm))
        return real_publish(exchange, routing_key, body, properties, mandatory=mandatory, confirm=confirm)

    monkeypatch.setattr(transport, "publish_now", publish_now)
    system.result(client.rpc_send("echo", "echo", 1))
    system.result(client.request("echo", "echo", 2))
    confirmed = client.send("echo", "echo", 3, confirm=True)
    no_result(confirmed)  # the embedded broker confirms from its pump, as a broker's ack arrives
    success_of(client.send("echo", "echo", 4))
    system.pump()
    success_of(confirmed)
    assert seen == [("clocked.echo", False), (client.backend_name, False),
                    ("clocked.echo", False), (client.backend_name, False),
                    ("clocked.echo", True), ("clocked.echo", None)]


def test_a_message_the_broker_refused_fails_its_call_at_once(system: ClockedSystem) -> None:
    """When the transport reports a request refused (an unconfirmed message on a channel the broker
    closed with an error), its call fails at once with the broker's code and text, not at its
    timeout; the reply that may still come is dropped as late."""
    from ion.core.messaging.transport import Properties

    svc, client = _echo_and_client(system)
    d = client.rpc_send("echo", "echo", 1, timeout=60)
    conv_id = f"{client.id}#1"
    error = TransportError("PRECONDITION_FAILED - user_id property set to 'x' but authenticated user was 'y'")
    error.reply_code = 406  # type: ignore[attr-defined]
    system.container.transport._notify_refused(system.container.exchange_name, "clocked.echo",
                                               Properties(correlation_id=conv_id), error)
    err = failure_of(d, ConversationError)
    assert err.response_code == 406 and not isinstance(err, ConversationTimeout)
    assert err.message == ("the broker refused the message to 'clocked.echo': PRECONDITION_FAILED - user_id "
                           "property set to 'x' but authenticated user was 'y'")
    system.pump()
    assert client.conversations.late_messages == 1


def _refusing(system: ClockedSystem, monkeypatch: pytest.MonkeyPatch,
              failures: list[BaseException]) -> list[tuple[str, bool | None, float]]:
    """Service queues of quorum type (requests to them ask for a confirm); the transport fails the
    next publishes with ``failures`` (then takes them). Returns what was sent: (key, confirm, time)."""
    container = system.container
    monkeypatch.setattr(container, "confirms_service_requests", True, raising=False)
    transport = container.transport
    real_publish = transport.publish_now
    sent: list[tuple[str, bool | None, float]] = []

    def publish_now(exchange: str, routing_key: str, body: bytes, properties: Any, *, mandatory: bool = False,
                    confirm: bool | None = None) -> Any:
        sent.append((routing_key, confirm, system.clock.seconds()))
        if failures and routing_key.startswith("clocked."):
            return defer.fail(failures.pop(0))
        return real_publish(exchange, routing_key, body, properties, mandatory=mandatory, confirm=confirm)

    monkeypatch.setattr(transport, "publish_now", publish_now)
    return sent


def test_a_request_the_broker_refused_is_sent_again_until_its_quorum_queue_takes_it(
        system: ClockedSystem, monkeypatch: pytest.MonkeyPatch, log_events: list[dict[str, Any]]) -> None:
    """A request to a quorum service queue goes with a confirm; refused (basic.nack: the queue elects a new
    leader) it is sent again 0.1 s later, then 0.2 s ...: the call is answered, once; its reply asks for
    no confirm (the caller's own queue is not a quorum queue)."""
    from ion.core.exceptions import MessageRefusedError

    svc, client = _echo_and_client(system)
    sent = _refusing(system, monkeypatch, [MessageRefusedError("refused (basic.nack)") for _ in range(2)])
    d = client.rpc_send("echo", "echo", "hi", timeout=30)
    system.pump()
    no_result(d)
    system.advance(0.1)
    no_result(d)
    system.advance(0.2)
    content, _ = success_of(d)
    assert content == "hi"
    assert [(key, confirm) for key, confirm, _ in sent] == [("clocked.echo", True)] * 3 + [(client.backend_name, False)]
    assert [round(at, 3) for _, _, at in sent[:3]] == [0.0, 0.1, 0.3]
    assert len([e for e in log_events if "refused by the broker" in str(e.get("log_format"))]) == 1
    system.advance(10)
    assert client.conversations.late_messages == 0 and len(client.conversations) == 0


def test_a_request_refused_for_good_fails_and_other_send_errors_fail_at_once(
        system: ClockedSystem, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sending again stops when the next try would come past the call's timeout, or after 60 s of
    refusals: the call fails then (503, could not send, with the broker's refusal) rather than wait out
    its timeout; any other failure to send fails the call at once (503)."""
    from ion.core.exceptions import MessageRefusedError
    from ion.core.process import REFUSED_RESEND_FOR

    _svc, client = _echo_and_client(system)
    sent = _refusing(system, monkeypatch, [MessageRefusedError("refused (basic.nack)") for _ in range(1000)])
    short = client.rpc_send("echo", "echo", 1, timeout=2)
    system.advance(1.5, step=0.05)
    no_result(short)
    system.advance(0.5, step=0.05)
    err = failure_of(short, ConversationError)
    assert err.response_code == 503 and not isinstance(err, ConversationTimeout)
    long = client.rpc_send("echo", "echo", 2, timeout=600)
    system.advance(REFUSED_RESEND_FOR + 2, step=0.5)
    err = failure_of(long, ConversationError)
    assert err.response_code == 503 and err.message.startswith("could not send: refused (basic.nack)")
    requests = [at for key, _, at in sent if key == "clocked.echo"]
    assert len(requests) < 100  # (sent again once a second at most, after the first few)
    system.advance(30, step=1)
    assert [at for key, _, at in sent if key == "clocked.echo"] == requests  # nothing sent for them any more
    sent.clear()
    monkeypatch.setattr(system.container, "confirms_service_requests", True, raising=False)
    failures = _refusing(system, monkeypatch, [TransportError("channel closed")])
    other = client.rpc_send("echo", "echo", 3, timeout=600)
    system.pump()
    err = failure_of(other, ConversationError)
    assert err.response_code == 503 and err.message == "could not send: channel closed" and len(failures) == 1
