"""pytest fixtures for ioncore (enable with ``pytest_plugins = ["ion.testing.pytest_plugin"]``).

- ``broker``: a fresh embedded broker.
- ``container_factory``: makes started containers on that broker; terminates them all at teardown.
- ``container``: one started container (sysname ``test``).
- ``clocked``: a :class:`~ion.testing.ClockedSystem` (container on a ``task.Clock``).
- ``process_factory``: ``await process_factory(ServiceCls, **spawnargs)`` spawns a
  process into ``container`` and returns the instance (terminated with the container).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import pytest
import pytest_twisted

from ion.core.container import Container
from ion.core.messaging.memory import MemoryBroker
from ion.core.process import Process
from ion.testing import ClockedSystem, ContainerFactory


@pytest.fixture
def broker() -> MemoryBroker:
    from twisted.internet import reactor

    return MemoryBroker(reactor)  # type: ignore[arg-type]


@pytest_twisted.async_yield_fixture
async def container_factory(broker: MemoryBroker) -> AsyncIterator[ContainerFactory]:
    factory = ContainerFactory(broker)
    yield factory
    await factory.teardown()


@pytest_twisted.async_fixture
async def container(container_factory: ContainerFactory) -> Container:
    return await container_factory()


@pytest.fixture
def process_factory(container: Container) -> Any:
    async def spawn(cls: type[Process], name: str | None = None, **spawnargs: Any) -> Process:
        pid = await container.spawn(cls, spawnargs, name=name)
        proc = container.proc_manager.get(pid)
        assert proc is not None
        return proc

    return spawn


@pytest.fixture
def clocked() -> Any:
    return ClockedSystem()
