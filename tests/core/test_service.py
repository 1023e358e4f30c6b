"""Services (DESIGN §5): shared service queues, round-robin, clients, the hello service.

The end-to-end tests run on the real reactor with the embedded broker
(``container`` / ``container_factory`` fixtures); the rest on a ClockedSystem.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from ion.core.exceptions import (
    ApplicationError,
    ConversationError,
    ConversationTimeout,
    ReceivedApplicationError,
    ReceivedContainerError,
    ReceivedError,
)
from ion.core.lifecycle import State
from ion.core.process import Process
from ion.core.service import ServiceClient, ServiceProcess
from ion.services.hello import HelloClient, HelloService
from ion.testing import ClockedSystem, client_process

from .support import EchoService, RelayService, failure_of, logged, no_result, success_of


class EchoClient(ServiceClient):
    """A typed client of EchoService."""

    service_name = "echo"

    async def echo(self, value: Any) -> Any:
        content, _ = await self.rpc_send("echo", value)
        return content


class Greeter(Process):
    """Calls the hello service from an inlineCallbacks op, as service code does."""

    @defer.inlineCallbacks
    def op_greet(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        text = yield HelloClient(self).hello(content)
        return text


async def _spawn(container: Any, cls: type[Process], spawnargs: dict[str, Any] | None = None) -> Any:
    pid = await container.spawn(cls, spawnargs)
    return container.proc_manager.get(pid)


# -- the hello service -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hello_client_from_another_process(container: Any) -> None:
    """HelloClient.hello, called by another process, returns the greeting."""
    await container.spawn(HelloService)
    proc = await client_process(container)
    assert await HelloClient(proc).hello("x") == "Hello there, x"


@pytest_twisted.ensureDeferred
async def test_hello_client_yielded_inside_an_op(container: Any) -> None:
    """An inlineCallbacks op can `yield client.hello('x')` and answer the greeting."""
    await container.spawn(HelloService)
    greeter = await _spawn(container, Greeter)
    proc = await client_process(container)
    content, _ = await proc.rpc_send(greeter.id, "greet", "x")
    assert content == "Hello there, x"


def test_hello_greeting_comes_from_config() -> None:
    """The hello greeting is the ion.services.hello greeting from the config."""
    system = ClockedSystem(config={"ion.services.hello": {"greeting": "Howdy"}})
    system.spawn(HelloService)
    client = system.spawn(Process)
    assert system.result(HelloClient(client).hello("pardner")) == "Howdy, pardner"


def test_hello_whoami_reports_claimed_and_broker_user() -> None:
    """whoami answers the claimed user-id and the transport's broker-user."""
    system = ClockedSystem()
    system.spawn(HelloService)
    client = system.spawn(Process, {"user-id": "carol"})
    content, _ = system.result(client.rpc_send("hello", "whoami"))
    assert content == {"user-id": "carol", "broker-user": "ion"}


# -- service processes and clients ---------------------------------------------------------------------


def test_service_ping_names_service_and_version(system: ClockedSystem) -> None:
    """A service's ping adds its service name and version to the process ping."""
    svc = system.spawn(HelloService)
    client = system.spawn(Process)
    pong = system.result(ServiceClient(client, "hello").ping())
    assert pong["service"] == "hello"
    assert pong["version"] == HelloService.version
    assert pong["pid"] == svc.id
    assert pong["state"] == "ACTIVE"


def test_service_consumes_pid_and_service_queue(system: ClockedSystem) -> None:
    """A service answers both at its pid and at <sysname>.<service>."""
    svc = system.spawn(EchoService)
    client = system.spawn(Process)
    assert isinstance(svc, EchoService)
    assert svc.service_queue == "clocked.echo"
    assert system.result(client.rpc_send(svc.id, "whoami"))[0] == svc.id
    assert system.result(client.rpc_send("echo", "whoami"))[0] == svc.id
    assert system.result(client.rpc_send("clocked.echo", "whoami"))[0] == svc.id


def test_service_class_must_name_its_service(system: ClockedSystem) -> None:
    """A ServiceProcess subclass without service_name cannot be created."""

    class Nameless(ServiceProcess):
        pass

    with pytest.raises(TypeError, match="service_name"):
        Nameless(system.container)


def test_service_client_needs_a_target(system: ClockedSystem) -> None:
    """A ServiceClient needs a service_name or an explicit target; the target wins."""
    proc = system.spawn(Process)
    with pytest.raises(TypeError, match="target or a service_name"):
        ServiceClient(proc)
    assert EchoClient(proc).target == "echo"
    assert EchoClient(proc, "other").target == "other"


def test_service_queue_outlives_one_instance(system: ClockedSystem) -> None:
    """When one instance terminates, the shared queue stays and the other instance serves it."""
    first = system.spawn(EchoService)
    second = system.spawn(EchoService)
    client = system.spawn(Process)
    system.result(first.terminate())
    assert first.state is State.TERMINATED
    answers = {system.result(client.rpc_send("echo", "whoami"))[0] for _ in range(4)}
    assert answers == {second.id}


def test_unknown_service_op_is_404_from_the_client(system: ClockedSystem) -> None:
    """A client call to an op the service lacks fails with 404 ReceivedApplicationError."""
    system.spawn(EchoService)
    client = system.spawn(Process)
    d = EchoClient(client).rpc_send("nope")
    system.pump()
    assert failure_of(d, ReceivedApplicationError).response_code == 404


# -- error replies: the client's error families ------------------------------------------------------------


class ShelfError(ApplicationError):
    """The root of a service's errors: a 404 that names its shelf (a reply field)."""

    code = 404
    reply_fields = ("shelf",)
    shelf: str = ""

    def __init__(self, shelf: str, code: int | None = None) -> None:
        super().__init__(f"no shelf {shelf!r}", code)
        self.shelf = shelf


class ShelfGone(ShelfError):
    code = 410


class ShelfBroken(ShelfError):
    code = 507


class Unlisted(ApplicationError):
    """An error no client lists: it comes back as a ReceivedApplicationError."""

    code = 409


class ShelfService(ServiceProcess):
    service_name = "shelf"

    def op_take(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        kinds: dict[str, Any] = {"missing": ShelfError, "gone": ShelfGone, "broken": ShelfBroken}
        if content["kind"] == "unlisted":
            raise Unlisted("not on the list", details={"list": "a", "shelf": content["shelf"]})
        if content["kind"] == "forbidden":
            raise ShelfError(content["shelf"], 403)
        raise kinds[content["kind"]](content["shelf"])


class ShelfClient(ServiceClient):
    service_name = "shelf"
    errors = (ShelfError,)


def _take(system: ClockedSystem, client: ServiceClient, kind: str, *,
          cancellable: bool = False) -> defer.Deferred[Any]:
    content = {"kind": kind, "shelf": "s1"}
    d = client.cancellable_call("take", content) if cancellable else client.rpc_send("take", content)
    system.pump()
    return d


@pytest.mark.parametrize("cancellable", [False, True])
def test_a_listed_error_comes_back_as_its_class_with_its_fields(system: ClockedSystem, cancellable: bool) -> None:
    """An op's ShelfError (or subclass, 4xx or 5xx, code overridden or not) reaches a client listing
    ShelfError as that class, with its message, code and reply fields; the reply as its cause."""
    system.spawn(ShelfService)
    client = ShelfClient(system.spawn(Process))
    for kind, cls, code in [("missing", ShelfError, 404), ("gone", ShelfGone, 410), ("broken", ShelfBroken, 507),
                            ("forbidden", ShelfError, 403)]:
        err = failure_of(_take(system, client, kind, cancellable=cancellable), ShelfError)
        assert type(err) is cls, (kind, err)
        assert isinstance(err, ShelfError) and err.code == code and err.shelf == "s1"
        assert str(err) == err.message == "no shelf 's1'"
        cause = err.__cause__
        assert isinstance(cause, ReceivedError) and cause.response_code == code
        assert cause.content == {"error": cls.__name__, "message": "no shelf 's1'", "shelf": "s1"}


def test_an_unlisted_error_comes_back_as_received_error_with_its_details(system: ClockedSystem) -> None:
    """An error class the client does not list (or a client listing none) gives the Received* class
    of its code, naming the class, with its details in the content."""
    system.spawn(ShelfService)
    proc = system.spawn(Process)
    err = failure_of(_take(system, ShelfClient(proc), "unlisted"), ReceivedApplicationError)
    assert err.response_code == 409
    assert err.content == {"error": "Unlisted", "message": "not on the list", "list": "a", "shelf": "s1"}
    plain = ServiceClient(proc, "shelf")
    assert failure_of(_take(system, plain, "missing"), ReceivedApplicationError).remote_error == "ShelfError"
    err = failure_of(_take(system, plain, "broken"), ReceivedContainerError)
    assert err.response_code == 507 and err.content["shelf"] == "s1"


def test_a_service_error_logs_one_warning_line(system: ClockedSystem, log_events: list[dict[str, Any]]) -> None:
    """A service error, 4xx or 5xx, logs one warning line naming its code and class; no traceback."""
    system.spawn(ShelfService)
    client = ShelfClient(system.spawn(Process))
    failure_of(_take(system, client, "missing"), ShelfError)
    failure_of(_take(system, client, "broken"), ShelfBroken)
    assert len(logged(log_events, "op 'take'", "refused (404 ShelfError): no shelf 's1'")) == 1
    assert len(logged(log_events, "op 'take'", "failed (507 ShelfBroken): no shelf 's1'")) == 1
    assert not [e for e in log_events if e.get("log_failure") is not None]


def test_from_reply_skips_the_constructor() -> None:
    """from_reply sets message, code, details and the reply fields, whatever the constructor takes."""
    err = ShelfGone.from_reply("no shelf 'x'", 410, {"shelf": "x", "extra": 1})
    assert type(err) is ShelfGone and (err.message, err.code, err.shelf) == ("no shelf 'x'", 410, "x")
    assert err.reply_content() == {"error": "ShelfGone", "message": "no shelf 'x'", "shelf": "x", "extra": 1}


# -- end to end on the real reactor -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_round_robin_between_two_containers(container_factory: Any) -> None:
    """Two instances of one service in two containers on one broker share 10 requests 5/5."""
    first = await container_factory()
    second = await container_factory()
    a = await _spawn(first, EchoService)
    b = await _spawn(second, EchoService)
    client = await client_process(first)
    served = Counter()
    for _ in range(10):
        pid, _ = await client.rpc_send("echo", "whoami")
        served[pid] += 1
    assert served == {a.id: 5, b.id: 5}


@pytest_twisted.ensureDeferred
async def test_round_robin_of_concurrent_requests(container_factory: Any) -> None:
    """10 requests in flight at once are also split 5/5 between the two instances."""
    first = await container_factory()
    second = await container_factory()
    a = await _spawn(first, EchoService)
    b = await _spawn(second, EchoService)
    client = await client_process(second)
    results = await defer.gatherResults([client.rpc_send("echo", "whoami") for _ in range(10)])
    assert Counter(pid for pid, _ in results) == {a.id: 5, b.id: 5}


@pytest_twisted.ensureDeferred
async def test_user_id_delegation_across_containers(container_factory: Any) -> None:
    """alice's user-id follows an async op's call to another service; broker-user is the real publisher."""
    front = await container_factory(config={"ion.core.messaging": {"memory_user": "front-login"}})
    back = await container_factory(config={"ion.core.messaging": {"memory_user": "back-login"}})
    await front.spawn(RelayService)
    await back.spawn(EchoService)
    client = await client_process(back)
    content, headers = await client.rpc_send("relay", "relay", {"to": "echo", "op": "headers"},
                                             headers={"user-id": "alice"})
    assert content["user-id"] == "alice"
    assert content["broker-user"] == "front-login"  # who published to echo: relay's connection
    assert headers["broker-user"] == "front-login"


@pytest_twisted.ensureDeferred
async def test_nested_rpc_and_self_call_on_the_reactor(container: Any) -> None:
    """An op calling another service, and one calling its own service name, both answer promptly."""
    await container.spawn(RelayService)
    await container.spawn(EchoService)
    client = await client_process(container)
    content, _ = await client.rpc_send("relay", "relay", {"to": "echo", "op": "echo", "arg": "B"}, timeout=5)
    assert content == "B"
    started = time.monotonic()
    content, _ = await client.rpc_send("relay", "relay", {"to": "relay", "op": "echo", "arg": "me"}, timeout=5)
    assert content == "me"
    assert time.monotonic() - started < 2


@pytest_twisted.ensureDeferred
async def test_unbound_name_fails_promptly_on_the_reactor(container: Any) -> None:
    """An rpc to a name nobody consumes fails with 404 well before its 30 s timeout."""
    client = await client_process(container)
    started = time.monotonic()
    with pytest.raises(ConversationError) as info:
        await client.rpc_send("nobody_here", "op", timeout=30)
    assert info.value.response_code == 404
    assert time.monotonic() - started < 2


@pytest_twisted.ensureDeferred
async def test_100_concurrent_rpcs_on_the_reactor(container: Any) -> None:
    """100 rpcs in flight from one process all succeed, each paired with its own reply."""
    await container.spawn(EchoService)
    client = await client_process(container)
    echo = EchoClient(client)
    results = await defer.gatherResults([defer.ensureDeferred(echo.echo({"i": i})) for i in range(100)])
    assert results == [{"i": i} for i in range(100)]
    assert len(client.conversations) == 0


# -- cancellable requests --------------------------------------------------------------------------------
class Waiter(ServiceProcess):
    """An op that waits until the test fires it, registered as cancellable."""

    service_name = "waiter"

    def slc_init(self) -> None:
        self.pending: list[defer.Deferred[Any]] = []
        self.outcomes: list[str] = []

    async def op_wait(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        work: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(work)
        try:
            return await self.cancellable(msg, work)
        except defer.CancelledError:
            self.outcomes.append("cancelled")
            raise


class WaiterClient(ServiceClient):
    service_name = "waiter"


def test_cancelling_a_cancellable_call_cancels_the_work_at_the_instance() -> None:
    """The instance agrees with its pid; cancelling the caller's Deferred sends it `cancel`, and the
    op's work is cancelled there (not only given up by the caller)."""
    system = ClockedSystem()
    svc = system.spawn(Waiter)
    caller = system.spawn(Process, name="caller")
    d = WaiterClient(caller).cancellable_call("wait", None, timeout=600)
    system.pump()
    assert len(svc.pending) == 1 and not d.called
    d.cancel()
    system.pump()
    failure_of(d, defer.CancelledError)
    assert svc.outcomes == ["cancelled"] and svc.pending[0].called and not svc._cancellable


def test_a_timed_out_cancellable_call_cancels_the_work_too() -> None:
    """When the call times out, the work at the instance is cancelled as well."""
    system = ClockedSystem()
    svc = system.spawn(Waiter)
    caller = system.spawn(Process, name="caller")
    d = WaiterClient(caller).cancellable_call("wait", None, timeout=30)
    system.pump()
    system.advance(30)
    failure_of(d, ConversationTimeout)
    assert svc.outcomes == ["cancelled"]


def test_a_finished_cancellable_call_answers_normally_and_only_its_caller_may_cancel() -> None:
    """The op's result comes back as from rpc_send; a cancel from another broker user is refused (403),
    whatever ``sender`` it claims."""
    system = ClockedSystem()
    svc = system.spawn(Waiter)
    caller = system.spawn(Process, name="caller")
    elsewhere = system.start_container("elsewhere", "clocked", {"ion.core.messaging": {"memory_user": "mallory"}})
    other = system.spawn_in(elsewhere, Process, name="other")
    assert other is not None
    agreed: list[Any] = []
    d = caller.request("waiter", "wait", None, timeout=600, on_agree=lambda c, h: agreed.append((c, h)))
    system.pump()
    ((content, headers),) = agreed
    assert content == {"pid": svc.id}
    # The sender header names the caller's own queue: a claim, which decides nothing.
    refused = other.rpc_send(svc.id, "cancel", {"conv": headers["conv-id"]},
                             headers={"sender": caller.backend_name})
    system.pump()
    assert failure_of(refused, ReceivedApplicationError).response_code == 403
    svc.pending[0].callback({"done": True})
    system.pump()
    assert system.result(d)[0] == {"done": True} and svc.outcomes == []
    late = caller.rpc_send(svc.id, "cancel", {"conv": headers["conv-id"]})
    assert system.result(late)[0] == {"cancelled": False}


# -- work in flight and terminate's first phase (slc_drain) ---------------------------------------------
class Tracker(ServiceProcess):
    """An op whose work (not caller-cancellable) is tracked; terminate gives it ``drain_timeout``."""

    service_name = "tracker"
    drain_timeout = 5.0
    max_concurrent = 4  # a request is refused while another one's work is waited for
    #: The receivers' states when slc_drain ran (None: it did not run).
    states_at_drain: list[State] | None = None

    def slc_init(self) -> None:
        self.pending: list[defer.Deferred[Any]] = []

    def slc_drain(self) -> Any:
        self.states_at_drain = [r.state for r in self.receivers]
        return super().slc_drain()

    async def op_work(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        # No draining check of its own: track() refuses work started once terminate has begun.
        work: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(work)
        return await self.track(work)


def test_terminate_waits_drain_timeout_for_tracked_work_while_its_queues_still_serve() -> None:
    """slc_drain runs first, every queue still consuming: a new request is refused (503) meanwhile, and
    the tracked work that ends within drain_timeout answers its caller normally."""
    system = ClockedSystem()
    svc = system.spawn(Tracker)
    caller = system.spawn(Process, name="caller")
    call = caller.rpc_send(svc.id, "work", timeout=60)
    system.pump()
    assert len(svc.in_flight) == 1
    stopping = system.container.proc_manager.terminate_process(svc.id)
    system.pump()
    assert svc.states_at_drain == [State.ACTIVE] * len(svc.receivers) and svc.draining
    late = caller.rpc_send(svc.id, "work", timeout=60)
    system.pump()
    assert failure_of(late, ReceivedError).response_code == 503
    system.advance(4.9)
    no_result(stopping)
    svc.pending[0].callback("done")
    system.pump()
    assert success_of(call)[0] == "done"
    success_of(stopping)
    assert svc.state is State.TERMINATED and not svc.in_flight


def test_tracked_work_that_outlives_drain_timeout_is_cancelled() -> None:
    """At drain_timeout the tracked work is cancelled: its op fails as cancelled (409), then the process ends."""
    system = ClockedSystem()
    svc = system.spawn(Tracker)
    caller = system.spawn(Process, name="caller")
    call = caller.rpc_send(svc.id, "work", timeout=60)
    system.pump()
    stopping = system.container.proc_manager.terminate_process(svc.id)
    system.advance(5)
    success_of(stopping)
    assert svc.pending[0].called and not svc.in_flight
    assert failure_of(call, ReceivedApplicationError).response_code == 409


def test_a_service_without_drain_timeout_leaves_its_work_to_the_op_drain() -> None:
    """drain_timeout None (the default): terminate does not cancel tracked work; the ops get
    terminate_timeout, then their callers a 503, as for any process."""
    system = ClockedSystem(config={"ion.core.process": {"terminate_timeout": 2}})
    svc = system.spawn(Waiter)
    caller = system.spawn(Process, name="caller")
    call = WaiterClient(caller).cancellable_call("wait", None, timeout=600)
    system.pump()
    stopping = system.container.proc_manager.terminate_process(svc.id)
    system.advance(1.9)
    no_result(stopping)
    assert not svc.pending[0].called
    system.advance(0.1)
    success_of(stopping)
    assert failure_of(call, ReceivedError).response_code == 503 and svc.outcomes == []


@pytest.mark.parametrize("cls", ["Tracker", "ion.services.deploy.service.DeployService",
                                 "ion.services.fetch.service.FetchService",
                                 "ion.services.cache.service.CacheService"])
def test_a_service_terminated_before_it_was_initialized_ends_cleanly(cls: str) -> None:
    """A process whose slc_init never ran terminates to TERMINATED: neither slc_drain nor slc_terminate runs
    (they settle what slc_init set up)."""
    from ion.core.process import load_process_class

    system = ClockedSystem()
    process_class = Tracker if cls == "Tracker" else load_process_class(*cls.rsplit(".", 1))
    proc = process_class(system.container)
    system.result(proc.terminate())
    assert proc.state is State.TERMINATED
    assert getattr(proc, "states_at_drain", None) is None
