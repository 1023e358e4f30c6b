"""Generations of a deployment file and rollback (ion.services.deploy.generations): in process over a real
cache and file: repository, the reaper keeping kept generations' entries, the Deploy service's ops over the
embedded broker, and ``ion-deploy --generations/--rollback`` end to end."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from ion.core.exceptions import ReceivedApplicationError
from ion.services.deploy.generations import (
    DeploymentFile,
    Generation,
    GenerationError,
    GenerationStore,
    record_generation,
    rollback,
)
from ion.services.deploy.spec import Deployment, load_deployment
from ion.testing.servers import write_tree

from .scenario_support import ion_deploy_process, item, run_main, write_deployment

ROOT = Path(__file__).resolve().parents[3]
HOST = "test-host"

#: Three versions of one plain-file dependency, and a second dependency.
FILES = {f"linux/notes/{v}/notes.txt": f"notes {v}\n".encode() for v in ("1.0", "2.0", "3.0")}
FILES["linux/tool/1.0/tool.txt"] = b"tool 1.0\n"


@pytest.fixture(autouse=True)
def _cache_dir_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache's default root in the test's folder; this host is HOST (link records included)."""
    monkeypatch.setenv("ION_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("ION_HOST_ID", HOST)


@pytest.fixture
def repo(tmp_path: Path) -> str:
    """A file: repository (under ``repos``, which the service fixture allows) holding :data:`FILES`."""
    return f"file://{write_tree(tmp_path / 'repos' / 'repo', FILES)}"


def write(tmp_path: Path, repo: str, notes: str, *, tool: bool = True, name: str = "deployment.json") -> Path:
    """The deployment file: notes ``notes`` linked into dest/notes (and tool 1.0 copied into dest/tool)."""
    items = [item("notes", notes, tmp_path / "dest" / "notes")]
    if tool:
        items.append(item("tool", "1.0", tmp_path / "dest" / "tool", link=False))
    return write_deployment(tmp_path / name, repo, items)


def notes_in_place(tmp_path: Path) -> str:
    return (tmp_path / "dest" / "notes" / "notes.txt").read_text()


# -- in process: a real cache, fetcher and deployer -----------------------------------------------------
@dataclass
class Local:
    """The deployer of ``ion-deploy`` in process, with its generation store."""

    cache: Any
    deployer: Any
    store: GenerationStore

    def file(self, path: Path) -> DeploymentFile:
        return DeploymentFile.of(path, HOST)

    async def deploy(self, path: Path) -> tuple[list[Any], Generation | None]:
        deployment = load_deployment(path)
        results = list(await self.deployer.deploy(deployment))
        recorded = await record_generation(self.store, self.file(path), deployment, results, caller="tester",
                                           via="test")
        return results, recorded

    async def rollback(self, path: Path, number: int | None = None) -> Any:
        return await rollback(self.store, self.file(path), number, self.deployer.deploy, caller="tester",
                              via="test")


@pytest_twisted.async_yield_fixture
async def local(tmp_path: Path) -> AsyncIterator[Local]:
    from twisted.internet import reactor

    from ion.core.threads import BlockingPool
    from ion.services.cache.core import Cache
    from ion.services.deploy.cli import _fetch_function
    from ion.services.deploy.core import Deployer
    from ion.services.fetch.core import Fetcher, local_unpack
    from ion.services.fetch.repository import FetchConfig

    pool = BlockingPool(reactor, maxthreads=4)
    pool.start()
    cache = Cache(tmp_path / "cache", host_id=HOST, pool=pool)
    fetcher = Fetcher(cache, local_unpack(pool), pool=pool, config=FetchConfig(retry_delay=0.0))
    deployer = Deployer(_fetch_function(fetcher), pool, cache_root=cache.root)
    try:
        yield Local(cache, deployer, GenerationStore(cache.root, pool, keep=3))
    finally:
        await fetcher.close()
        await cache.close()
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_a_generation_is_recorded_for_a_successful_deploy_only(local: Local, repo: str, tmp_path: Path) -> None:
    """A deploy with a failed item records none; a successful one records generation 1 with the file's
    hash, each item's version, entry and destination, the time and the caller; the same deploy again
    records none; an edited file records generation 2."""
    bad = write_deployment(tmp_path / "deployment.json", repo, [item("notes", "9.9", tmp_path / "dest" / "notes")])
    results, recorded = await local.deploy(bad)
    assert [r.state for r in results] == ["failed"] and recorded is None
    assert not (await local.store.history(local.file(bad))).generations

    path = write(tmp_path, repo, "1.0")
    _, first = await local.deploy(path)
    assert first is not None and first.number == 1
    assert first.caller == "tester" and first.time > 0
    assert first.file_sha256 == load_deployment(path).file_sha256
    assert [(i["name"], i["version"], i["destination"]) for i in first.items] == [
        ("notes", "1.0", str(tmp_path / "dest" / "notes")), ("tool", "1.0", str(tmp_path / "dest" / "tool"))]
    assert all((local.cache.root / i["entry"] / "notes.txt").exists() for i in first.items[:1])

    _, again = await local.deploy(path)
    assert again is not None and again.number == 1  # nothing changed: no new generation
    write(tmp_path, repo, "2.0")
    _, second = await local.deploy(path)
    assert second is not None and second.number == 2
    history = await local.store.history(local.file(path))
    assert [g.number for g in history.generations] == [1, 2]
    # The record names the kept generations' entries at its top, for the reaper.
    record = json.loads(next((local.cache.root / "generations").glob("*.json")).read_text())
    assert record["file"] == str(path.resolve()) and record["host"] == HOST
    assert sorted(e.split("/", 1)[1] for e in record["entries"]) == [
        "linux/notes/1.0", "linux/notes/2.0", "linux/tool/1.0"]


@pytest_twisted.ensureDeferred
async def test_rollback_with_cached_entries_downloads_nothing(local: Local, repo: str, tmp_path: Path,
                                                              downloads: Counter[str]) -> None:
    """Rollback to the previous generation puts its versions back from the cache (no download at all)
    and is recorded as a new generation; a second rollback swaps back."""
    path = write(tmp_path, repo, "1.0")
    await local.deploy(path)
    write(tmp_path, repo, "2.0")
    await local.deploy(path)
    assert notes_in_place(tmp_path) == "notes 2.0\n"
    before = sum(downloads.values())

    done = await local.rollback(path)
    assert done.ok and done.to.number == 1
    assert notes_in_place(tmp_path) == "notes 1.0\n"
    assert [r.state for r in done.results] == ["cached", "cached"]
    assert sum(downloads.values()) == before  # no download
    assert done.generation is not None and done.generation.number == 3 and done.generation.rollback_of == 1
    assert done.generation.file_sha256 == done.to.file_sha256  # what the file held then

    again = await local.rollback(path)
    assert again.to.number == 2 and notes_in_place(tmp_path) == "notes 2.0\n"
    assert again.generation is not None and again.generation.number == 4
    assert sum(downloads.values()) == before
    assert done.left == again.left == []


@pytest_twisted.ensureDeferred
async def test_items_the_generation_lacks_are_left_in_place_and_named(local: Local, repo: str,
                                                                      tmp_path: Path) -> None:
    """An item added since generation N stays where it is after a rollback to N, named in ``left``."""
    path = write(tmp_path, repo, "1.0", tool=False)
    await local.deploy(path)
    write(tmp_path, repo, "2.0")
    await local.deploy(path)
    done = await local.rollback(path)
    assert done.ok and done.left == [f"linux/tool/1.0 -> {tmp_path / 'dest' / 'tool'}"]
    assert (tmp_path / "dest" / "tool" / "tool.txt").exists()
    assert done.to_wire()["left"] == done.left


@pytest_twisted.ensureDeferred
async def test_rollback_after_the_entry_was_evicted_fetches_it_again(local: Local, repo: str, tmp_path: Path,
                                                                     downloads: Counter[str]) -> None:
    """An entry evicted since (here: the cache cleared) is fetched again from its repository."""
    path = write(tmp_path, repo, "1.0")
    await local.deploy(path)
    write(tmp_path, repo, "2.0")
    await local.deploy(path)
    await local.cache.clear()
    assert not list(local.cache.root.rglob(".entry"))
    downloads.clear()

    done = await local.rollback(path, 1)
    assert done.ok and notes_in_place(tmp_path) == "notes 1.0\n"
    assert [r.state for r in done.results] == ["downloaded", "downloaded"]
    assert downloads == Counter({"notes.txt": 1, "tool.txt": 1})
    assert done.generation is not None and done.generation.number == 3


@pytest_twisted.ensureDeferred
async def test_a_generation_that_is_not_kept_is_a_clear_error(local: Local, repo: str, tmp_path: Path) -> None:
    """No history, no previous generation, a number not kept, a number that is none: each a
    GenerationError naming the file and the kept generations; nothing is placed."""
    path = write(tmp_path, repo, "1.0")
    with pytest.raises(GenerationError, match="no generation of .* is recorded: deploy it first"):
        await local.rollback(path)
    await local.deploy(path)
    with pytest.raises(GenerationError, match="has only generation 1: there is no previous one"):
        await local.rollback(path)
    with pytest.raises(GenerationError) as info:
        await local.rollback(path, 7)
    assert info.value.code == 404 and str(path.resolve()) in str(info.value)
    assert "has no generation 7; kept: 1" in str(info.value)
    from ion.services.deploy.generations import parse_number

    for bad in (0, -1, "two", True, 1.5):
        with pytest.raises(GenerationError) as info:
            parse_number(bad)
        assert info.value.code == 400


@pytest_twisted.ensureDeferred
async def test_keep_generations_bounds_the_record(local: Local, repo: str, tmp_path: Path) -> None:
    """Only the newest keep_generations are kept (numbers go on counting); the oldest is gone."""
    local.store.keep = 2
    path = write(tmp_path, repo, "1.0")
    for v in ("1.0", "2.0", "3.0"):
        write(tmp_path, repo, v)
        await local.deploy(path)
    history = await local.store.history(local.file(path))
    assert [g.number for g in history.generations] == [2, 3]
    with pytest.raises(GenerationError, match="has no generation 1; kept: 2, 3"):
        await local.rollback(path, 1)


@pytest_twisted.ensureDeferred
async def test_two_files_have_two_histories(local: Local, repo: str, tmp_path: Path) -> None:
    """Each deployment file (its resolved path, on its host) has a history of its own."""
    a = write(tmp_path, repo, "1.0", name="a.json")
    b = write(tmp_path, repo, "2.0", tool=False, name="b.json")
    await local.deploy(a)
    await local.deploy(b)
    assert [g.items[0]["version"] for g in (await local.store.history(local.file(a))).generations] == ["1.0"]
    assert [g.items[0]["version"] for g in (await local.store.history(local.file(b))).generations] == ["2.0"]
    other_host = DeploymentFile(str(a.resolve()), "another-host")
    assert not (await local.store.history(other_host)).generations


# -- the reaper -----------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_the_reaper_keeps_the_entries_of_kept_generations(local: Local, repo: str, tmp_path: Path) -> None:
    """With a policy that evicts every version it may, the reaper removes an entry no kept generation
    names and nothing links, and keeps one a kept generation names (no longer linked)."""
    from twisted.internet import reactor

    from ion.services.cache.reaper import CacheReaper, ReapPolicy

    local.store.keep = 2
    path = write(tmp_path, repo, "1.0", tool=False)
    for v in ("1.0", "2.0", "3.0"):
        write(tmp_path, repo, v, tool=False)
        await local.deploy(path)
    # 1.0: in no kept generation, not linked; 2.0: kept by generation 2, not linked; 3.0: linked.
    reaper = CacheReaper(local.cache, ReapPolicy(keep=0, min_idle=0.0), name="reaper", clock=reactor)
    report = await reaper.run()
    assert report.error is None
    assert [e.key.version for e in report.pruned.removed] == ["1.0"]
    assert report.kept == 2 and report.linked == 1
    versions = sorted(p.parent.name for p in local.cache.root.glob("*/linux/notes/*/.entry"))
    assert versions == ["2.0", "3.0"]
    done = await local.rollback(path)  # to generation 2: its entry is still cached
    assert [r.state for r in done.results] == ["cached"] and notes_in_place(tmp_path) == "notes 2.0\n"


@pytest_twisted.ensureDeferred
async def test_a_reap_round_reads_the_generation_records_once(local: Local, repo: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The records are read for the survey and not again for each candidate's last check while their
    folder is unchanged (and old enough to trust its mtime); the kept entry is still kept."""
    from twisted.internet import reactor

    from ion.services.cache import reaper as reaper_module
    from ion.services.cache.reaper import GENERATIONS_DIR, CacheReaper, ReapPolicy

    local.store.keep = 1
    path = write(tmp_path, repo, "1.0", tool=False)
    for v in ("1.0", "2.0", "3.0"):
        write(tmp_path, repo, v, tool=False)
        await local.deploy(path)
    # Nothing links the entries any more: every version is a candidate the records must be checked for.
    shutil.rmtree(tmp_path / "dest")
    folder = local.cache.root / GENERATIONS_DIR
    old = time.time() - 60
    os.utime(folder, (old, old))
    reads: list[Path] = []
    real = reaper_module.kept_entries
    monkeypatch.setattr(reaper_module, "kept_entries", lambda root: reads.append(root) or real(root))
    report = await CacheReaper(local.cache, ReapPolicy(keep=0, min_idle=0.0), name="reaper", clock=reactor).run()
    assert report.error is None
    assert sorted(e.key.version for e in report.pruned.removed) == ["1.0", "2.0"]
    assert report.kept == 1 and len(reads) == 1


def test_kept_entries_are_read_again_when_the_generations_folder_changes(tmp_path: Path) -> None:
    """KeptEntries answers from its last read while the folder is unchanged and old; a record renamed
    into it is seen at once, and a folder modified within RACY_SECONDS is read every time."""
    from ion.services.cache.reaper import GENERATIONS_DIR, KeptEntries

    folder = tmp_path / GENERATIONS_DIR
    folder.mkdir()

    def record(name: str, entries: list[str]) -> None:
        (folder / f".{name}.tmp").write_text(json.dumps({"entries": entries}))
        os.rename(folder / f".{name}.tmp", folder / f"{name}.json")

    def age(seconds: float) -> None:
        then = time.time() - seconds
        os.utime(folder, (then, then))

    record("a", ["r/p/a/1.0"])
    age(60)
    kept = KeptEntries(tmp_path)
    assert kept() == {tmp_path / "r/p/a/1.0"} and kept() == {tmp_path / "r/p/a/1.0"} and kept.reads == 1
    record("b", ["r/p/b/2.0"])  # the folder's mtime is now: read again, and every time while it is recent
    assert kept() == {tmp_path / "r/p/a/1.0", tmp_path / "r/p/b/2.0"} and kept.reads == 2
    kept()
    assert kept.reads == 3
    age(KeptEntries.RACY_SECONDS + 1)
    kept()
    kept()
    assert kept.reads == 4
    assert KeptEntries(tmp_path / "missing")() == set()


def test_an_unreadable_generation_record_protects_nothing_and_breaks_nothing(tmp_path: Path) -> None:
    """kept_entries skips a record that is not JSON, and any entry path that is not an entry's."""
    from ion.services.cache.reaper import GENERATIONS_DIR, kept_entries

    folder = tmp_path / GENERATIONS_DIR
    folder.mkdir()
    (folder / "bad.json").write_text("{not json")
    (folder / "odd.json").write_text(json.dumps({"entries": ["../../etc/passwd/x", "a/b/c/d", 3]}))
    assert kept_entries(tmp_path) == {tmp_path / "a/b/c/d"}
    assert kept_entries(tmp_path / "missing") == set()


# -- the Deploy service over the embedded broker --------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_the_service_records_lists_and_rolls_back(deploy_system: Any, repo: str, tmp_path: Path,
                                                        downloads: Counter[str]) -> None:
    """DeployClient.deploy names the file: the service records its generations (caller: broker-user);
    ops generations and rollback (no download while cached) and the shell helpers use them; a
    generation not kept is a 404 naming the kept ones."""
    from ion.services.deploy.shellhelpers import DeployShellHelpers

    path = write(tmp_path, repo, "1.0")
    assert (await deploy_system.deploy(load_deployment(path)))["ok"]
    write(tmp_path, repo, "2.0")
    assert (await deploy_system.deploy(load_deployment(path)))["ok"]
    file = await deploy_system.deployment_file(path)
    assert file.host == HOST  # the container's host_id
    listing = await deploy_system.generations(file)
    assert [g["generation"] for g in listing["generations"]] == [2, 1]  # newest first
    assert listing["keep"] == 3 and listing["file"] == str(path.resolve())
    assert listing["generations"][0]["via"].startswith("deploy ")
    # What the file held (the request's file_sha256), as ion-deploy in process records it.
    assert listing["generations"][0]["file_sha256"] == load_deployment(path).file_sha256
    before = sum(downloads.values())

    answer = await deploy_system.rollback(file)
    assert answer["ok"] and answer["rollback_of"] == 1 and answer["generation"] == 3
    assert [r["state"] for r in answer["items"]] == ["cached", "cached"]
    assert notes_in_place(tmp_path) == "notes 1.0\n" and sum(downloads.values()) == before

    with pytest.raises(ReceivedApplicationError) as info:
        await deploy_system.rollback(file, 9)
    assert info.value.response_code == 404 and "has no generation 9; kept: 1, 2, 3" in info.value.message
    with pytest.raises(ReceivedApplicationError) as info:
        await deploy_system.rpc_send("generations", {"file": "relative.json", "host": HOST})
    assert info.value.response_code == 400

    helpers = DeployShellHelpers(deploy_system.proc)
    shown = await helpers.generations(str(path))
    assert [row["generation"] for row in shown.rows] == [3, 2, 1] and "rollback to 1" in str(shown)
    rolled = await helpers.rollback(str(path), 2)
    assert "rolled back to generation 2: now generation 4" in str(rolled)
    assert notes_in_place(tmp_path) == "notes 2.0\n"


@pytest_twisted.ensureDeferred
async def test_a_rollback_is_authorized_as_a_deploy(deploy_system: Any, repo: str, tmp_path: Path) -> None:
    """A generation whose destination is outside the allowed roots now (its record edited) is refused
    with 403 before anything is placed."""
    path = write(tmp_path, repo, "1.0", tool=False)
    assert (await deploy_system.deploy(load_deployment(path)))["ok"]
    write(tmp_path, repo, "2.0", tool=False)
    assert (await deploy_system.deploy(load_deployment(path)))["ok"]
    record = next((tmp_path / "cache" / "generations").glob("*.json"))
    data = json.loads(record.read_text())
    data["generations"][0]["items"][0]["destination"] = str(tmp_path / "elsewhere")
    record.write_text(json.dumps(data))
    with pytest.raises(ReceivedApplicationError) as info:
        await deploy_system.rollback(await deploy_system.deployment_file(path))
    assert info.value.response_code == 403 and "outside the allowed roots" in info.value.message
    assert not (tmp_path / "elsewhere").exists() and notes_in_place(tmp_path) == "notes 2.0\n"


# -- ion-deploy end to end ------------------------------------------------------------------------------
def test_ion_deploy_generations_and_rollback(tmp_path: Path, repo: str) -> None:
    """ion-deploy records a generation per successful deploy, --generations lists them, --rollback
    puts the previous one back from the cache (no download) and --rollback N a chosen one; an N
    not kept exits 2 naming the kept ones; --json gives the same as JSON."""
    path = write(tmp_path, repo, "1.0")
    assert ion_deploy_process(tmp_path, str(path)).returncode == 0
    write(tmp_path, repo, "2.0")
    assert ion_deploy_process(tmp_path, str(path)).returncode == 0

    listing = ion_deploy_process(tmp_path, "--generations", str(path))
    assert listing.returncode == 0, listing.stderr
    assert f"Generations of {path.resolve()}" in listing.stdout
    lines = listing.stdout.splitlines()
    assert lines[1].split()[0] == "2" and "(current)" in lines[1] and "linux/notes 2.0" in lines[2]

    rolled = ion_deploy_process(tmp_path, "--rollback", str(path), "--json")
    assert rolled.returncode == 0, rolled.stderr
    data = json.loads(rolled.stdout)
    assert data["ok"] and data["rollback"] == {"to": 1, "generation": 3}
    assert [(i["name"], i["version"], i["state"]) for i in data["items"]] == [
        ("notes", "1.0", "cached"), ("tool", "1.0", "cached")]
    assert notes_in_place(tmp_path) == "notes 1.0\n"

    chosen = ion_deploy_process(tmp_path, "--rollback", "2", str(path))
    assert chosen.returncode == 0, chosen.stderr
    assert "Rolled back to generation 2: now generation 4" in chosen.stdout
    assert notes_in_place(tmp_path) == "notes 2.0\n"

    missing = ion_deploy_process(tmp_path, "--rollback", "1", str(path), "--json")
    assert missing.returncode == 2
    assert "has no generation 1; kept: 2, 3, 4" in json.loads(missing.stdout)["errors"][0]
    listed = json.loads(ion_deploy_process(tmp_path, "--generations", str(path), "--json").stdout)
    assert [g["generation"] for g in listed["generations"]] == [4, 3, 2]
    assert listed["generations"][0]["rollback_of"] == 2


def test_rollback_arguments() -> None:
    """--rollback takes a number >= 1 or none, needs the file, and goes without --generations."""
    code, _, err = run_main("--rollback", "0", "d.json")
    assert code == 2 and "--rollback takes a generation number >= 1, not '0'" in err
    code, _, err = run_main("--rollback")
    assert code == 2 and "need the DEPLOYMENT.json file" in err
    code, _, err = run_main("--rollback", "--generations", "d.json")
    assert code == 2 and "one at a time" in err


def test_a_deployment_is_read_with_its_identity(tmp_path: Path, repo: str) -> None:
    """load_deployment gives the file's resolved path and the sha256 of its bytes."""
    import hashlib

    path = write(tmp_path, repo, "1.0")
    deployment: Deployment = load_deployment(path)
    assert deployment.file == str(path.resolve())
    assert deployment.file_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest_twisted.ensureDeferred
async def test_ion_deploy_generations_and_rollback_through_a_running_system(amqp_url: str, tmp_path: Path,
                                                                          repo: str) -> None:
    """With --broker, the Deploy service records the generations of the file ion-deploy names, and
    --generations and --rollback go to its ops (same output as in process)."""
    from twisted.internet import utils

    from ion.testing import ContainerFactory

    from .scenario_support import system_config

    (tmp_path / "dest").mkdir()
    factory = ContainerFactory(broker_url=amqp_url)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    async def ion_deploy(*args: str) -> tuple[int, str, str]:
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "ion.services.deploy.cli", *args, "--broker", amqp_url, "-s", "gensys"],
            env=env, path=str(tmp_path))
        return code, out.decode(), err.decode()

    try:
        container = await factory(sysname="gensys", config=system_config(tmp_path))
        await container.app_manager.start_app("deploy")
        path = write(tmp_path, repo, "1.0")
        code, out, err = await ion_deploy(str(path))
        assert code == 0, err + out
        write(tmp_path, repo, "2.0")
        code, out, err = await ion_deploy(str(path))
        assert code == 0, err + out
        code, out, err = await ion_deploy("--generations", str(path), "--json")
        assert code == 0, err
        assert [g["generation"] for g in json.loads(out)["generations"]] == [2, 1]
        code, out, err = await ion_deploy("--rollback", str(path), "--json")
        assert code == 0, err
        data = json.loads(out)
        assert data["rollback"] == {"to": 1, "generation": 3}
        assert [(i["name"], i["version"], i["state"]) for i in data["items"]] == [
            ("notes", "1.0", "cached"), ("tool", "1.0", "cached")]
        assert notes_in_place(tmp_path) == "notes 1.0\n"
        code, out, err = await ion_deploy("--rollback", "7", str(path))
        assert code == 2 and "has no generation 7; kept: 1, 2, 3" in err
    finally:
        await factory.teardown()


def test_a_deploy_request_names_its_file(tmp_path: Path, repo: str) -> None:
    """DeployClient's request carries the file, host and file hash as protobuf and reads back as the dict
    a plain client sends; without a host (no file named) they are left out."""
    from ion.services.deploy.service import DeployClient
    from ion.services.records import convert

    deployment = load_deployment(write(tmp_path, repo, "1.0"))
    msg = convert.pb.DeployRequest.FromString(DeployClient.request_content(deployment, HOST).SerializeToString())
    wire = convert.deploy_request_to_wire(msg)
    assert (wire["file"], wire["host"], wire["file_sha256"]) == (deployment.file, HOST, deployment.file_sha256)
    assert "file" not in convert.deploy_request_to_wire(DeployClient.request_content(deployment))
