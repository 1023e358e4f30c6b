"""pytest-twisted's async fixture decorators, or stand-ins that skip when it is not installed.

ioncore's pytest plugins are loaded (``pytest11`` entry points) in every
project that installs ioncore, with or without its ``[test]`` extra; a plain
install has no pytest-twisted. Importing it at module level would stop pytest
from starting at all there, so its fixtures are made through these: with
pytest-twisted, its decorators; without, a fixture of the same name that skips
the test using it and says what to install.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

try:
    import pytest_twisted
except ImportError:  # ioncore without [test]
    pytest_twisted = None

__all__ = ["async_fixture", "async_yield_fixture", "AVAILABLE"]

#: Whether pytest-twisted is installed (the async fixtures work).
AVAILABLE = pytest_twisted is not None


def _unavailable(fn: Callable[..., Any]) -> Any:
    def fixture() -> None:
        why = f"the {fn.__name__!r} fixture needs pytest-twisted (pip install 'ioncore[test]')"
        from ion.testing import on_ci

        if on_ci():
            pytest.fail(why, pytrace=False)  # on CI a missing test dependency is a failure, never a skip
        pytest.skip(why)

    fixture.__doc__ = fn.__doc__
    return pytest.fixture(name=fn.__name__)(fixture)


def async_fixture(fn: Callable[..., Any]) -> Any:
    """``pytest_twisted.async_fixture``, or a fixture that skips without pytest-twisted."""
    return pytest_twisted.async_fixture(fn) if pytest_twisted is not None else _unavailable(fn)


def async_yield_fixture(fn: Callable[..., Any]) -> Any:
    """``pytest_twisted.async_yield_fixture``, or a fixture that skips without pytest-twisted."""
    return pytest_twisted.async_yield_fixture(fn) if pytest_twisted is not None else _unavailable(fn)
