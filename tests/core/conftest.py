"""Fixtures for the core tests: a clocked system and captured log events."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from ion.testing import ClockedSystem


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    """Every log event published while the test runs (the observer is removed afterwards)."""
    events: list[dict[str, Any]] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


@pytest.fixture
def system() -> ClockedSystem:
    """A container on a task.Clock: nothing is delivered until pumped, no timeout fires until advanced."""
    return ClockedSystem()
