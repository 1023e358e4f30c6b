"""Fault suite: the reaper's container is killed; another container's reaper takes over (issue 6).

Two ``twistd -n cc cache.app`` containers in separate OS processes on the test
RabbitMQ share one cache folder. One of them is elected and reaps; it is
SIGKILLed; the other must take over within seconds, and neither may ever evict
an entry a live destination links to.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from ion.core.threads import SynchronousPool
from ion.services.cache.core import Cache
from ion.services.cache.entry import EntryKey
from ion.services.cache.reaper import record_link
from tests.core.test_multicontainer import REPO, TWISTD, ContainerProcess
from tests.services.cache.conftest import fired, put

pytestmark = [pytest.mark.amqp, pytest.mark.slow]

ROUND = re.compile(r"(?P<pid>\S+): reap round over (?P<n>\d+) entries")
HOST = "reaper-failover-host"


def _child(amqp_url: str, root: Path, name: str) -> ContainerProcess:
    child = ContainerProcess(name)
    settings = ",".join([f"ion.services.cache.root={root}", "ion.services.cache.reap_tick=0.2",
                         "ion.services.cache.reap_interval=1", "ion.services.cache.reap_keep=0",
                         "ion.services.cache.reap_min_idle=0"])
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "cc", "--no-shell", "--broker", amqp_url,
            "-s", "reapsys", "-a", settings, "res/apps/cache.app"]
    env = {k: v for k, v in os.environ.items() if k not in ("ION_BROKER_USERNAME", "ION_BROKER_PASSWORD")}
    env["ION_HOST_ID"] = HOST
    reactor.spawnProcess(child, sys.executable, argv, env=env, path=str(REPO))
    return child


async def _first_round(children: list[ContainerProcess], after: dict[str, int],
                       timeout: float = 30) -> tuple[ContainerProcess, float]:
    """The first child to log a reap round (after the given output lines), and when."""
    ds = [c.wait_for(ROUND.pattern, timeout, after=after.get(c.name, 0)).addCallback(lambda _m, c=c: c)
          for c in children]
    try:
        winner, _index = await defer.DeferredList(ds, fireOnOneCallback=True, consumeErrors=True)
    finally:
        for d in ds:
            if not d.called:
                d.cancel()
    if not isinstance(winner, ContainerProcess):
        raise AssertionError("no container logged a reap round:\n" + "\n---\n".join(c.output[-3000:]
                                                                                    for c in children))
    return winner, time.monotonic()


@pytest_twisted.ensureDeferred
async def test_reaper_leader_killed_another_takes_over(amqp_url: str, tmp_path: Path) -> None:
    """Kill the elected reaper's container: the other one reaps within seconds; a linked entry survives
    every round, an unlinked one is evicted."""
    root = tmp_path / "cache"
    cache = Cache(root, host_id=HOST, pool=SynchronousPool(), lock_timeout=60)
    linked, loose = EntryKey("repo.file", "linux", "tool", "1.0"), EntryKey("repo.file", "linux", "tool", "2.0")
    put(cache, linked)
    dest = tmp_path / "app"
    dest.mkdir()
    record_link(cache.entry_path(linked), dest, host_id=HOST)
    os.symlink(cache.entry_path(linked) / "bin", dest / "bin")
    children = [_child(amqp_url, root, "container A"), _child(amqp_url, root, "container B")]
    try:
        for child in children:
            await child.ready()
        leader, _ = await _first_round(children, {})
        other = next(c for c in children if c is not leader)
        put(cache, loose)  # after the first round: the next ones must evict it
        await leader.wait_for(ROUND.pattern, 30, after=len(leader.lines))
        await leader.wait_for(ROUND.pattern, 30, after=len(leader.lines))
        assert not other.count("reap round"), "two reapers acted at once"
        assert not cache.entry_path(loose).exists()
        assert fired(cache.lookup(linked)) is not None and (dest / "bin" / "tool").exists()

        leader.signal("KILL")
        killed_at = time.monotonic()
        assert await leader.exited(30) == -9
        winner, at = await _first_round([other], {other.name: len(other.lines)})
        takeover = at - killed_at
        print(f"\nreaper takeover after SIGKILL of the leader: {takeover:.2f} s")
        assert takeover < 10, f"takeover took {takeover:.1f} s"
        await other.wait_for(ROUND.pattern, 30, after=len(other.lines))
        assert fired(cache.lookup(linked)) is not None and (dest / "bin" / "tool").exists()
    finally:
        for child in children:
            await child.stop()
