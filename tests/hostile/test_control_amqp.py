"""Control operations attempted by another broker login, with plain pika, against RabbitMQ.

The attacker of issue 12: a RabbitMQ user with full rights on the system's vhost (as any
application of the system has) but not one of its operators, and no ioncore import. Each case
was a hole: spawning a Deploy instance that writes anywhere, stopping a service, cancelling
someone else's request by forging ``sender``, running the cache's destructive ops. Each is now
a 403 decided on the broker-validated login, and the system is unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from ion.core.agent import agent_queue
from ion.core.container import Container
from ion.core.lifecycle import State
from ion.core.service import ServiceClient, ServiceProcess
from ion.services.hello import HelloClient, HelloService
from ion.testing import ContainerFactory, client_process
from tests.hostile.pika_client import PlainClient

pytestmark = pytest.mark.amqp

SYS = "hostile"


class Waiter(ServiceProcess):
    """A cancellable op that waits until the test fires it."""

    service_name = "waiter"

    def slc_init(self) -> None:
        self.pending: list[defer.Deferred[Any]] = []
        #: Fires with the request's conversation id once its work is registered as cancellable.
        self.started: defer.Deferred[str] = defer.Deferred()
        #: Fires when the work was cancelled.
        self.cancelled: defer.Deferred[None] = defer.Deferred()

    async def op_wait(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        work: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(work)
        registered = self.cancellable(msg, work)
        self.started.callback(msg["conv-id"])
        try:
            return await registered
        except defer.CancelledError:
            self.cancelled.callback(None)
            raise


@pytest_twisted.async_yield_fixture
async def system(amqp_url: str, tmp_path: Path) -> AsyncIterator[Container]:
    """One container of system ``hostile`` on the test's vhost, logged in as the system's own user."""
    factory = ContainerFactory(broker_url=amqp_url)
    container = await factory(sysname=SYS, config={
        "ion.services.cache": {"root": str(tmp_path / "cache"), "host_id": "test-host", "reap_interval": None,
                               "verify_interval": None},
        "ion.services.unpack": {"allowed_roots": [str(tmp_path / "cache")]},
        "ion.services.deploy": {"allowed_destinations": [str(tmp_path / "dest")], "job_dir": False},
    })
    yield container
    await factory.teardown()


@pytest.fixture
def attacker(rabbitmq: Any, amqp_url: str, amqp_user: Any) -> Callable[..., defer.Deferred[Any]]:
    """``attacker(receiver, op, content, headers=None)``: one plain-pika call as another login."""
    from urllib.parse import unquote, urlsplit

    vhost = unquote(urlsplit(amqp_url).path.lstrip("/")) or "/"
    url = rabbitmq.url(vhost, amqp_user.name, amqp_user.password)

    def call(receiver: str, op: str, content: Any = None, headers: dict[str, Any] | None = None,
             timeout: float = 15, anonymous: bool = False) -> Any:
        # A well-behaved client stamps its login (user_id); an anonymous one does not.
        client = PlainClient(url, SYS, None if anonymous else amqp_user.name)
        try:
            return client.call(receiver, op, content, headers, timeout)
        finally:
            client.close()

    def in_thread(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return threads.deferToThread(call, *args, **kwargs)

    return in_thread


def _refused(reply: dict[str, Any] | None, user: str | None) -> None:
    assert reply is not None, "no answer: a refusal must be answered, not left to time out"
    assert (reply["status"], reply["response-code"]) == ("ERROR", 403), reply
    assert reply["content"]["error"] == "UnauthorizedError"
    assert f"broker user {user!r} is not an operator of system {SYS}" in reply["content"]["message"]


@pytest_twisted.ensureDeferred
async def test_another_login_cannot_spawn_a_deploy_that_writes_anywhere(system: Container, attacker: Any,
                                                                       amqp_user: Any) -> None:
    """Issue 12 case 1: ``spawn`` of a DeployService with ``allowed_destinations: ["/"]`` at the agent
    is a 403 for another login; nothing is spawned, nothing consumes the deploy queue. From the
    system's own login the same spawn fails too (400): spawnargs may not widen a bound."""
    before = set(system.proc_manager.processes)
    content = {"module": "ion.services.deploy.service", "procclass": "DeployService",
               "spawnargs": {"allowed_destinations": ["/"]}}
    _refused(await attacker(agent_queue(SYS, system.id), "spawn", content,
                            headers={"user-id": "guest", "sender": f"{system.id}.1"}), amqp_user.name)
    # Without user_id the broker vouches for no one: no broker user, no operator.
    _refused(await attacker(agent_queue(SYS, system.id), "spawn", content, anonymous=True), None)
    assert set(system.proc_manager.processes) == before
    proc = await client_process(system)
    with pytest.raises(Exception) as info:
        await proc.rpc_send(agent_queue(SYS, system.id), "spawn", content)
    assert getattr(info.value, "response_code", None) == 400 and "may only be narrowed" in str(info.value)
    assert not [p for p in system.proc_manager.processes.values() if p.proc_name == "deploy"]


@pytest_twisted.ensureDeferred
async def test_another_login_cannot_stop_a_service(system: Container, attacker: Any, amqp_user: Any) -> None:
    """Issue 12 case 2: ``terminate`` to ``<sys>.hello`` is a 403; the service still answers."""
    await system.spawn(HelloService)
    hello = system.proc_manager.find("hello")
    assert hello is not None
    _refused(await attacker(f"{SYS}.hello", "terminate", None), amqp_user.name)
    _refused(await attacker(hello.id, "terminate", None), amqp_user.name)
    assert hello.state is State.ACTIVE
    proc = await client_process(system)
    assert await HelloClient(proc).hello("still") == "Hello there, still"


@pytest_twisted.ensureDeferred
async def test_cancel_is_decided_on_the_broker_user_not_the_sender(system: Container, attacker: Any,
                                                                   amqp_user: Any) -> None:
    """Issue 12 case 6: a ``cancel`` of another login's request, forging its ``sender``, is a 403;
    the work goes on, and its own caller can still cancel it."""
    await system.spawn(Waiter)
    waiter = system.proc_manager.find("waiter")
    assert isinstance(waiter, Waiter)
    caller = await client_process(system)
    call = ServiceClient(caller, "waiter").cancellable_call("wait", None, timeout=60)
    call.addErrback(lambda f: f.trap(defer.CancelledError))
    conv = await waiter.started
    forged = {"sender": caller.backend_name, "sender-name": caller.proc_name, "user-id": caller.user_id}
    _refused(await attacker(waiter.id, "cancel", {"conv": conv}, headers=forged), amqp_user.name)
    assert not waiter.cancelled.called and not waiter.pending[0].called
    call.cancel()  # its own caller (the same broker login) may
    await waiter.cancelled


@pytest_twisted.ensureDeferred
async def test_another_login_cannot_run_the_caches_destructive_ops(system: Container, attacker: Any,
                                                                   amqp_user: Any) -> None:
    """Cache clear, prune, verify, repair and a forced reap are control operations: 403 each; so are
    the ops only the system's own services use on the cache (lock, publish, staging), and Unpack's
    unpack (which could extract into a published entry)."""
    await system.app_manager.start_app("cache")
    await system.app_manager.start_app("unpack")
    key = {"repo_id": "r.file", "platform": "linux", "name": "zlib", "version": "1.2", "unpack": True}
    for op, content in [("clear", {}), ("prune", {"keep": 0}), ("verify", {}), ("repair", {}),
                        ("verify_round", {}), ("reap_tick", {"force": True}),
                        ("lock", {"key": key, "lease": 10 ** 9}), ("renew", {"token": "t"}),
                        ("unlock", {"token": "t"}), ("new_staging", {}), ("discard_staging", {"path": "/"}),
                        ("publish", {"token": "t", "staging": "/", "files": {}})]:
        _refused(await attacker(f"{SYS}.cache", op, content), amqp_user.name)
    _refused(await attacker(f"{SYS}.unpack", "unpack", {"archive": "/tmp/evil.tgz", "target": "/tmp/x"}),
             amqp_user.name)
    # Its ordinary ops answer that login.
    reply = await attacker(f"{SYS}.cache", "list", {})
    assert reply is not None and reply["status"] == "OK"


@pytest_twisted.ensureDeferred
async def test_a_process_of_the_system_keeps_its_control(system: Container) -> None:
    """The container's own login is an operator: its agent spawn and terminate work as before."""
    proc = await client_process(system)
    pid, _ = await proc.rpc_send(agent_queue(SYS, system.id), "spawn", {"module": "ion.services.hello"})
    assert pid in system.proc_manager.processes
    ended: defer.Deferred[State] = defer.Deferred()
    system.proc_manager.add_exit_listener(lambda p, state: p.id == pid and not ended.called and ended.callback(state))
    await proc.rpc_send(pid, "terminate", None)
    assert await ended is State.TERMINATED
