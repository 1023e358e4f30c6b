"""Fixtures of the Cache tests: a ``task.Clock``, a synchronous pool, caches on a temp root."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.logger import LogEvent, formatEvent
from twisted.python.failure import Failure

from ion.services.cache.core import Cache, sha256_file
from ion.services.cache.entry import EntryInfo, EntryKey, FileMeta


@pytest.fixture(autouse=True)
def _cache_dir_is_the_tests_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The container's cache root (``$ION_CACHE_DIR``) is the test's folder: the Cache services the
    tests spawn name a folder inside it in their spawnargs, which may narrow the root, never move it."""
    monkeypatch.setenv("ION_CACHE_DIR", str(tmp_path))


class SyncPool:
    """A synchronous stand-in for :class:`~ion.core.threads.BlockingPool`.

    Same ``run(fn, *args, **kwargs)`` signature; it calls ``fn`` at once and
    returns ``defer.maybeDeferred(fn, ...)``, so in Clock-driven tests every
    blocking step happens inside the test's own calls and ``clock.advance()``,
    deterministically. ``calls`` records the name of each function run.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        self.calls.append(getattr(fn, "__name__", repr(fn)))
        return defer.maybeDeferred(fn, *args, **kwargs)


class GatedPool(SyncPool):
    """A pool whose calls of the functions named in ``gate`` wait until the test releases them."""

    def __init__(self, gate: set[str]) -> None:
        super().__init__()
        self.gate = gate
        self.held: list[tuple[defer.Deferred[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        if getattr(fn, "__name__", "") not in self.gate:
            return super().run(fn, *args, **kwargs)
        self.calls.append(fn.__name__)
        d: defer.Deferred[Any] = defer.Deferred()  # like deferToThreadPool: cancel does not stop the work
        self.held.append((d, fn, args, kwargs))
        return d

    def release(self) -> None:
        """Run the held calls now and deliver their results."""
        held, self.held = self.held, []
        for d, fn, args, kwargs in held:
            result = defer.maybeDeferred(fn, *args, **kwargs)
            if not d.called:
                result.chainDeferred(d)


def fired(d: defer.Deferred[Any]) -> Any:
    """What ``d`` has fired with (re-raising a failure); fails the test if it has not fired."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure_of(d: defer.Deferred[Any], *types: type[BaseException]) -> BaseException:
    """The exception ``d`` failed with (one of ``types``); fails the test otherwise."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has not fired"
    assert isinstance(results[0], Failure), f"{d!r} succeeded with {results[0]!r}"
    assert results[0].check(*types), f"{d!r} failed with {results[0].value!r}"
    return results[0].value


def not_fired(d: defer.Deferred[Any]) -> bool:
    return not d.called


@pytest.fixture
def clock() -> task.Clock:
    c = task.Clock()
    c.advance(1_700_000_000)  # mtimes set from this clock look like real ones
    return c


@pytest.fixture
def pool() -> SyncPool:
    return SyncPool()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def make_cache(root: Path, clock: task.Clock, pool: SyncPool) -> Callable[..., Cache]:
    def make(host_id: str = "host-a", **kwargs: Any) -> Cache:
        kwargs.setdefault("lock_timeout", 60)
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("pool", pool)
        return Cache(root, host_id=host_id, **kwargs)

    return make


@pytest.fixture
def cache(make_cache: Callable[..., Cache]) -> Cache:
    return make_cache()


@pytest.fixture
def key() -> EntryKey:
    return EntryKey("repo.file", "linux", "tool", "1.0", True)


def messages(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events]


def stage(cache: Cache, files: dict[str, bytes]) -> tuple[Path, dict[str, FileMeta]]:
    """A staging folder of ``cache`` holding ``files``, and their metadata (synchronous pools only)."""
    staging = fired(cache.new_staging())
    metas = {}
    for rel, data in files.items():
        path = staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        metas[rel] = FileMeta(len(data), None, sha256_file(path))
    return staging, metas


def put(cache: Cache, key: EntryKey, files: dict[str, bytes] | None = None) -> EntryInfo:
    """Lock, stage, publish and unlock ``files`` as the entry ``key``."""
    lock = fired(cache.lock(key))
    try:
        staging, metas = stage(cache, files or {"bin/tool": b"#!/bin/sh\necho tool\n"})
        return fired(cache.publish(key, staging, metas))
    finally:
        fired(cache.unlock(lock))


def write_lock(path: Path, content: bytes, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.utime(path, (mtime, mtime))
