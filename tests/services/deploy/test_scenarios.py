"""Umpire's own scenarios (tc1-tc6) against S3 through deploy.app, and deployers in other OS processes."""

from __future__ import annotations

import os
import shutil
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest_twisted

from ion.services.deploy.spec import load_deployment

from .scenario_support import (
    CONTENT,
    TGZ,
    ZIP,
    ZLIB_H,
    ChildDeployer,
    deploy_in_process,
    files_named,
    item,
    tgz,
    tree,
    within,
    write_deployment,
)

TOOL = {"tool/README": b"tool 3.0\n", "tool/bin/tool": b"#!/bin/sh\necho tool\n"}
ZLIB = {"zlib/include/zlib.h": ZLIB_H, "zlib/lib/libz.a": b"\0" * 4000}


def tc1_items(dest: Path, **extra: Any) -> list[dict[str, Any]]:
    """Umpire's tc1 layout: the tgz and the zip linked into two folders, the tgz copied into a third."""
    return [item("zlib", "1.2", dest / "a", **extra), item("tool", "3.0", dest / "a", **extra),
            item("zlib", "1.2", dest / "b", **extra), item("tool", "3.0", dest / "b", **extra),
            item("zlib", "1.2", dest / "c", link=False, **extra)]


def assert_tc1_layout(dest: Path) -> None:
    for folder in ("a", "b"):
        assert tree(dest / folder) == {**ZLIB, **TOOL}
        assert (dest / folder / "zlib").is_symlink() and (dest / folder / "tool").is_symlink()
    assert tree(dest / "c") == ZLIB and not (dest / "c" / "zlib").is_symlink()


def states(result: dict[str, Any]) -> list[str]:
    return [r["state"] for r in result["items"]]


async def tc1(deploy_system: Any, make_repo: Any, tmp_path: Path) -> tuple[Any, Path, str]:
    url, moto = make_repo("s3")
    dest = tmp_path / "dest"
    spec = load_deployment(write_deployment(tmp_path / "tc.json", url, tc1_items(dest)))
    result = await deploy_system.deploy(spec)
    assert result["ok"] and states(result) == ["downloaded"] * 5
    assert_tc1_layout(dest)
    return spec, dest, url


@pytest_twisted.ensureDeferred
async def test_tc1_same_dependency_in_three_folders_is_downloaded_once(deploy_system: Any, make_repo: Any,
                                                                       tmp_path: Path,
                                                                       downloads: Counter[str]) -> None:
    """tc1: a tgz and a zip linked into two folders and the tgz copied into a third: one download each, no wait."""
    await tc1(deploy_system, make_repo, tmp_path)
    assert downloads == Counter({"zlib-1.2.tgz": 1, "tool.zip": 1})
    # One fetch per dependency reached the Fetch service: nobody waited on anybody's lock.
    fetch_events = [e for e in deploy_system.events.events if "job" not in e]
    assert Counter((e["name"], e["phase"]) for e in fetch_events if e["phase"] in ("lookup", "waiting")) == Counter(
        {("zlib", "lookup"): 1, ("zlib", "waiting"): 1, ("tool", "lookup"): 1, ("tool", "waiting"): 1})


@pytest_twisted.ensureDeferred
async def test_tc2_redeploy_from_a_warm_cache_after_deleting_the_destinations(
        deploy_system: Any, make_repo: Any, tmp_path: Path, downloads: Counter[str]) -> None:
    """tc2: the destinations deleted, a redeploy places everything again from the cache, downloading nothing."""
    spec, dest, _ = await tc1(deploy_system, make_repo, tmp_path)
    shutil.rmtree(dest)
    result = await deploy_system.deploy(spec)
    assert result["ok"] and states(result) == ["cached"] * 5
    assert not any(r["already"] for r in result["items"])
    assert_tc1_layout(dest)
    assert downloads == Counter({"zlib-1.2.tgz": 1, "tool.zip": 1})


@pytest_twisted.ensureDeferred
async def test_tc3_redeploy_after_deleting_cache_and_destinations(deploy_system: Any, make_repo: Any,
                                                                  tmp_path: Path, downloads: Counter[str]) -> None:
    """tc3: cache and destinations deleted, a redeploy downloads each dependency once more and places it."""
    spec, dest, _ = await tc1(deploy_system, make_repo, tmp_path)
    shutil.rmtree(dest)
    shutil.rmtree(tmp_path / "cache")
    result = await deploy_system.deploy(spec)
    assert result["ok"] and states(result) == ["downloaded"] * 5
    assert_tc1_layout(dest)
    assert downloads == Counter({"zlib-1.2.tgz": 2, "tool.zip": 2})


@pytest_twisted.ensureDeferred
async def test_tc4_redeploy_after_deleting_only_the_cache_repairs_dangling_links(
        deploy_system: Any, make_repo: Any, tmp_path: Path, downloads: Counter[str]) -> None:
    """tc4: only the cache deleted (every link dangling), a redeploy downloads again and the links resolve."""
    spec, dest, _ = await tc1(deploy_system, make_repo, tmp_path)
    shutil.rmtree(tmp_path / "cache")
    assert not (dest / "a" / "zlib").exists() and (dest / "a" / "zlib").is_symlink()
    result = await deploy_system.deploy(spec)
    assert result["ok"] and states(result) == ["downloaded"] * 5
    assert_tc1_layout(dest)
    assert downloads == Counter({"zlib-1.2.tgz": 2, "tool.zip": 2})


@pytest_twisted.ensureDeferred
async def test_tc5_unpack_false_with_copy_keeps_the_archive(deploy_system: Any, make_repo: Any,
                                                            tmp_path: Path) -> None:
    """tc5: ``unpack: false`` and ``link: false`` copy the archive itself, byte for byte; the unpacked entry is another."""
    url, _ = make_repo("s3")
    dest = tmp_path / "dest"
    spec = load_deployment(write_deployment(tmp_path / "tc5.json", url, [
        item("zlib", "1.2", dest / "packed", unpack=False, link=False), item("zlib", "1.2", dest / "unpacked")]))
    result = await deploy_system.deploy(spec)
    assert result["ok"] and states(result) == ["downloaded", "downloaded"]
    assert tree(dest / "packed") == {"zlib-1.2.tgz": CONTENT[TGZ]}
    assert not (dest / "packed" / "zlib-1.2.tgz").is_symlink()
    assert tree(dest / "unpacked") == ZLIB
    assert result["items"][0]["entry"] != result["items"][1]["entry"]


@pytest_twisted.ensureDeferred
async def test_tc6_keep_updated_refetches_a_changed_object_and_leaves_a_current_one(
        deploy_system: Any, make_repo: Any, tmp_path: Path, downloads: Counter[str]) -> None:
    """tc6: with keep_updated, a changed remote object is fetched again ("updated"); an unchanged one stays "cached"."""
    url, moto = make_repo("s3")
    dest = tmp_path / "dest"
    spec = load_deployment(write_deployment(tmp_path / "tc6.json", url, [
        item("zlib", "1.2", dest / "a", keep_updated=True), item("tool", "3.0", dest / "a", keep_updated=True),
        item("zlib", "1.2", dest / "c", link=False, keep_updated=True)]))
    first = await deploy_system.deploy(spec)
    assert states(first) == ["downloaded"] * 3
    again = await deploy_system.deploy(spec)
    assert states(again) == ["cached"] * 3 and all(r["already"] for r in again["items"])
    new_h = b"/* zlib 1.2, rebuilt */\n"
    moto.put_tree(url.split("/")[2], {TGZ: tgz({"zlib/include/zlib.h": new_h})}, prefix="deps")
    updated = await deploy_system.deploy(spec)
    assert updated["ok"] and states(updated) == ["updated", "cached", "updated"]
    assert tree(dest / "a") == {"zlib/include/zlib.h": new_h, **TOOL}
    assert tree(dest / "c") == {"zlib/include/zlib.h": new_h}
    assert downloads == Counter({"zlib-1.2.tgz": 2, "tool.zip": 1})
    settled = await deploy_system.deploy(spec)
    assert states(settled) == ["cached"] * 3


# -- other OS processes -----------------------------------------------------------------------------------
def lock_files(cache_root: Path) -> list[Path]:
    return files_named(cache_root, "*.lock*")


@pytest_twisted.ensureDeferred
async def test_two_processes_deploying_at_once_download_each_dependency_once(make_repo: Any,
                                                                             tmp_path: Path) -> None:
    """Two OS processes deploy the same dependencies into one cache at once: one GET per file, both succeed."""
    url, server = make_repo("http")
    cache_root = tmp_path / "shared-cache"
    children = []
    for n in (1, 2):
        deployment = write_deployment(tmp_path / f"d{n}.json", url, [
            item("zlib", "1.2", tmp_path / f"dest{n}"), item("tool", "3.0", tmp_path / f"dest{n}"),
            item("notes", "1.0", tmp_path / f"dest{n}" / "notes", link=False)])
        children.append(ChildDeployer().start(deployment, cache_root, "shared-host"))
    for child in children:
        await within(child.ready)
    for child in children:
        child.go()
    codes = [await within(child.ended) for child in children]
    assert codes == [0, 0], [c.err.decode()[-2000:] for c in children]
    for n, child in enumerate(children, 1):
        result = child.result()
        assert result["ok"] and {r["state"] for r in result["items"]} <= {"downloaded", "cached"}
        assert tree(tmp_path / f"dest{n}") == {**ZLIB, **TOOL, "notes/notes.txt": CONTENT["linux/notes/1.0/notes.txt"]}
    for rel in (TGZ, ZIP, "linux/notes/1.0/notes.txt"):
        assert server.gets(f"deps/{rel}") == 1, server.requests
    assert lock_files(cache_root) == []
    assert not (cache_root / "staging").exists() or list((cache_root / "staging").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_a_process_killed_mid_download_leaves_a_lock_the_next_run_takes_over_at_once(
        make_repo: Any, tmp_path: Path) -> None:
    """SIGKILL mid-download: the next run (same host) takes the dead pid's lock over without waiting and publishes."""
    url, server = make_repo("http")
    server.stalls[f"deps/{TGZ}"] = 1  # the first GET sends half the file, then nothing
    cache_root = tmp_path / "cache"
    deployment = write_deployment(tmp_path / "d.json", url, [item("zlib", "1.2", tmp_path / "dest")])
    child = ChildDeployer().start(deployment, cache_root, "same-host", wait_for_go=False)
    await within(server.wait_for(f"deps/{TGZ}", "GET"))
    locks = lock_files(cache_root)
    assert len(locks) == 1 and f"::{child.pid}::" in locks[0].read_text()
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    assert await within(child.ended) == -signal.SIGKILL
    assert lock_files(cache_root) == locks  # left behind by the dead process
    # wait_timeout=0: a lock that had to be waited for would fail the fetch at once.
    results = await within(deploy_in_process(deployment, cache_root, "same-host", wait_timeout=0))
    assert [(r.state, r.ok) for r in results] == [("downloaded", True)], [r.reason for r in results]
    assert tree(tmp_path / "dest") == ZLIB
    entry = Path(results[0].entry)
    assert (entry / ".entry").is_file() and tree(entry) == ZLIB
    assert lock_files(cache_root) == []
    assert server.gets(f"deps/{TGZ}") == 2


class _Cli(ChildDeployer):
    """``ion-deploy`` run as a child process (same protocol: output, exit code)."""

    def start_cli(self, *args: str) -> _Cli:
        from twisted.internet import reactor

        repo_root = str(Path(__file__).resolve().parents[3])
        argv = [os.sys.executable, "-m", "ion.services.deploy.cli", *args]
        self.pid = reactor.spawnProcess(self, os.sys.executable, argv, env=dict(os.environ), path=repo_root).pid
        return self


@pytest_twisted.ensureDeferred
async def test_sigterm_mid_download_releases_the_lock_and_staging(make_repo: Any, tmp_path: Path) -> None:
    """SIGTERM to ion-deploy mid-download: it cancels, releases its lock and staging folder, exits 1."""
    url, server = make_repo("http")
    server.stalls[f"deps/{TGZ}"] = 1
    cache_root = tmp_path / "cache"
    deployment = write_deployment(tmp_path / "d.json", url, [item("zlib", "1.2", tmp_path / "dest")])
    child = _Cli().start_cli(str(deployment), "--cache-dir", str(cache_root), "--json")
    await within(server.wait_for(f"deps/{TGZ}", "GET"))
    assert len(lock_files(cache_root)) == 1
    assert child.pid is not None
    os.kill(child.pid, signal.SIGTERM)
    assert await within(child.ended) == 1, child.err.decode()
    assert lock_files(cache_root) == []
    staging = cache_root / "staging"
    assert not staging.exists() or list(staging.iterdir()) == []
    assert not (tmp_path / "dest").exists() or list((tmp_path / "dest").iterdir()) == []
