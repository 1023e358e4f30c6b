"""Fixtures for the core tests: a clocked system and captured log events."""

from __future__ import annotations

import pytest

from ion.testing import ClockedSystem


@pytest.fixture
def system() -> ClockedSystem:
    """A container on a task.Clock: nothing is delivered until pumped, no timeout fires until advanced."""
    return ClockedSystem()
