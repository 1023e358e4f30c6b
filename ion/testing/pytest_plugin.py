"""pytest fixtures for ioncore (enable with ``pytest_plugins = ["ion.testing.pytest_plugin"]``).

- ``broker``: a fresh embedded broker.
- ``container_factory``: makes started containers on that broker; terminates them all at teardown.
- ``container``: one started container (sysname ``test``).
- ``clocked``: a :class:`~ion.testing.ClockedSystem` (container on a ``task.Clock``).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import pytest
import pytest_twisted

from ion.core.container import Container
from ion.core.messaging.memory import MemoryBroker
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
def clocked() -> Any:
    return ClockedSystem()
