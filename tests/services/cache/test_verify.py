"""Periodic integrity verification of the cache (ion.services.cache.verify), on a task.Clock."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task

from ion.core.exceptions import ConfigurationError
from ion.core.process import Process, Receiver
from ion.services.cache.core import Cache
from ion.services.cache.entry import ENTRY_FILE, EntryKey
from ion.services.cache.service import CacheClient, CacheService
from ion.services.cache.verify import (
    BAD,
    BAD_TO_GOOD,
    EVENT_CHANGE,
    EVENT_ROUND,
    GOOD,
    GOOD_TO_BAD,
    SKIPPED,
    CacheVerifier,
    RateLimiter,
    VerifyConfig,
    VerifyReport,
)
from ion.testing import client_process

from .conftest import GatedPool, SyncPool, fired, put

OTHER = EntryKey("repo.file", "linux", "lib", "2.0", False)


class Events:
    """Collects what the verifier publishes: (routing key, content)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, routing_key: str, content: dict[str, Any]) -> None:
        self.sent.append((routing_key, content))

    def changes(self) -> list[tuple[str, str]]:
        return [(c["entry"], c["outcome"]) for k, c in self.sent if k == EVENT_CHANGE]

    def rounds(self) -> list[dict[str, Any]]:
        return [c for k, c in self.sent if k == EVENT_ROUND]


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def make_verifier(cache: Cache, events: Events) -> Callable[..., CacheVerifier]:
    def make(c: Cache | None = None, **config: Any) -> CacheVerifier:
        config.setdefault("interval", 60.0)
        config.setdefault("bandwidth", None)
        return CacheVerifier(c or cache, VerifyConfig(**config), publish=events)

    return make


def flip(path: Path) -> None:
    """Flip one byte of ``path`` in place, as bit rot does: same size and same mtime, so lookup's
    checks cannot see it (a file written since its entry was published is re-hashed by lookup)."""
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def outcomes(report: VerifyReport | None) -> dict[EntryKey, str]:
    assert report is not None
    return {o.key: o.outcome for o in report.outcomes}


def test_flipped_bytes_caught_by_scheduled_round(cache: Cache, key: EntryKey, clock: task.Clock, events: Events,
                                                 make_verifier: Callable[..., CacheVerifier]) -> None:
    """A byte flipped in a cached file is found by the round the schedule runs: good→bad, quarantined,
    an event published; lookup misses it from then on, so the next deploy fetches it again."""
    info = put(cache, key, {"bin/tool": b"#!/bin/sh\necho tool\n" * 100})
    put(cache, OTHER, {"lib.so": b"\x7fELF" * 1000})
    verifier = make_verifier()
    fired(verifier.start())
    clock.advance(59)
    assert verifier.last_report is None and events.sent == []
    clock.advance(1)
    assert outcomes(verifier.last_report) == {key: GOOD, OTHER: GOOD}
    assert events.changes() == [] and len(events.rounds()) == 1
    flip(info.path / "bin/tool")
    assert fired(cache.lookup(key)) is not None  # same size: lookup serves it, only a re-hash sees it
    clock.advance(60)
    report = verifier.last_report
    assert report is not None and report.trigger == "schedule"
    assert outcomes(report) == {key: GOOD_TO_BAD, OTHER: GOOD}
    bad = next(o for o in report.outcomes if o.key == key)
    assert bad.action == "quarantined" and "bin/tool" in bad.problems and "sha256" in bad.problems["bin/tool"]
    assert bad.moved_to is not None and (bad.moved_to / "bin/tool").is_file()
    assert not info.path.exists()
    assert fired(cache.lookup(key)) is None
    assert events.changes() == [(str(key), GOOD_TO_BAD)]
    change = next(c for k, c in events.sent if k == EVENT_CHANGE)
    assert change["key"] == key.to_wire() and change["previous"] == GOOD and change["action"] == "quarantined"
    summary = events.rounds()[-1]
    assert summary["counts"][GOOD_TO_BAD] == 1 and summary["counts"][GOOD] == 1 and summary["entries"] == 2


def test_refetched_entry_reports_bad_to_good(cache: Cache, key: EntryKey, events: Events,
                                             make_verifier: Callable[..., CacheVerifier]) -> None:
    """Until it is fetched again a quarantined entry stays bad (awaiting refetch, no new event); the round
    after the refetch says bad→good and publishes it; the one after that says good."""
    info = put(cache, key)
    verifier = make_verifier()
    flip(info.path / "bin/tool")
    assert outcomes(fired(verifier.run_round())) == {key: GOOD_TO_BAD}
    again = fired(verifier.run_round())
    assert outcomes(again) == {key: BAD} and again.outcomes[0].action == "awaiting refetch"
    put(cache, key)  # what the next deploy does: lookup misses, fetch publishes it again
    assert outcomes(fired(verifier.run_round())) == {key: BAD_TO_GOOD}
    assert outcomes(fired(verifier.run_round())) == {key: GOOD}
    assert events.changes() == [(str(key), GOOD_TO_BAD), (str(key), BAD_TO_GOOD)]


def test_locked_entry_is_skipped(cache: Cache, key: EntryKey, events: Events,
                                 make_verifier: Callable[..., CacheVerifier]) -> None:
    """An entry whose lock is held (being fetched or published) is skipped, not reported bad nor touched;
    the next round checks it."""
    info = put(cache, key)
    verifier = make_verifier()
    fired(verifier.run_round())
    flip(info.path / "bin/tool")
    lock = fired(cache.lock(key))
    report = fired(verifier.run_round())
    assert outcomes(report) == {key: SKIPPED} and report.outcomes[0].action == "locked"
    assert report.outcomes[0].previous == GOOD
    assert (info.path / ENTRY_FILE).exists() and events.changes() == []
    fired(cache.unlock(lock))
    assert outcomes(fired(verifier.run_round())) == {key: GOOD_TO_BAD}


def test_republished_while_hashing_is_skipped(root: Path, clock: task.Clock, key: EntryKey, events: Events) -> None:
    """An entry republished while its files were being hashed is skipped as changed, not quarantined."""
    pool = GatedPool({"hash_range"})
    cache = Cache(root, host_id="host-a", lock_timeout=60, clock=clock, pool=pool)
    put(cache, key, {"bin/tool": b"old content"})
    verifier = CacheVerifier(cache, VerifyConfig(interval=None, bandwidth=None), publish=events)
    d = verifier.run_round()
    assert pool.held and not d.called
    put(cache, key, {"bin/tool": b"new content"})  # same size, other bytes: the hash will not match
    pool.release()
    report = fired(d)
    assert outcomes(report) == {key: SKIPPED} and report.outcomes[0].action == "changed"
    assert fired(cache.lookup(key)) is not None and events.changes() == []


def test_corrupt_entry_file_is_bad(cache: Cache, key: EntryKey, make_verifier: Callable[..., CacheVerifier]) -> None:
    """An unreadable .entry makes the entry bad (quarantined); an incomplete entry is not verified at all."""
    info = put(cache, key)
    (info.path / ENTRY_FILE).write_text("garbage")
    incomplete = cache.entry_path(OTHER)
    incomplete.mkdir(parents=True)
    report = fired(make_verifier().run_round())
    assert outcomes(report) == {key: GOOD_TO_BAD}
    assert ENTRY_FILE in report.outcomes[0].problems and report.outcomes[0].action == "quarantined"


class TimedPool(SyncPool):
    """A SyncPool that records, for every chunk hashed, the clock time and the bytes read."""

    def __init__(self, clock: task.Clock) -> None:
        super().__init__()
        self.clock = clock
        self.reads: list[tuple[float, int]] = []

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        d = super().run(fn, *args, **kwargs)
        if fn.__name__ == "hash_range":
            d.addCallback(lambda n: (self.reads.append((self.clock.seconds(), n)), n)[1])
        return d


def test_bandwidth_cap_is_respected(root: Path, clock: task.Clock) -> None:
    """With a cap of R bytes/s, no clock second ever sees more than R bytes hashed, whatever the number of
    workers; the round takes about size / R clock seconds."""
    rate, chunk = 256 * 1024, 64 * 1024
    pool = TimedPool(clock)
    cache = Cache(root, host_id="host-a", lock_timeout=60, clock=clock, pool=pool)
    keys = [EntryKey("repo.file", "linux", f"dep{i}", "1.0") for i in range(3)]
    for i, k in enumerate(keys):
        put(cache, k, {"a": bytes([i]) * (700 * 1024), "b/c": b"x" * 1000})
    total = 3 * (700 * 1024 + 1000)
    verifier = CacheVerifier(cache, VerifyConfig(interval=None, workers=3, bandwidth=rate, chunk=chunk))
    start = clock.seconds()
    d = verifier.run_round()
    while not d.called:
        clock.advance(0.125)
    report = fired(d)
    assert report.started == start and set(outcomes(report).values()) == {GOOD}
    assert report.bytes_hashed == total == sum(n for _t, n in pool.reads)
    for t, _n in pool.reads:  # every window [t, t + 1 s) starting at a read
        assert sum(n for u, n in pool.reads if t <= u < t + 1) <= rate
    assert report.seconds >= (total - chunk) / rate
    assert report.seconds <= total / rate + 0.25
    assert report.rate is not None and report.rate <= rate * 1.1


def test_rate_limiter_without_cap_and_cancel() -> None:
    """No cap: every acquire fires at once; a cancelled wait cancels its timer."""
    clock = task.Clock()
    assert fired(RateLimiter(None, clock).acquire(10**9)) is None
    limiter = RateLimiter(100.0, clock)
    assert fired(limiter.acquire(100)) is None
    waiting = limiter.acquire(100)
    assert not waiting.called and len(clock.getDelayedCalls()) == 1
    waiting.cancel()
    assert clock.getDelayedCalls() == []


def test_outcomes_persist_across_instances(make_cache: Callable[..., Cache], key: EntryKey, events: Events,
                                           make_verifier: Callable[..., CacheVerifier]) -> None:
    """A new Cache and verifier on the same root (a restart) know the last report and that the entry was
    bad, so the round after the refetch still says bad→good; the state file is plain JSON in the root."""
    first = make_cache()
    info = put(first, key)
    flip(info.path / "bin/tool")
    verifier = make_verifier(first)
    fired(verifier.run_round())
    data = json.loads(verifier.state_path.read_text())
    assert verifier.state_path.parent == first.root and data["entries"][str(key.relpath)]["state"] == BAD
    fired(verifier.stop())

    second = make_cache()
    again = make_verifier(second)
    last = fired(again.report())
    assert last is not None and outcomes(last) == {key: GOOD_TO_BAD}
    put(second, key)
    assert outcomes(fired(again.run_round())) == {key: BAD_TO_GOOD}


def test_unreadable_state_file_is_ignored(cache: Cache, key: EntryKey,
                                          make_verifier: Callable[..., CacheVerifier]) -> None:
    """A damaged state file is logged and ignored: entries count as good until checked."""
    put(cache, key)
    verifier = make_verifier()
    verifier.state_path.write_text("{not json")
    assert fired(verifier.report()) is None
    assert outcomes(fired(verifier.run_round())) == {key: GOOD}
    assert json.loads(verifier.state_path.read_text())["format"] == 1


def test_rounds_do_not_overlap_and_stop_cancels(root: Path, clock: task.Clock, key: EntryKey) -> None:
    """A round asked for while one runs joins it; stop() cancels the running round and the schedule."""
    cache = Cache(root, host_id="host-a", lock_timeout=60, clock=clock, pool=SyncPool())
    put(cache, key, {"f": b"y" * 8192})
    verifier = CacheVerifier(cache, VerifyConfig(interval=10, bandwidth=4096, chunk=4096))
    fired(verifier.start())
    clock.advance(10)
    assert verifier.current is not None
    joined = verifier.run_round()
    clock.advance(1)
    joined_report = fired(joined)
    assert outcomes(joined_report) == {key: GOOD} and joined_report.trigger == "schedule"
    clock.advance(9)
    assert verifier.current is not None
    stopped = verifier.stop()
    assert stopped.called
    assert clock.getDelayedCalls() == []


class FailingScanPool(SyncPool):
    """A SyncPool whose first cache scan fails (a disk error)."""

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        if fn.__name__ == "scan" and "scan" not in self.calls:
            self.calls.append("scan")
            return defer.fail(OSError(5, "Input/output error"))
        return super().run(fn, *args, **kwargs)


def test_failed_round_keeps_the_schedule(root: Path, clock: task.Clock, key: EntryKey, log_events: Any) -> None:
    """A scheduled round that fails is logged and the schedule goes on: the next interval runs a round."""
    cache = Cache(root, host_id="host-a", lock_timeout=60, clock=clock, pool=FailingScanPool())
    put(cache, key)
    verifier = CacheVerifier(cache, VerifyConfig(interval=30, bandwidth=None))
    fired(verifier.start())
    clock.advance(30)
    assert verifier.last_report is None
    assert any("scheduled cache verify round failed" in str(e.get("log_format")) for e in log_events)
    clock.advance(30)
    assert outcomes(verifier.last_report) == {key: GOOD}
    fired(verifier.stop())


@pytest.mark.parametrize(("config", "key"), [
    ({"verify_interval": "daily"}, "verify_interval"),
    ({"verify_interval": -1}, "verify_interval"),
    ({"verify_interval": True}, "verify_interval"),
    ({"verify_interval": math.inf}, "verify_interval"),
    ({"verify_workers": 0}, "verify_workers"),
    ({"verify_workers": 1.5}, "verify_workers"),
    ({"verify_bandwidth": "25%"}, "verify_bandwidth"),
    ({"verify_chunk": 100}, "verify_chunk"),
])
def test_config_errors_name_the_key(config: dict[str, Any], key: str) -> None:
    """An unusable verify_* value is a ConfigurationError naming its key and the value."""
    with pytest.raises(ConfigurationError) as err:
        VerifyConfig.from_config(config.get)
    assert key in str(err.value) and repr(config[key]) in str(err.value)


def test_config_zero_or_none_means_off() -> None:
    """verify_interval 0/None: no schedule; verify_bandwidth 0/None: no cap; defaults otherwise."""
    off = VerifyConfig.from_config({"verify_interval": 0, "verify_bandwidth": None}.get)
    assert off.interval is None and off.bandwidth is None
    default = VerifyConfig.from_config({}.get)
    assert default == VerifyConfig() and default.interval == 86400 and default.bandwidth == 50 * 1024 * 1024


# -- through the service -----------------------------------------------------------------------------------
class VerifyEvents(Process):
    """Collects the system's cache.verify.# events."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.arrived: defer.Deferred[None] = defer.Deferred()

    def receivers_to_create(self) -> list[Receiver]:
        return super().receivers_to_create() + [
            Receiver(self, f"{self.sysname}.verify-sink.{self.id}", self._event,
                     exchange=self.container.events_exchange, bindings=["cache.verify.#"])]

    def _event(self, msg: dict[str, Any], receiver: Receiver) -> None:
        self.events.append((msg["receiver"], msg["content"]))
        if msg["receiver"] == EVENT_ROUND and not self.arrived.called:
            self.arrived.callback(None)


@pytest_twisted.ensureDeferred
async def test_service_round_report_and_events(container: Any, process_factory: Any, tmp_path: Path) -> None:
    """verify_round over RPC finds a flipped byte (good→bad), verify_report answers the same report, and
    the change and the round summary go out on the events exchange."""
    from twisted.internet import reactor

    sink = await process_factory(VerifyEvents)
    service = await process_factory(CacheService, root=str(tmp_path / "c"), host_id="svc-host",
                                    verify_interval=0, verify_bandwidth=0)
    assert service.verifier.config.interval is None
    client = CacheClient(await client_process(container))
    assert await client.verify_report() is None
    key = EntryKey("repo.file", "linux", "tool", "1.0")
    lock = await client.lock(key, timeout=5)
    staging = await client.new_staging()
    from .test_service import write

    info = await client.publish(lock, staging, write(staging, {"bin/tool": b"some tool content"}))
    await client.unlock(lock)
    flip(info.path / "bin/tool")
    report = await client.verify_round()
    assert outcomes(report) == {key: GOOD_TO_BAD} and report.outcomes[0].action.startswith("quarantined; awaiting")
    last = await client.verify_report()
    assert last is not None and last.to_wire() == report.to_wire()
    await defer.ensureDeferred(sink.arrived).addTimeout(10, reactor)
    kinds = [k for k, _c in sink.events]
    assert kinds == [EVENT_CHANGE, EVENT_ROUND]
    assert sink.events[0][1]["outcome"] == GOOD_TO_BAD and sink.events[1][1]["counts"][GOOD_TO_BAD] == 1
    assert await client.lookup(key) is None


@pytest_twisted.ensureDeferred
async def test_service_refuses_bad_verify_config(process_factory: Any, tmp_path: Path) -> None:
    """A CacheService spawned with an unusable verify_* value fails with the ConfigurationError's message."""
    with pytest.raises(Exception, match="verify_workers"):
        await process_factory(CacheService, root=str(tmp_path / "c"), host_id="svc-host", verify_workers=0)

