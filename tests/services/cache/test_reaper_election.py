"""One reaper per system: the single-active-consumer election between Cache service instances.

Two containers of one system share an embedded broker and a ``task.Clock``; on
RabbitMQ the same election runs in two containers of this process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from ion.services.cache.reaper import STATE_FILE
from ion.services.cache.service import CacheClient, CacheService
from ion.testing import ClockedCluster, ContainerFactory, client_process

TICK = 5.0
HOUR = 3600.0


class Pair(ClockedCluster):
    """Two containers of system ``reapsys`` on one embedded broker and one clock, each with a Cache service."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.clock.advance(1_700_000_000)
        self.root = root
        self.services = []
        for contid in ("c1", "c2"):
            container = self.start_container(contid, "reapsys")
            self.services.append(self.spawn_in(container, CacheService, {
                "root": str(root), "host_id": "h1", "reap_tick": TICK, "reap_interval": HOUR, "reap_keep": 0,
                "reap_min_idle": 0, "verify_interval": HOUR}))

    def advance(self, seconds: float, step: float | None = 1.0) -> None:
        super().advance(seconds, step)


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return Pair(tmp_path / "cache")


def test_one_instance_reaps_and_the_other_takes_over_when_it_stops(pair: Pair) -> None:
    """Every instance sends ticks; the broker hands them all to one consumer, which runs the rounds.
    When its container stops, the other instance gets the ticks and reaps from then on."""
    first, second = pair.services
    pair.advance(3 * TICK)
    assert first.election.ticks_received >= 6 and second.election.ticks_received == 0
    assert (first.reaper.rounds, second.reaper.rounds) == (1, 0)
    pair.advance(HOUR)
    assert (first.reaper.rounds, second.reaper.rounds) == (2, 0)
    pair.result(pair.containers[0].terminate())
    pair.advance(TICK)
    assert second.election.ticks_received >= 1
    pair.advance(HOUR)
    assert (first.reaper.rounds, second.reaper.rounds) == (2, 1)  # its interval counts from the last round


def test_a_container_that_dies_hands_the_election_on(pair: Pair) -> None:
    """A container whose connection just drops (a crash): the broker makes the other consumer active."""
    first, second = pair.services
    pair.advance(TICK)
    assert first.election.ticks_received and not second.election.ticks_received
    pair.result(pair.containers[0].transport.close())  # no terminate: as if the process died
    pair.advance(2 * TICK)
    assert second.election.ticks_received >= 1


def test_only_the_elected_instance_verifies_on_schedule(pair: Pair) -> None:
    """Scheduled verify rounds run in the elected instance only (one read of the shared cache per
    round, within one bandwidth cap); after a takeover, in the new one."""
    first, second = pair.services
    pair.advance(HOUR + TICK)
    assert first.verifier.last_report is not None and second.verifier.last_report is None
    assert first.election.is_elected() and not second.election.is_elected()
    pair.result(pair.containers[0].terminate())
    pair.advance(HOUR)
    assert second.election.is_elected() and second.verifier.last_report is not None


def test_reap_now_reaches_the_elected_reaper(pair: Pair) -> None:
    """CacheClient.reap() is an RPC to the election queue: the active instance runs a round now
    and answers; reap_report reads the last report from the cache root, from any instance."""
    first, second = pair.services
    pair.advance(TICK)
    caller = pair.result(client_process(pair.containers[1]))
    report = pair.result(CacheClient(caller).reap())
    assert report.reaper == first.id and first.reaper.rounds == 2 and second.reaper.rounds == 0
    assert (pair.root / STATE_FILE).exists()
    last = pair.result(CacheClient(caller).reap_report())
    assert last.started == report.started and last.reaper == first.id


# -- on RabbitMQ ------------------------------------------------------------------------------------------
async def _until(check: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        await task.deferLater(reactor, 0.05, lambda: None)


@pytest.mark.amqp
@pytest_twisted.ensureDeferred
async def test_election_on_rabbitmq(amqp_url: str, tmp_path: Path) -> None:
    """On RabbitMQ: one of two instances gets the ticks; stopping its container hands them on."""
    factory = ContainerFactory(broker_url=amqp_url)
    try:
        services = []
        for _ in range(2):
            container = await factory(sysname="reapsys")
            pid = await container.spawn(CacheService, {"root": str(tmp_path / "cache"), "reap_tick": 0.1,
                                                       "reap_interval": HOUR})
            services.append(container.proc_manager.get(pid))
        first, second = services
        await _until(lambda: first.election.ticks_received >= 4, what="ticks at the first instance")
        assert second.election.ticks_received == 0 and first.reaper.rounds == 1
        await factory.containers[0].terminate()
        await _until(lambda: second.election.ticks_received >= 2, what="ticks at the second instance")
        assert second.reaper.rounds == 0  # the first one's round was less than an interval ago
    finally:
        await factory.teardown()
