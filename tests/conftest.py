"""Test configuration: ioncore's own fixtures, and the reactor pytest-twisted runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ion.core.threads import BlockingPool

pytest_plugins = ["ion.testing.pytest_plugin", "ion.testing.pytest_servers"]


@pytest.fixture
def pool() -> Iterator[BlockingPool]:
    """A started blocking pool on the running reactor, stopped after the test."""
    from twisted.internet import reactor

    p = BlockingPool(reactor, maxthreads=4)
    p.start()
    yield p
    p.stop()
