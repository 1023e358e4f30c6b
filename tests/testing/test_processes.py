"""WatchedProcess tells when a child prints something, and fails clearly when it never will."""

from __future__ import annotations

import sys

import pytest
import pytest_twisted

from ion.testing.processes import WatchedProcess


def start(code: str) -> WatchedProcess:
    from twisted.internet import reactor

    child = WatchedProcess("py")
    reactor.spawnProcess(child, sys.executable, [sys.executable, "-u", "-c", code])
    return child


@pytest_twisted.ensureDeferred
async def test_wait_for_fires_on_the_text_and_stop_ends_the_child():
    """wait_for fires once the output holds the text; stop() ends a running child."""
    child = start("import sys, time; print('ready', flush=True); sys.stdin.read()")
    await child.wait_for(b"ready", timeout=30)
    code = await child.stop(timeout=10)
    assert code != 0 and child.exit_code == code


@pytest_twisted.ensureDeferred
async def test_exit_before_the_text_fails_with_the_output():
    """A child that exits without printing the text fails the wait, showing its output."""
    child = start("print('something else')")
    with pytest.raises(RuntimeError, match="(?s)exited \\(0\\).*something else"):
        await child.wait_for(b"never printed", timeout=30)
    await child.ended
    with pytest.raises(RuntimeError, match="(?s)exited \\(0\\).*something else"):
        await child.wait_for(b"never printed", timeout=30)  # asked after the exit: fails at once
