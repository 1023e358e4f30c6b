"""The test helpers shipped in ion.testing behave as documented."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from ion.core.exceptions import ConversationTimeout
from ion.core.lifecycle import State
from ion.core.process import Process
from ion.services.hello import HelloService
from ion.testing import ClockedSystem, ContainerFactory, client_process, rpc


class Slow(Process):
    """Never answers ``wait`` until told to."""

    name = "slow"

    def slc_init(self) -> None:
        self.pending: defer.Deferred[str] = defer.Deferred()

    def op_wait(self, content, headers, msg):
        return self.pending


@pytest_twisted.ensureDeferred
async def test_factory_terminates_every_container(broker):
    """ContainerFactory.teardown terminates every container it made, the last first."""
    factory = ContainerFactory(broker)
    a = await factory()
    b = await factory(sysname="other")
    await factory.teardown()
    assert a.state is State.TERMINATED and b.state is State.TERMINATED
    assert factory.containers == []


@pytest_twisted.ensureDeferred
async def test_factory_containers_share_the_broker(container_factory):
    """Two containers of one factory and one sysname reach each other's services."""
    server = await container_factory()
    caller = await container_factory()
    await server.spawn(HelloService)
    assert await rpc(caller, "hello", "hello", "x") == {"value": "Hello there, x"}


@pytest_twisted.ensureDeferred
async def test_rpc_helper_leaves_no_process(container):
    """rpc() terminates the throw-away client process it made."""
    await container.spawn(HelloService)
    before = set(container.proc_manager.processes)
    await rpc(container, "hello", "hello", "y")
    assert set(container.proc_manager.processes) == before


@pytest_twisted.ensureDeferred
async def test_process_factory_gives_the_instance(container, process_factory):
    """process_factory spawns into the container fixture and returns the ACTIVE instance."""
    proc = await process_factory(HelloService, greeting="Hi")
    assert isinstance(proc, HelloService) and proc.state is State.ACTIVE
    client = await client_process(container)
    content, _ = await client.rpc_send(proc.id, "hello", "z")
    assert content == {"value": "Hi, z"}


def test_clocked_system_holds_time_still():
    """In a ClockedSystem an RPC times out only when the test advances the clock."""
    system = ClockedSystem(config={"ion.core.process": {"rpc_timeout": 5}})
    slow = system.spawn(Slow)
    client = system.spawn(Process)
    d = client.rpc_send(slow.id, "wait", None)
    system.pump()
    assert not d.called
    system.advance(4.9)
    assert not d.called
    system.advance(0.2)
    with pytest.raises(ConversationTimeout):
        system.result(d)


def test_clocked_result_reports_unfired():
    """ClockedSystem.result says so when a Deferred never fires."""
    system = ClockedSystem()
    with pytest.raises(AssertionError, match="has not fired"):
        system.result(defer.Deferred())
