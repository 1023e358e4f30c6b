"""Processes (DESIGN §5): dispatch, bad input, built-in ops, children, graceful terminate,
nested and self calls, user-id delegation, protobuf content.

Runs on a :class:`~ion.testing.ClockedSystem` (time moves only when the test advances it).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from ion.core.exceptions import (
    ConfigurationError,
    ConversationError,
    ConversationTimeout,
    MessageTooLargeError,
    ReceivedApplicationError,
    ReceivedContainerError,
)
from ion.core.lifecycle import State
from ion.core.messaging import message as wire
from ion.core.messaging.message import Performative
from ion.core.process import Process, ProcessClient, ProcessDesc, load_process_class
from ion.core.service import ServiceProcess
from ion.testing import ClockedSystem

from .support import (
    EchoService,
    Probe,
    Recorder,
    RelayService,
    failure_of,
    logged,
    no_result,
    request_body,
    success_of,
)


def _echo(system: ClockedSystem) -> EchoService:
    svc = system.spawn(EchoService)
    assert isinstance(svc, EchoService)
    return svc


def _still_serving(system: ClockedSystem, svc: Process) -> None:
    """The process is ACTIVE and still answers requests."""
    assert svc.state is State.ACTIVE
    client = system.spawn(Process, name="checker")
    content, _ = system.result(client.rpc_send(svc.id, "ping", "still there?"))
    assert content["pong"] == "still there?"


# -- bad input -----------------------------------------------------------------------------------------


def test_unknown_op_is_logged_with_its_sender(system: ClockedSystem, log_events: list[dict[str, Any]]) -> None:
    """An unknown op is answered 404 and logged naming the op and the sender."""
    svc = _echo(system)
    client = system.spawn(Process)
    d = client.rpc_send(svc.id, "nope")
    system.pump()
    assert failure_of(d, ReceivedApplicationError).response_code == 404
    assert logged(log_events, "unknown op 'nope'", client.backend_name)
    _still_serving(system, svc)


def test_unknown_op_in_a_one_off_send_is_only_logged(system: ClockedSystem,
                                                     log_events: list[dict[str, Any]]) -> None:
    """A one-off send (protocol none) to an unknown op gets no reply, just a log line."""
    svc = _echo(system)
    client = system.spawn(Process)
    system.result(client.send(svc.id, "nope"))
    system.pump()
    assert logged(log_events, "unknown op 'nope'", client.backend_name)
    assert client.conversations.late_messages == 0 and len(client.conversations) == 0
    assert svc.state is State.ACTIVE


def test_expired_message_is_dropped_without_calling_the_op(system: ClockedSystem,
                                                           log_events: list[dict[str, Any]]) -> None:
    """A message whose expiry (epoch seconds) has passed is dropped and logged; the op never runs."""
    svc = _echo(system)
    probe = Probe(system.container)
    probe.publish(svc.id, request_body(svc.id, "echo", "stale", expiry=time.time() - 60))
    system.pump()
    assert svc.calls == []
    assert probe.received == []
    assert logged(log_events, "dropped expired message", "'echo'", "from probe")
    # the same request with a future expiry is served
    probe.publish(svc.id, request_body(svc.id, "echo", "fresh", expiry=time.time() + 3600))
    system.pump()
    assert svc.calls == [("echo", "fresh")]
    assert [m["content"] for m in probe.received] == ["fresh"]
    assert svc.state is State.ACTIVE


def test_reply_for_unknown_conversation_is_logged_and_dropped(system: ClockedSystem,
                                                              log_events: list[dict[str, Any]]) -> None:
    """A reply to no conversation of the process, on either queue, is counted late, logged, dropped."""
    svc = _echo(system)
    probe = Probe(system.container)
    for queue in (svc.id, svc.backend_name):
        body = wire.encode(wire.build(sender="stranger.9", receiver=queue, op="result", content=1,
                                      conv_id="stranger.9#4", conv_seq=2,
                                      performative=Performative.INFORM_RESULT))
        probe.publish(queue, body)
    system.pump()
    assert svc.conversations.late_messages == 2
    # One line per kind per 10 s (LogLimiter): the second is counted, then reported.
    assert len(logged(log_events, "late inform_result from stranger.9")) == 1
    system.clock.advance(10)
    assert len(logged(log_events, "late inform_result from stranger.9")) == 2
    assert logged(log_events, "1 more like this in the last 10 s", "late inform_result from stranger.9")
    assert probe.received == []  # no answer to an answer
    assert svc.calls == []
    _still_serving(system, svc)


def test_oversized_request_fails_the_caller_at_once() -> None:
    """A request over max_message_size fails the caller's Deferred with a 413 naming the limit."""
    system = ClockedSystem(config={"ion.core.messaging": {"max_message_size": 2048}})
    svc = _echo(system)
    client = system.spawn(Process)
    d = client.rpc_send("echo", "echo", "x" * 5000)
    err = failure_of(d, ConversationError)  # no pumping needed
    assert err.response_code == 413
    assert "over the limit of 2048" in err.message
    assert len(client.conversations) == 0
    failure_of(client.send("echo", "echo", "x" * 5000), MessageTooLargeError)
    system.pump()
    assert svc.calls == []


def test_oversized_message_received_raw_is_answered_413(log_events: list[dict[str, Any]]) -> None:
    """A body over the receiver's limit is answered 413 (with reply properties) or dropped (without)."""
    system = ClockedSystem(config={"ion.core.messaging": {"max_message_size": 2048}})
    svc = _echo(system)
    probe = Probe(system.container)
    body = request_body(svc.id, "echo", "x" * 5000)
    probe.publish(svc.id, body)
    probe.publish(svc.id, body, reply=False)
    system.pump()
    [reply] = probe.received
    assert reply["response-code"] == 413
    assert reply["content"]["error"] == "MessageTooLargeError"
    assert len(logged(log_events, "dropped bad message", "over the limit of 2048")) == 1  # the 2nd: counted
    system.clock.advance(10)
    assert logged(log_events, "1 more like this", "dropped bad message", "over the limit of 2048")
    assert svc.calls == []
    _still_serving(system, svc)


def test_oversized_result_is_answered_500() -> None:
    """An op result over the limit becomes a 500 MessageTooLargeError reply instead of a lost answer."""
    system = ClockedSystem(config={"ion.core.messaging": {"max_message_size": 2048}})
    svc = _echo(system)
    client = system.spawn(Process)
    d = client.rpc_send("echo", "huge", 5000)
    system.pump()
    err = failure_of(d, ReceivedContainerError)
    assert err.remote_error == "MessageTooLargeError"
    assert svc.state is State.ACTIVE and len(svc.conversations) == 0


def test_broker_user_cannot_be_claimed_in_the_body(system: ClockedSystem) -> None:
    """broker-user comes from the transport, never from the sender's headers."""
    _echo(system)
    client = system.spawn(Process)
    content, _ = system.result(client.rpc_send("echo", "headers", headers={"broker-user": "mallory"}))
    assert content["broker-user"] == "ion"


# -- built-in ops ------------------------------------------------------------------------------------------


def test_op_ping_answers_liveness(system: ClockedSystem) -> None:
    """ping answers with the content, the pid, the label and the state."""
    proc = system.spawn(Process, name="pinged")
    client = system.spawn(Process)
    content, _ = system.result(client.rpc_send(proc.id, "ping", "hi"))
    assert content == {"pong": "hi", "pid": proc.id, "name": "pinged", "state": "ACTIVE"}
    assert system.result(ProcessClient(client, proc.id).ping())["pid"] == proc.id


def test_op_terminate_by_message(system: ClockedSystem) -> None:
    """terminate by message: the caller gets its reply, then the process is TERMINATED and gone."""
    proc = system.spawn(Process)
    client = system.spawn(Process)
    content, headers = system.result(client.rpc_send(proc.id, "terminate"))
    assert content == {"terminating": proc.id}
    assert headers["status"] == "OK"
    system.pump()
    assert proc.state is State.TERMINATED
    assert system.container.proc_manager.get(proc.id) is None
    d = client.rpc_send(proc.id, "ping")
    system.pump()
    assert failure_of(d, ConversationError).response_code == 404


def test_spawn_child_children_end_with_parent_in_reverse_order(system: ClockedSystem) -> None:
    """Children spawned by a process are terminated with it, the last spawned first, before its own hook."""
    log: list[tuple[str, str]] = []
    parent = system.spawn(Recorder, {"log": log}, name="parent")
    pids = [system.result(parent.spawn_child(Recorder, {"log": log}, name=f"child{i}")) for i in (1, 2, 3)]
    children = [system.container.proc_manager.get(pid) for pid in pids]
    assert parent.children == children
    assert all(c is not None and c.parent is parent for c in children)
    system.result(system.container.proc_manager.terminate_process(parent.id))
    assert log == [("terminate", "child3"), ("terminate", "child2"), ("terminate", "child1"),
                   ("terminate", "parent")]
    assert all(c is not None and c.state is State.TERMINATED for c in children)
    assert parent.children == []


def test_child_that_ends_first_leaves_its_parent(system: ClockedSystem) -> None:
    """A child terminated on its own is no longer the parent's child; the parent still ends cleanly."""
    log: list[tuple[str, str]] = []
    parent = system.spawn(Recorder, {"log": log}, name="parent")
    first = system.result(parent.spawn_child(Recorder, {"log": log}, name="first"))
    system.result(parent.spawn_child(Recorder, {"log": log}, name="second"))
    system.result(system.container.proc_manager.terminate_process(first))
    assert [c.proc_name for c in parent.children] == ["second"]
    system.result(parent.terminate())
    assert log == [("terminate", "first"), ("terminate", "second"), ("terminate", "parent")]


# -- graceful terminate ----------------------------------------------------------------------------------


def test_terminate_waits_for_the_op_in_progress(system: ClockedSystem) -> None:
    """Terminating while an op runs waits for it; its caller still gets the answer."""
    svc = _echo(system)
    client = system.spawn(Process)
    call = client.rpc_send(svc.id, "slow", 3)
    system.pump()
    stopping = system.container.proc_manager.terminate_process(svc.id)
    system.advance(2.9)
    no_result(stopping)
    no_result(call)
    assert svc.state is State.ACTIVE
    system.advance(0.1)
    success_of(stopping)
    assert success_of(call)[0] == "slow done"
    assert svc.state is State.TERMINATED


def test_terminate_is_bounded_by_terminate_timeout(log_events: list[dict[str, Any]]) -> None:
    """An op that outlives terminate_timeout does not hold terminate; its caller is told 503 at once."""
    system = ClockedSystem(config={"ion.core.process": {"terminate_timeout": 2}})
    svc = _echo(system)
    client = system.spawn(Process)
    call = client.rpc_send(svc.id, "never", timeout=60)
    system.pump()
    stopping = system.container.proc_manager.terminate_process(svc.id)
    system.advance(1.9)
    no_result(stopping)
    system.advance(0.1)
    success_of(stopping)
    assert svc.state is State.TERMINATED
    err = failure_of(call, ReceivedContainerError)
    assert err.response_code == 503
    assert "terminated before answering" in err.message
    svc.pending.callback("too late")  # the op ends after all: nothing more is sent
    system.pump()
    assert client.conversations.late_messages == 0


def test_terminate_waits_for_an_op_that_awaits_a_nested_rpc(system: ClockedSystem) -> None:
    """An op waiting for a reply keeps receiving it while its process terminates, and answers its caller."""
    relay = system.spawn(RelayService)
    _echo(system)
    client = system.spawn(Process)
    call = client.rpc_send(relay.id, "relay", {"to": "echo", "op": "slow", "arg": 2})
    system.pump()
    stopping = system.container.proc_manager.terminate_process(relay.id)
    system.pump()
    no_result(stopping)
    system.advance(2)
    success_of(stopping)
    assert success_of(call)[0] == "slow done"
    assert relay.state is State.TERMINATED


def test_terminating_process_takes_no_new_requests(system: ClockedSystem) -> None:
    """While one instance drains, new requests to the service go to the other instance."""
    first = _echo(system)
    second = _echo(system)
    client = system.spawn(Process)
    busy = client.rpc_send(first.id, "slow", 5)
    system.pump()
    stopping = system.container.proc_manager.terminate_process(first.id)
    system.pump()
    ds = [client.rpc_send("echo", "whoami") for _ in range(4)]
    system.pump()
    assert [success_of(d)[0] for d in ds] == [second.id] * 4
    system.advance(5)
    success_of(stopping)
    assert success_of(busy)[0] == "slow done"


def test_outstanding_conversations_fail_when_their_process_terminates(system: ClockedSystem) -> None:
    """Calls a process still waits for fail with ConversationError when it terminates."""
    _echo(system)
    client = system.spawn(Process)
    calls = [client.rpc_send("echo", "never", timeout=60), client.request("echo", "never", timeout=60)]
    system.pump()
    system.result(client.terminate())
    for d in calls:
        err = failure_of(d, ConversationError)
        assert "terminated" in err.message
    assert len(client.conversations) == 0


# -- nested and self calls ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["relay", "relay_icb"])
def test_rpc_inside_an_op(system: ClockedSystem, op: str) -> None:
    """An op that calls another service and answers its result does not deadlock."""
    system.spawn(RelayService)
    _echo(system)
    client = system.spawn(Process)
    content, _ = system.result(client.rpc_send("relay", op, {"to": "echo", "op": "echo", "arg": [1, 2]}))
    assert content == [1, 2]


def test_service_calls_itself_by_name_while_handling_its_service_queue(system: ClockedSystem) -> None:
    """An op reached by service name can call its own service name: no self-deadlock, no timeout."""
    relay = system.spawn(RelayService)
    client = system.spawn(Process)
    d = client.rpc_send("relay", "relay", {"to": "relay", "op": "echo", "arg": "me again"})
    system.pump()  # no time passes
    assert success_of(d)[0] == "me again"
    assert len(relay.conversations) == 0


def test_service_calls_itself_by_name_while_handling_a_pid_request(system: ClockedSystem) -> None:
    """An op reached by pid can call its own service name (the reply comes back on the backend queue)."""
    relay = system.spawn(RelayService)
    client = system.spawn(Process)
    d = client.rpc_send(relay.id, "relay", {"to": "relay", "op": "echo", "arg": "via the service queue"})
    system.pump()
    assert success_of(d)[0] == "via the service queue"
    assert len(relay.conversations) == 0


def test_call_to_own_pid_from_a_pid_request_fails_fast(system: ClockedSystem) -> None:
    """An op calling its own pid would wait for itself: the call fails at once (508), not after the timeout."""
    relay = system.spawn(RelayService)
    client = system.spawn(Process)
    d = client.rpc_send(relay.id, "relay", {"to": relay.id, "op": "echo", "arg": 1})
    system.pump()
    err = failure_of(d, ReceivedContainerError)
    assert err.remote_error == "ConversationError"
    assert "would wait for itself" in err.message
    _still_serving(system, relay)


def test_process_calls_itself_outside_an_op(system: ClockedSystem) -> None:
    """A process may rpc its own pid from outside an op: request and reply use different queues."""
    svc = _echo(system)
    content, _ = system.result(svc.rpc_send(svc.id, "echo", "to myself"))
    assert content == "to myself"
    content, _ = system.result(svc.rpc_send("echo", "echo", "to my service"))
    assert content == "to my service"
    assert len(svc.conversations) == 0


# -- identity --------------------------------------------------------------------------------------------


def test_user_id_is_delegated_along_a_call_chain(system: ClockedSystem) -> None:
    """A caller's user-id reaches the service called by the op it called; broker-user is the transport's."""
    system.spawn(RelayService)
    _echo(system)
    client = system.spawn(Process)
    content, _ = system.result(client.rpc_send("relay", "relay", {"to": "echo", "op": "headers"},
                                               headers={"user-id": "alice"}))
    assert content["user-id"] == "alice"
    assert content["broker-user"] == "ion"


def test_user_id_defaults_to_the_process_identity(system: ClockedSystem) -> None:
    """Outside an op, calls carry the process's own user-id (spawnarg), else ANONYMOUS."""
    _echo(system)
    anonymous = system.spawn(Process)
    bob = system.spawn(Process, {"user-id": "bob"})
    assert system.result(anonymous.rpc_send("echo", "headers"))[0]["user-id"] == "ANONYMOUS"
    assert system.result(bob.rpc_send("echo", "headers"))[0]["user-id"] == "bob"


def test_delegation_does_not_leak_between_concurrent_ops(system: ClockedSystem) -> None:
    """Two callers with different user-ids, served concurrently, each see their own identity downstream."""
    system.spawn(RelayService)
    system.spawn(RelayService)
    _echo(system)
    client = system.spawn(Process)
    ds = [client.rpc_send("relay", "relay", {"to": "echo", "op": "headers"}, headers={"user-id": user})
          for user in ("alice", "bob", "carol", "dave")]
    system.pump()
    assert [success_of(d)[0]["user-id"] for d in ds] == ["alice", "bob", "carol", "dave"]


# -- protobuf content ----------------------------------------------------------------------------------------


class StampService(ServiceProcess):
    """Takes a Struct, answers a Timestamp."""

    service_name = "stamp"

    def op_stamp(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        self.got = content
        return timestamp_pb2.Timestamp(seconds=int(content["seconds"]), nanos=5)


def test_protobuf_content_end_to_end(system: ClockedSystem) -> None:
    """A protobuf message as content arrives as an instance of its type, and so does one as a result."""
    svc = system.spawn(StampService)
    client = system.spawn(Process)
    request = struct_pb2.Struct()
    request.update({"seconds": 42, "who": "me"})
    content, headers = system.result(client.rpc_send("stamp", "stamp", request))
    assert isinstance(svc.got, struct_pb2.Struct)
    assert svc.got == request
    assert isinstance(content, timestamp_pb2.Timestamp)
    assert (content.seconds, content.nanos) == (42, 5)
    assert headers["encoding"] == "protobuf"
    assert headers["content-type"] == "google.protobuf.Timestamp"


# -- descriptions and config --------------------------------------------------------------------------------


def test_load_process_class_by_module_and_name() -> None:
    """A process class is found by module (its only one, or by name); anything else is a ConfigurationError."""
    from ion.services.hello import HelloService

    assert load_process_class("ion.services.hello") is HelloService
    assert load_process_class("ion.services.hello", "HelloService") is HelloService
    assert ProcessDesc(name="h", module="ion.services.hello").process_class() is HelloService
    with pytest.raises(ConfigurationError, match="no Process class 'Nope'"):
        load_process_class("ion.services.hello", "Nope")
    with pytest.raises(ConfigurationError, match="cannot import"):
        load_process_class("ion.no_such_module")
    with pytest.raises(ConfigurationError, match="names no module"):
        ProcessDesc(name="empty").process_class()


def test_get_config_prefers_spawnargs_over_module_config() -> None:
    """get_config reads spawnargs first, then the config section of the process's module."""
    system = ClockedSystem(config={"ion.services.hello": {"greeting": "Howdy", "other": 1}})
    from ion.services.hello import HelloService

    plain = system.spawn(HelloService)
    assert plain.get_config("greeting") == "Howdy"
    told = system.spawn(HelloService, {"greeting": "Ahoy"})
    assert told.get_config("greeting") == "Ahoy"
    assert told.get_config("other") == 1
    assert told.get_config("missing", "dflt") == "dflt"


def test_resolve_scopes_bare_names_to_the_system(system: ClockedSystem) -> None:
    """A bare service name routes to <sysname>.<name>; a pid or dotted name is left as is."""
    proc = system.spawn(Process)
    assert proc.resolve("hello") == "clocked.hello"
    assert proc.resolve(proc.id) == proc.id
    # Made once per name and kept (a bounded number of names): the same string each time.
    assert proc.resolve("hello") is proc.resolve("hello")
    for i in range(1100):
        assert proc.resolve(f"svc{i}") == f"clocked.svc{i}"
    assert len(proc._resolved) == 1000
    assert proc.resolve("svc1099") == "clocked.svc1099"  # (past the bound: made anew, still right)


def test_one_off_send_keeps_no_conversation(system: ClockedSystem) -> None:
    """send() delivers once (protocol none), gets no reply and keeps nothing in either table."""
    svc = _echo(system)
    client = system.spawn(Process)
    system.result(client.send("echo", "echo", "fire and forget"))
    system.pump()
    assert svc.calls == [("echo", "fire and forget")]
    assert len(client.conversations) == 0 and len(svc.conversations) == 0
    assert client.conversations.late_messages == 0


def test_one_off_send_arms_no_timer(system: ClockedSystem) -> None:
    """A one-off send never times out: no timer is left on the clock afterwards."""
    _echo(system)
    client = system.spawn(Process)
    before = set(system.clock.getDelayedCalls())
    d = client.send("echo", "echo", 1)
    assert [c for c in system.clock.getDelayedCalls() if c not in before and c.getTime() > 0] == []
    system.result(d)


def test_conversation_timeout_is_a_received_error() -> None:
    """ConversationTimeout carries code 408 and says what timed out."""
    err = ConversationTimeout("sys.x", "op", 2.5, "p#1")
    assert err.response_code == 408
    assert str(err) == "408 ConversationTimeout from sys.x: no reply to 'op' from sys.x within 2.5 s"


def test_delivery_after_stop_consuming_is_requeued(system: ClockedSystem) -> None:
    """A delivery that arrives after the receiver cancelled its consumer (as AMQP allows)
    is given back to the queue, not handled during shutdown."""
    from ion.core.messaging.transport import Delivery, Properties

    svc = _echo(system)
    receiver = svc.receivers[0]
    system.result(receiver._stop_consuming())
    settled: list[tuple[bool, bool]] = []
    delivery = Delivery(request_body(svc.id, "echo", "late"), Properties(), "ex", svc.id, False,
                        lambda ack, requeue: settled.append((ack, requeue)))
    handled_before = receiver.handled
    receiver._on_delivery(delivery)
    assert settled == [(False, True)]
    assert receiver.handled == handled_before


# -- the receiver's prefetch window and FIFO -------------------------------------------------------------------


class Who(ServiceProcess):
    """Says which instance answered and whether the broker had delivered the request before."""

    service_name = "who"

    def op_who(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return {"pid": self.id, "redelivered": headers["redelivered"]}

    def op_hold(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Answer only when the test fires ``self.held``."""
        from twisted.internet import defer

        self.held: Any = defer.Deferred()
        return self.held


def test_receiver_handles_one_message_at_a_time_from_its_prefetch_window(system: ClockedSystem) -> None:
    """The broker hands a shared queue's receiver up to `prefetch` messages; they are handled one at
    a time, in order, each acknowledged when handled."""
    svc = _echo(system)
    client = system.spawn(Process)
    shared = next(r for r in svc.receivers if r.shared)
    assert (shared.prefetch, shared.max_concurrent, shared.window) == (16, 1, 16)
    ds = [client.rpc_send("echo", "slow", 5, timeout=60) for _ in range(3)]
    system.pump()
    assert (shared.inflight, len(shared.buffered)) == (1, 2)  # all three delivered, one started
    assert svc.calls == [("slow", 5)]
    consumer = system.broker.queues[shared.name].consumers[0]
    assert len(consumer.unacked) == 3
    system.advance(5)
    assert [d.called for d in ds] == [True, False, False]
    assert (shared.inflight, len(shared.buffered), len(consumer.unacked)) == (1, 1, 2)
    system.advance(5)
    system.advance(5)
    assert [success_of(d)[0] for d in ds] == ["slow done"] * 3
    assert (shared.inflight, len(shared.buffered), len(consumer.unacked)) == (0, 0, 0)


def test_a_quorum_service_queues_request_is_acknowledged_once_its_answer_is_confirmed(system: ClockedSystem) -> None:
    """From a quorum service queue (a cluster), an answer asks for a publisher confirm and the request
    is acknowledged only once the broker confirmed it: an instance whose node dies in between leaves
    the request unacknowledged, for another instance to run again (redelivered), rather than its
    caller waiting for its timeout. Error answers too, slow ops too; the instance's own queue and a
    classic service queue ask for no confirm."""
    from twisted.internet import defer

    svc = _echo(system)
    client = system.spawn(Process)
    shared = next(r for r in svc.receivers if r.shared)
    assert not shared.confirm_replies  # (the embedded broker's queues are classic)
    shared.confirm_replies = True  # what on_initialize sets for a quorum service queue
    transport = svc.container.transport
    confirms: list[defer.Deferred[None]] = []
    publish_now = transport.publish_now

    def confirmed_later(exchange: str, routing_key: str, body: bytes, properties: Any, *, mandatory: bool = False,
                        confirm: bool | None = None) -> Any:
        publish_now(exchange, routing_key, body, properties, mandatory=mandatory)  # delivered at once
        if not confirm:
            return None
        confirms.append(defer.Deferred())  # the broker's confirm, given when the test says
        return confirms[-1]

    transport.publish_now = confirmed_later
    consumer = system.broker.queues[shared.name].consumers[0]
    for op, content, timed in (("echo", "hi", 0), ("boom", None, 0), ("slow", 5, 5)):
        d = client.rpc_send("echo", op, content, timeout=60)
        system.pump()
        system.advance(timed)
        assert d.called, op  # the caller has its answer (a result or the error) ...
        d.addErrback(lambda f: None)
        # ... the request waits for its acknowledgement, not the receiver (done with it)
        assert (len(confirms), len(consumer.unacked), shared.inflight) == (1, 1, 0), op
        confirms.pop().callback(None)
        system.pump()
        assert len(consumer.unacked) == 0, op
    # The next requests are handled while the earlier ones' acknowledgements wait: one op at a time
    # still, not one broker round trip at a time.
    ds = [client.rpc_send("echo", "echo", n, timeout=60) for n in range(3)]
    system.pump()
    assert [success_of(d)[0] for d in ds] == [0, 1, 2] and len(consumer.unacked) == 3 and len(confirms) == 3
    for confirm in confirms:
        confirm.callback(None)
    confirms.clear()
    system.pump()
    assert len(consumer.unacked) == 0
    # A request to the instance itself (its own queue) asks for no confirm.
    d = client.rpc_send(svc.id, "echo", "direct")
    system.pump()
    assert success_of(d)[0] == "direct" and not confirms


def test_own_queue_is_consumed_without_acks_and_keeps_its_fifo_while_deactivated(system: ClockedSystem) -> None:
    """A process's own queue is consumed with auto_ack: nothing waits for an ack at the broker, the
    FIFO still hands messages over one at a time, and a deactivated receiver keeps its FIFO for
    when it is activated again."""
    svc = _echo(system)
    client = system.spawn(Process)
    main = svc.receivers[0]
    assert not main.shared
    ds = [client.rpc_send(svc.id, "slow", 5, timeout=600) for _ in range(3)]
    system.pump()
    consumer = system.broker.queues[svc.id].consumers[0]
    assert (main.inflight, len(main.buffered), len(consumer.unacked)) == (1, 2, 0)
    assert all(d.settled for d in main.buffered)
    system.result(main.deactivate())  # the op in hand finishes; the FIFO stays
    system.advance(5)
    assert [d.called for d in ds] == [True, False, False]
    assert (main.state, main.inflight, len(main.buffered)) == (State.READY, 0, 2)
    system.advance(30)
    assert svc.calls == [("slow", 5)]  # nothing started while deactivated
    system.result(main.activate())
    system.advance(5)
    system.advance(5)
    assert [success_of(d)[0] for d in ds] == ["slow done"] * 3


def test_stopping_gives_buffered_requests_to_another_instance(system: ClockedSystem) -> None:
    """On terminate, requests waiting in an instance's FIFO are rejected with requeue: another
    instance answers them (marked redelivered); the one in progress gets its terminate_timeout."""
    first = system.spawn(Who)
    client = system.spawn(Process)
    held = client.rpc_send("who", "hold", None, timeout=60)
    waiting = [client.rpc_send("who", "who", None, timeout=60) for _ in range(4)]
    system.pump()
    service_receiver = first.receivers[2]
    assert (service_receiver.inflight, len(service_receiver.buffered)) == (1, 4)
    second = system.spawn(Who)
    assert not any(d.called for d in waiting)  # in the first one's FIFO: the second takes nothing
    terminating = system.container.proc_manager.terminate_process(first.id)
    system.pump()
    answers = [success_of(d)[0] for d in waiting]
    assert answers == [{"pid": second.id, "redelivered": True}] * 4
    no_result(held)
    first.held.callback("done at last")  # the op in progress still ends in the first instance
    system.pump()
    assert success_of(held)[0] == "done at last"
    system.result(terminating)
    assert first.state is State.TERMINATED and not service_receiver.buffered


def test_prefetch_from_config_and_spawnargs() -> None:
    """prefetch: spawnargs, then the process module's section, then ion.core.process; the window
    asked of the broker is never below max_concurrent; a bad value fails the spawn."""
    system = ClockedSystem({"ion.core.process": {"prefetch": 4}, "tests.core.test_process": {"prefetch": 3}})
    plain = system.spawn(Process)
    assert {r.window for r in plain.receivers} == {4}
    who = system.spawn(Who)
    assert {r.window for r in who.receivers} == {3}
    own = system.spawn(Who, {"prefetch": 1})
    assert {r.window for r in own.receivers} == {1}
    own.receivers[0].max_concurrent = 5
    assert own.receivers[0].window == 5
    for bad in (0, "8", True):
        with pytest.raises(ConfigurationError, match="prefetch must be an integer >= 1"):
            system.spawn(Who, {"prefetch": bad})


def test_max_concurrent_handles_several_at_once(system: ClockedSystem) -> None:
    """A receiver with max_concurrent N starts up to N messages before the first ends."""

    class Wide(EchoService):
        def receivers_to_create(self) -> list[Any]:
            receivers = super().receivers_to_create()
            receivers[0].max_concurrent = 2
            return receivers

    svc = system.spawn(Wide)
    client = system.spawn(Process)
    ds = [client.rpc_send(svc.id, "slow", 5) for _ in range(3)]
    system.pump()
    assert svc.calls == [("slow", 5), ("slow", 5)]
    assert (svc.receivers[0].inflight, len(svc.receivers[0].buffered)) == (2, 1)
    system.advance(5)
    assert [d.called for d in ds] == [True, True, False]
    system.advance(5)
    assert success_of(ds[2])[0] == "slow done"


def test_request_sees_whether_it_was_redelivered(system: ClockedSystem) -> None:
    """``redelivered`` comes from the delivery, never from the body."""
    svc = system.spawn(Who)
    probe = Probe(system.container)
    system.result(probe.publish(svc.id, request_body(svc.id, "who", redelivered=True)))
    system.pump()
    assert probe.received[-1]["content"] == {"pid": svc.id, "redelivered": False}


def test_an_op_outliving_terminate_is_answered_503_and_not_run_again() -> None:
    """The request whose op outlives terminate_timeout gets a 503 and is acknowledged: it is not
    redelivered to another instance (its caller has its answer)."""
    system = ClockedSystem({"ion.core.process": {"terminate_timeout": 2}})
    first = system.spawn(Who)
    client = system.spawn(Process)
    held = client.rpc_send("who", "hold", None, timeout=60)
    system.pump()
    second = system.spawn(Who)
    terminating = system.container.proc_manager.terminate_process(first.id)
    system.advance(2)
    system.result(terminating)
    err = failure_of(held, ReceivedContainerError)
    assert err.response_code == 503 and "terminated before answering" in str(err)
    assert system.broker.queues["clocked.who"].messages == deque()
    assert not hasattr(second, "held")  # never given the request


def test_connection_loss_drops_the_waiting_deliveries(system: ClockedSystem) -> None:
    """Deliveries waiting in a shared queue's FIFO when the connection is lost are left to the
    broker (which delivers them again) instead of being handled here too."""
    svc = system.spawn(Who)
    client = system.spawn(Process)
    calls = [client.rpc_send("who", "hold", None, timeout=60)]
    calls += [client.rpc_send("who", "who", None, timeout=60) for _ in range(3)]
    system.pump()
    main = next(r for r in svc.receivers if r.shared)
    assert len(main.buffered) == 3
    system.container.transport._notify_connection("lost", "test")
    assert not main.buffered
    for d in calls:  # and the container failed every call in flight
        assert "connection to the broker lost" in str(failure_of(d, ConversationError))
    handled = main.handled
    svc.held.callback("late")
    system.pump()
    assert main.handled == handled + 1  # the op in progress; none of the three that waited
