"""Fixtures shared by the messaging tests and the transport contract suite (``contract.py``).

Each transport's test module defines ``transport_factory``; ``unique`` is here
so that every transport's run of the contract uses it.
"""

from __future__ import annotations

import uuid

import pytest

# contract.py is not a test module: ask pytest to rewrite its asserts so failures show values.
pytest.register_assert_rewrite("tests.core.messaging.contract")


@pytest.fixture
def unique() -> str:
    """A fresh name prefix for this test's exchanges and queues (``t<hex>``)."""
    return f"t{uuid.uuid4().hex[:12]}"
