"""Placement that cannot be redirected (issue 12): symlink swaps, the record folder, the cache, the copy race.

An attacker with a broker login names destinations and archives; here they swap
real folders for symlinks between the check and the writes (during a held
fetch), plant ``.ion-deploy`` links, ship archives whose top-level name is
``.ion-deploy``, and aim a second request at the cache through the links of a
first. Every case uses real symlinks and real processes or threads: no mock of
the filesystem, no sleep.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from ion.core.exceptions import ReceivedApplicationError
from ion.core.threads import SynchronousPool
from ion.services.deploy.core import Deployer
from ion.services.deploy.place import PlacementError, Target, manifest_path, place
from ion.services.deploy.spec import load_deployment, parse_deployment
from ion.testing.servers import tgz, write_tree
from tests.services.deploy import scenario_support
from tests.services.deploy.scenario_support import PLAIN, TGZ, item, system_config, within, write_deployment

# Fixtures of scenario_support, used by name.
deploy_system = scenario_support.deploy_system
http_servers = scenario_support.http_servers
make_repo = scenario_support.make_repo

ROOT = Path(__file__).resolve().parents[2]
REFUSED = "symbolic link and was refused"


@pytest.fixture(autouse=True)
def _cache_dir_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Job records and any default cache stay in the test's folder."""
    monkeypatch.setenv("ION_CACHE_DIR", str(tmp_path / "env-cache"))


# -- helpers -----------------------------------------------------------------------------------------------
def make_entry(folder: Path, files: dict[str, str]) -> Path:
    """A cache entry folder holding ``files`` (and its ``.entry``)."""
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (folder / ".entry").write_text("[entry]\n")
    return folder


def digest(path: Path) -> dict[str, str]:
    """Every file, folder and link below ``path`` (links not followed): content hash, ``dir`` or link target."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = full.relative_to(path).as_posix()
            if full.is_symlink():
                out[rel] = "link:" + os.readlink(full)
            elif full.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(full.read_bytes()).hexdigest()
    return dict(sorted(out.items()))


def put(entry: Path, dest: Path, names: list[str], *, link: bool = True, **kwargs: Any) -> Any:
    return place(entry, names, dest, link=link, platform="linux", name="zlib", version="1.0", entry_stamp="t1",
                 **kwargs)


def swap_for_link(path: Path, to: Path) -> None:
    """What the attacker does: the real folder moved aside, a symlink to ``to`` in its place."""
    path.rename(path.with_name(path.name + "-moved"))
    path.symlink_to(to, target_is_directory=True)


# -- a destination swapped for a symlink after its check ---------------------------------------------------
@pytest.mark.parametrize("link", [True, False])
def test_destination_swapped_after_the_check_is_refused_at_place(tmp_path: Path, link: bool) -> None:
    """The destination, checked under its root, then swapped for a link to outside: refused, nothing outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "app").mkdir(parents=True)
    outside.mkdir()
    entry = make_entry(tmp_path / "cache" / "1.0", {"lib/libz.so": "z"})
    target = Target.resolve(root / "app", root)  # the check, when the request arrived
    swap_for_link(root / "app", outside)
    with pytest.raises(PlacementError, match=REFUSED) as info:
        put(entry, target.path, ["lib"], link=link, root=target.root)
    assert str(root / "app") in str(info.value)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("link", [True, False])
def test_intermediate_folder_swapped_after_the_check_is_refused(tmp_path: Path, link: bool) -> None:
    """A folder between the root and the destination swapped for a link (to a look-alike tree): refused."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b" / "app").mkdir(parents=True)
    (outside / "b" / "app").mkdir(parents=True)
    (outside / "b" / "app" / "precious").write_text("keep")
    before = digest(outside)
    entry = make_entry(tmp_path / "cache" / "1.0", {"lib/libz.so": "z"})
    target = Target.resolve(root / "a" / "b" / "app", root)
    swap_for_link(root / "a", outside)
    with pytest.raises(PlacementError, match=REFUSED) as info:
        put(entry, target.path, ["lib"], link=link, root=target.root)
    assert str(root / "a") in str(info.value)
    assert digest(outside) == before


@pytest.mark.parametrize("link", [True, False])
def test_destination_swapped_during_the_fetch_is_refused_by_the_deployer(tmp_path: Path, link: bool) -> None:
    """ion-deploy in process: the destination is resolved at the start; swapped while the fetch is held,
    the item fails naming the link, and nothing is written where it points."""
    dest, outside = tmp_path / "work" / "app", tmp_path / "outside"
    dest.mkdir(parents=True)
    outside.mkdir()
    entry = make_entry(tmp_path / "cache" / "linux" / "zlib" / "1.0", {"lib/libz.so": "z"})
    gate: defer.Deferred[None] = defer.Deferred()

    def fetch(it: Any, progress: Any) -> defer.Deferred[dict[str, Any]]:
        # A slow download: it ends when the test says so, after the swap.
        return gate.addCallback(lambda _: {"state": "downloaded", "path": str(entry), "names": ["lib"],
                                           "stamp": "t1"})

    spec = parse_deployment([{"url": "file:repo", "items": [
        {"name": "zlib", "version": "1.0", "platform": "linux", "destination": str(dest), "link": link}]}],
        source="d.json", base_dir=tmp_path, cwd=tmp_path, environ={})
    results: list[Any] = []
    Deployer(fetch, SynchronousPool()).deploy(spec).addBoth(results.append)
    assert results == []  # held in the fetch
    swap_for_link(dest, outside)
    gate.callback(None)
    [result] = results[0]
    assert result.state == "failed" and REFUSED in (result.reason or ""), result.reason
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("link", [True, False])
@pytest_twisted.ensureDeferred
async def test_destination_swapped_during_a_slow_fetch_is_refused_by_the_service(
        link: bool, deploy_system: Any, make_repo: Any, tmp_path: Path) -> None:
    """Through the Deploy service on the broker: the destination passes the 403 check, is swapped for a
    link to outside while its download is held, and the item fails; the outside folder is untouched."""
    url, server = make_repo("http")
    gate = server.hold(f"deps/{PLAIN}")
    dest, outside = tmp_path / "dest" / "app", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (outside / "precious").write_text("keep")
    before = digest(outside)
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, [item("notes", "1.0", dest, link=link)]))
    call = deploy_system.deploy(spec)
    await within(server.wait_held(f"deps/{PLAIN}"))
    swap_for_link(dest, outside)
    gate.callback(None)
    result = await within(call)
    [row] = result["items"]
    assert not result["ok"] and row["state"] == "failed" and REFUSED in row["reason"], row
    assert digest(outside) == before


# -- the record folder -------------------------------------------------------------------------------------
@pytest.mark.parametrize("link", [True, False])
def test_record_folder_that_is_a_symlink_is_refused(tmp_path: Path, link: bool) -> None:
    """``<dest>/.ion-deploy`` planted as a link to outside: refused; no manifest (nor lock) written there."""
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / ".ion-deploy").symlink_to(outside, target_is_directory=True)
    entry = make_entry(tmp_path / "cache" / "1.0", {"lib/libz.so": "z"})
    with pytest.raises(PlacementError, match=REFUSED):
        put(entry, dest, ["lib"], link=link)
    assert list(outside.iterdir()) == []


def test_manifest_that_is_a_symlink_is_never_written_through(tmp_path: Path) -> None:
    """A manifest replaced by a link to an outside file: the link is replaced, the file never written."""
    dest, victim = tmp_path / "dest", tmp_path / "victim.json"
    victim.write_text("keep")
    entry = make_entry(tmp_path / "cache" / "1.0", {"lib/libz.so": "z"})
    put(entry, dest, ["lib"])
    manifest = manifest_path(dest, "linux", "zlib")
    manifest.unlink()
    manifest.symlink_to(victim)
    put(entry, dest, ["lib"], link=False)
    assert victim.read_text() == "keep"
    assert not manifest.is_symlink() and json.loads(manifest.read_text())["link"] is False


# -- entry names the placer keeps for itself ---------------------------------------------------------------
@pytest.mark.parametrize("link", [True, False])
@pytest.mark.parametrize("name", [".ion-deploy", ".lib.ion-new-0badf00d", ".lib.ion-old-0badf00d"])
def test_entry_with_a_reserved_top_level_name_is_refused(tmp_path: Path, name: str, link: bool) -> None:
    """An entry whose top-level name is ``.ion-deploy`` (or a placer temp name) is refused with a clear
    error; the cache entry is byte-identical afterwards and the destination has no such name."""
    entry = make_entry(tmp_path / "cache" / "1.0", {f"{name}/linux.zlib.json": "{}", "lib/libz.so": "z"})
    before = digest(entry)
    dest = tmp_path / "dest"
    with pytest.raises(PlacementError, match=f"top-level name '{name}'.*refusing"):
        put(entry, dest, [name, "lib"], link=link)
    assert digest(entry) == before
    assert not os.path.lexists(dest / name) or not (dest / name).is_symlink()


@pytest.mark.parametrize("link", [True, False])
@pytest_twisted.ensureDeferred
async def test_archive_whose_top_folder_is_ion_deploy_is_refused_by_the_service(
        link: bool, deploy_system: Any, make_repo: Any, tmp_path: Path) -> None:
    """An archive with top folder ``.ion-deploy``, deployed twice: each time refused naming it; the
    manifest is never written into the cache entry, which stays as it was published."""
    files = {"linux/evil/1.0/evil.tgz": tgz({".ion-deploy/linux.evil.json": b"{}", ".ion-deploy/x": b"x"})}
    url, _ = make_repo("file", files)
    spec = load_deployment(write_deployment(tmp_path / "d.json", url,
                                            [item("evil", "1.0", tmp_path / "dest" / "app", link=link)]))
    first = await deploy_system.deploy(spec)
    [row] = first["items"]
    assert row["state"] == "failed" and "'.ion-deploy'" in row["reason"], row
    entry = Path(row["entry"])
    published = digest(entry)
    assert (entry / ".ion-deploy" / "linux.evil.json").read_text() == "{}"
    second = await deploy_system.deploy(spec)
    assert second["items"][0]["state"] == "failed"
    assert digest(entry) == published
    assert not (tmp_path / "dest" / "app" / ".ion-deploy").is_symlink()


# -- the cache is read-only to deployments -----------------------------------------------------------------
@pytest.mark.parametrize("link", [True, False])
def test_destination_in_the_cache_is_refused_at_place(tmp_path: Path, link: bool) -> None:
    """A destination inside the cache root (another entry, or this entry itself) is refused, and the
    entries are byte-identical afterwards."""
    cache = tmp_path / "cache"
    entry = make_entry(cache / "r" / "linux" / "zlib" / "1.0", {"lib/libz.so": "z"})
    other = make_entry(cache / "r" / "linux" / "tool" / "3.0", {"bin/tool": "t"})
    before = digest(cache)
    for dest in (other / "bin", entry / "lib", cache / "new"):
        with pytest.raises(PlacementError, match="lies in the cache"):
            put(entry, dest, ["lib"], link=link, cache_root=cache)
    assert digest(cache) == before


@pytest.mark.parametrize("link", [True, False])
@pytest_twisted.ensureDeferred
async def test_second_request_cannot_write_through_the_first_ones_links(
        link: bool, container_factory: Any, make_repo: Any, tmp_path: Path) -> None:
    """The cache root lies under an allowed root. Request 1 links ``app/zlib`` into its entry; request 2
    names ``app/zlib`` (the link) or the cache root as its destination: refused (403), and the published
    entry is byte-identical."""
    from ion.services.deploy.service import DeployClient
    from ion.testing import client_process

    (tmp_path / "dest").mkdir()
    (tmp_path / "repos").mkdir()
    container = await container_factory(config=system_config(tmp_path, allowed_destinations=[str(tmp_path)]))
    await container.app_manager.start_app("deploy")
    client = DeployClient(await client_process(container))
    url, _ = make_repo("file")
    app = tmp_path / "dest" / "app"
    first = await client.deploy(load_deployment(write_deployment(tmp_path / "1.json", url,
                                                                 [item("zlib", "1.2", app)])))
    assert first["ok"], first
    entry = Path(first["items"][0]["entry"])
    assert os.readlink(app / "zlib") == str(entry / "zlib")
    published = digest(entry)
    for dest in (app / "zlib", app / "zlib" / "include", tmp_path / "cache" / "mine"):
        spec = load_deployment(write_deployment(tmp_path / "2.json", url, [item("notes", "1.0", dest, link=link)]))
        with pytest.raises(ReceivedApplicationError) as info:
            await client.deploy(spec)
        assert info.value.response_code == 403 and "cache root" in info.value.message, info.value.message
    assert digest(entry) == published
    assert not (tmp_path / "cache" / "mine").exists()


@pytest.mark.parametrize("link", [True, False])
def test_destination_that_became_a_link_into_the_cache_is_refused_at_place(tmp_path: Path, link: bool) -> None:
    """At write time, a destination that is now a link into a published entry is refused, not followed."""
    cache, root = tmp_path / "cache", tmp_path / "root"
    entry = make_entry(cache / "r" / "linux" / "zlib" / "1.2", {"zlib/include/zlib.h": "h"})
    notes = make_entry(cache / "r" / "linux" / "notes" / "1.0", {"notes.txt": "n"})
    (root / "app").mkdir(parents=True)
    target = Target.resolve(root / "app" / "zlib", root)  # did not exist at the check
    put(entry, root / "app", ["zlib"], root=root)  # an earlier request: app/zlib -> the entry
    before = digest(cache)
    with pytest.raises(PlacementError, match=REFUSED):
        place(notes, ["notes.txt"], target.path, link=link, platform="linux", name="notes", version="1.0",
              entry_stamp="t", root=target.root, cache_root=cache)
    assert digest(cache) == before


# -- two deployers copying into one destination at once ----------------------------------------------------
def test_two_threads_copying_into_one_destination_both_succeed(tmp_path: Path) -> None:
    """Two placements of one item (link: false) into a fresh destination at once, each run three times,
    twenty rounds: never "exists and was not placed by a deployment"."""
    entry = make_entry(tmp_path / "cache" / "1.0",
                       {f"d{i}/f{j}": "x" * 1000 for i in range(4) for j in range(20)})
    names = [f"d{i}" for i in range(4)]
    for round_ in range(20):
        dest = tmp_path / f"out{round_}"
        barrier = threading.Barrier(2)
        errors: list[str] = []

        def deployer(barrier: threading.Barrier = barrier, dest: Path = dest, errors: list[str] = errors) -> None:
            barrier.wait()
            for _ in range(3):
                try:
                    put(entry, dest, names, link=False)
                except PlacementError as exc:
                    errors.append(str(exc))

        threads = [threading.Thread(target=deployer) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], f"round {round_}: {errors[0]}"
        assert sorted(p.name for p in dest.iterdir()) == [".ion-deploy", *names]
        assert sorted(p.name for p in (dest / ".ion-deploy").iterdir()) == [".lock", "linux.zlib.json"]


def _ion_deploy(deployment: Path, cache: Path, cwd: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("ION_CACHE_DIR", "ION_HOST_ID")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["ION_HOST_ID"] = "test-host"
    argv = [sys.executable, "-m", "ion.services.deploy.cli", str(deployment), "--cache-dir", str(cache), "--json"]
    return subprocess.Popen(argv, env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_ion_deploy_processes_copying_at_once_both_succeed(tmp_path: Path) -> None:
    """Two real ``ion-deploy`` processes, link: false, warm cache, into one fresh destination, ten rounds:
    both succeed every time (placement of a destination is serialised across processes). Each item has
    several heavy top-level names, so one process's copy is long under way while the other looks."""
    def heavy(top: str) -> dict[str, bytes]:
        # Incompressible content (the unpacker refuses what looks like a compression bomb).
        return {f"{top}/f{i:03}": os.urandom(2048) for i in range(150)}

    repo = write_tree(tmp_path / "repo", {
        TGZ: tgz({**heavy("include"), **heavy("lib"), **heavy("share"), **heavy("zlib")}),
        "linux/other/1.0/other.tgz": tgz({**heavy("other"), **heavy("more")})})
    dest = tmp_path / "work" / "dest"
    deployment = write_deployment(tmp_path / "d.json", f"file://{repo}", [
        item("zlib", "1.2", dest, link=False), item("other", "1.0", dest, link=False)])
    cache = tmp_path / "cache"
    warm = _ion_deploy(deployment, cache, tmp_path)
    out, err = warm.communicate(timeout=120)
    assert warm.returncode == 0, out.decode()[-2000:] + err.decode()[-2000:]
    for round_ in range(10):
        shutil.rmtree(dest)
        procs = [_ion_deploy(deployment, cache, tmp_path) for _ in range(2)]
        outcomes = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outcomes, strict=True):
            assert p.returncode == 0, f"round {round_}: {out.decode()[-3000:]} {err.decode()[-1000:]}"
            assert json.loads(out)["ok"]
        assert sorted(p.name for p in dest.iterdir()) == [
            ".ion-deploy", "include", "lib", "more", "other", "share", "zlib"]
