"""The Deploy core: bounded parallel fetches, one fetch per dependency, failures kept per item."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from ion.core.threads import SynchronousPool
from ion.services.deploy.core import AccessRefused, Deployer, check_allowed
from ion.services.deploy.spec import parse_deployment


class CacheStandIn:
    """Fetches by creating a cache entry folder; counts calls; can hold or fail items."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[str] = []
        self.held: dict[str, defer.Deferred[None]] = {}
        self.fail: set[str] = set()
        self.in_flight = 0
        self.most_in_flight = 0

    def fetch(self, item, progress) -> defer.Deferred[dict[str, Any]]:
        self.calls.append(item.label)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        gate = self.held.get(item.name) or defer.succeed(None)

        def done(_: object) -> dict[str, Any]:
            self.in_flight -= 1
            if item.name in self.fail:
                raise RuntimeError(f"no files under repo/{item.label}")
            entry = self.root / item.platform / item.name / item.version
            (entry / "lib").mkdir(parents=True, exist_ok=True)
            (entry / "lib" / f"{item.name}.so").write_text(item.version)
            progress("bytes", {"done": 1, "total": 1})
            return {"state": "downloaded", "path": str(entry), "names": ["lib"], "stamp": "t1"}

        d: defer.Deferred[None] = defer.Deferred()
        gate.addBoth(lambda _: d.callback(None))
        return d.addCallback(done)


class CountingPool(SynchronousPool):
    """Runs each call now, as SynchronousPool does, and records its function's name (``calls``)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(self, fn, *args, **kwargs):
        self.calls.append(fn.__name__)
        return super().run(fn, *args, **kwargs)

    run_short = run


def deployment(tmp_path: Path, *items: dict[str, Any]):
    return parse_deployment([{"url": "file:repo", "items": list(items)}], source="d.json", base_dir=tmp_path,
                            cwd=tmp_path, environ={})


def item(name: str, dest: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "version": "1.0", "platform": "linux", "destination": dest, **extra}


def run(deployer: Deployer, dep, **kwargs) -> list:
    results: list = []
    deployer.deploy(dep, **kwargs).addBoth(results.append)
    assert results, "the deployment did not finish"
    assert not isinstance(results[0], Exception)
    return results[0]


def test_every_item_in_file_order(tmp_path):
    """Each item is fetched and placed; results come back in file order with their states."""
    cache = CacheStandIn(tmp_path / "cache")
    dep = deployment(tmp_path, item("a", "out/a"), item("b", "out/b"))
    results = run(Deployer(cache.fetch, SynchronousPool()), dep)
    assert [r.item.name for r in results] == ["a", "b"]
    assert all(r.state == "downloaded" and not r.already for r in results)
    assert (tmp_path / "out/a/lib/a.so").read_text() == "1.0"


def test_one_failure_does_not_stop_the_others(tmp_path):
    """A failed fetch is that item's failure, with the reason; with ``partial`` the others are deployed."""
    cache = CacheStandIn(tmp_path / "cache")
    cache.fail.add("b")
    dep = deployment(tmp_path, item("a", "out"), item("b", "out2"), item("c", "out3"))
    results = run(Deployer(cache.fetch, SynchronousPool()), dep, partial=True)
    assert [r.state for r in results] == ["downloaded", "failed", "downloaded"]
    assert results[1].reason == "no files under repo/linux/b/1.0"
    assert (tmp_path / "out3/lib/c.so").exists()


def test_same_dependency_fetched_once(tmp_path):
    """Umpire's tc1 layout: one dependency linked into two folders and copied into a third is
    fetched once."""
    cache = CacheStandIn(tmp_path / "cache")
    dep = deployment(tmp_path, item("z", "one"), item("z", "two"), item("z", "three", link=False))
    results = run(Deployer(cache.fetch, SynchronousPool()), dep)
    assert cache.calls == ["linux/z/1.0"]
    assert all(r.ok for r in results)
    assert (tmp_path / "one/lib").is_symlink() and (tmp_path / "two/lib").is_symlink()
    assert not (tmp_path / "three/lib").is_symlink() and (tmp_path / "three/lib/z.so").exists()


def test_parallelism_is_bounded(tmp_path):
    """No more than max_parallel fetches run at once; the rest wait their turn."""
    cache = CacheStandIn(tmp_path / "cache")
    gates = {n: defer.Deferred() for n in "abcde"}
    cache.held.update(gates)
    dep = deployment(tmp_path, *(item(n, f"out/{n}") for n in "abcde"))
    d = Deployer(cache.fetch, SynchronousPool(), max_parallel=2).deploy(dep)
    assert len(cache.calls) == 2
    for n in "abcde":
        gates[n].callback(None)
    assert d.called and cache.most_in_flight == 2 and len(cache.calls) == 5


def test_placement_failure_is_per_item(tmp_path):
    """A destination holding a foreign file fails that item only (``partial``), naming the path."""
    cache = CacheStandIn(tmp_path / "cache")
    (tmp_path / "busy" / "lib").mkdir(parents=True)
    dep = deployment(tmp_path, item("a", "busy"), item("b", "free"))
    results = run(Deployer(cache.fetch, SynchronousPool()), dep, partial=True)
    assert results[0].state == "failed" and "busy/lib exists" in results[0].reason
    assert results[1].ok


def test_progress_reports_phases(tmp_path):
    """Progress is reported per item: fetch, bytes, place, done."""
    cache = CacheStandIn(tmp_path / "cache")
    seen: list[tuple[str, str]] = []
    run(Deployer(cache.fetch, SynchronousPool()), deployment(tmp_path, item("a", "o")),
        progress=lambda it, phase, info: seen.append((it.name, phase)))
    assert seen == [("a", "fetch"), ("a", "bytes"), ("a", "place"), ("a", "done")]


def test_allowed_roots(tmp_path):
    """Paths under an allowed root pass; outside, through '..' or a symlink out, are refused (403)."""
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", root / "escape")
    check_allowed(root / "sub" / "new" / "dir", [root], "destination")
    check_allowed(root, [root], "destination")
    for bad in (tmp_path / "other", root / ".." / "other", root / "escape" / "x"):
        with pytest.raises(AccessRefused) as info:
            check_allowed(bad, [root], "destination")
        assert info.value.code == 403 and str(root) in info.value.message
    with pytest.raises(AccessRefused, match="none configured"):
        check_allowed(root, [], "file repository")


def test_two_versions_into_one_destination_are_placed_in_turn(tmp_path):
    """Two items placing the same dependency into one destination never race: the last in
    the file wins and the record matches what is there."""
    from twisted.internet import defer as _defer

    class Pool:
        """Runs a call only when the test lets it: shows whether placements overlap."""

        def __init__(self) -> None:
            self.pending: list = []

        def run(self, fn, *args, **kwargs):
            d = _defer.Deferred()
            self.pending.append((d, fn, args, kwargs))
            return d

        def step(self) -> None:
            d, fn, args, kwargs = self.pending.pop(0)
            d.callback(fn(*args, **kwargs))

    cache = CacheStandIn(tmp_path / "cache")
    dep = deployment(tmp_path, item("z", "out"), dict(item("z", "out"), version="2.0"))
    pool = Pool()
    d = Deployer(cache.fetch, pool).deploy(dep)
    pool.step()  # the destinations' realpaths, first and at once
    steps = []
    while pool.pending:
        # The second placement waits for the first (the commits at the end may run together).
        assert len(pool.pending) == 1 or {p[1].__name__ for p in pool.pending} == {"commit"}
        steps.append(pool.pending[0][1].__name__)
        pool.step()
    # Each (downloaded, so not checked first: place() finds an item in place itself), the placement;
    # at the end (all or nothing) each switch is committed.
    assert steps == ["place", "place", "commit", "commit"]
    results = []
    d.addCallback(results.append)
    assert results and [r.ok for r in results[0]] == [True, True]
    assert (tmp_path / "out/lib/z.so").read_text() == "2.0"


def test_cancelling_a_deployment_cancels_its_fetches(tmp_path):
    """Cancelling deploy() cancels the fetches in flight (so their locks and staging are released)."""
    cancelled: list[str] = []

    def fetch(item, progress):
        return defer.Deferred(lambda d: cancelled.append(item.name))

    dep = deployment(tmp_path, item("a", "one"), item("a", "two"), item("b", "three"))
    d = Deployer(fetch, SynchronousPool()).deploy(dep)
    d.cancel()
    outcome: list = []
    d.addBoth(outcome.append)
    assert sorted(cancelled) == ["a", "b"]  # 'a' is shared by two items: cancelled once
    # Every item ends, as cancelled (the deployment's result still lists them all).
    assert [r.state for r in outcome[0]] == ["cancelled"] * 3
    assert all(not r.ok and "cancelled" in (r.reason or "") for r in outcome[0])


def test_commits_run_in_at_most_max_parallel_pool_jobs(tmp_path):
    """All or nothing, every item placed: the switches are committed in at most ``max_parallel`` pool
    jobs (each committing its share in turn), not one job per item; each one is committed."""
    import json

    cache = CacheStandIn(tmp_path / "cache")
    names = [f"d{n}" for n in range(7)]
    dep = deployment(tmp_path, *(item(n, f"out/{n}") for n in names))
    pool = CountingPool()
    results = run(Deployer(cache.fetch, pool, max_parallel=3), dep)
    assert [r.state for r in results] == ["downloaded"] * 7
    assert pool.calls.count("commit") + pool.calls.count("_commit_each") == 3
    for n in names:
        manifest = json.loads((tmp_path / "out" / n / ".ion-deploy" / f"linux.{n}.json").read_text())
        assert "pending" not in manifest and manifest["names"] == ["lib"]


def test_a_cached_item_is_checked_first_and_a_fetched_one_placed_at_once(tmp_path):
    """A cached item gets the quick check (most are in place on a warm deploy); a downloaded one goes
    straight to place(), one pool job, which reports it ``already`` when it is in place."""

    cache = CacheStandIn(tmp_path / "cache")
    dep = deployment(tmp_path, item("a", "out/a"))
    pool = CountingPool()
    [first] = run(Deployer(cache.fetch, pool), dep)
    assert first.state == "downloaded" and not first.already
    assert pool.calls == ["resolve_targets", "place", "commit"]

    def fetch_cached(it, progress):
        return cache.fetch(it, progress).addCallback(lambda r: dict(r, state="cached"))

    for fetch, state, steps in ((cache.fetch, "downloaded", ["place"]), (fetch_cached, "cached", ["placed_already"])):
        pool.calls.clear()
        [again] = run(Deployer(fetch, pool), dep)
        assert again.state == state and again.already and again.ok
        assert pool.calls == ["resolve_targets", *steps]
