"""Graceful drain of the Deploy service and its durable job records (issue 6, capabilities 4 and 5).

Drain: on terminate the service stops taking deploys, lets the ones in progress finish within
``drain_timeout``, then cancels the rest (locks released, staging removed) and says, per item,
what finished and what was cancelled. Durable jobs: an async job's record is written beside
the cache, read back by another container, and a RUNNING record whose container died answers
LOST_IN_SPACE, never RUNNING forever.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task

from ion.core.deferreds import observe
from ion.core.exceptions import ReceivedError
from ion.core.jobs import JobStatus, JobStore, JobTable
from ion.services.deploy.spec import load_deployment

from . import scenario_support
from .scenario_support import (
    CONTENT,
    PLAIN,
    TGZ,
    ZIP,
    child_settings,
    deploy_held,
    files_named,
    item,
    job_ended,
    system_config,
    within,
    write_deployment,
)

ROOT = Path(__file__).resolve().parents[3]


# -- helpers ---------------------------------------------------------------------------------------------
def deploy_service(container: Any) -> Any:
    """The DeployService process of ``container``."""
    from ion.services.deploy.service import DeployService

    found = [p for p in container.proc_manager.processes.values() if isinstance(p, DeployService)]
    assert len(found) == 1, found
    return found[0]


def lock_files(cache: Path) -> list[Path]:
    """Every entry lock file left in the cache."""
    return files_named(cache, "*.lock")


def staging_left(cache: Path) -> list[Path]:
    """Every staging folder left in the cache."""
    staging = cache / "staging"
    return sorted(staging.iterdir()) if staging.exists() else []


async def cleaned_up(cache: Path) -> None:
    """Wait (polling; the caller bounds it) until no lock file and no staging folder is left: a cancel
    travels to the Fetch service as a message, and its clean-up runs in the blocking pool."""
    from twisted.internet import reactor, task

    while lock_files(cache) or staging_left(cache):
        await task.deferLater(reactor, 0.02, lambda: None)


def three_items(dest: Path) -> list[dict[str, Any]]:
    """notes (plain file), zlib (tgz) and tool (zip), each in a folder of its own."""
    return [item("notes", "1.0", dest / "notes"), item("zlib", "1.2", dest / "zlib"),
            item("tool", "3.0", dest / "tool")]


def item_done(job: str | None, label: str) -> Any:
    """Matches the Deploy service's own end-of-item event (it has a position)."""
    return lambda e: e.get("job") == job and e.get("item") == label and e.get("phase") in ("done", "cancelled") \
        and "position" in e


# -- drain, through the service ----------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_drain_waits_for_work_in_progress_then_cancels_the_rest(deploy_system: Any, make_repo: Any,
                                                                       tmp_path: Path) -> None:
    """Within drain_timeout (a task.Clock) a held item finishes; at the timeout the other is cancelled: the job
    ends REMOTE_ERROR naming it, the finished items are switched back (all or nothing: ``rolled back``), and
    the Deploy service holds nothing."""
    url, server = make_repo("http")
    gates = {rel: server.hold(f"deps/{rel}") for rel in (TGZ, ZIP)}
    dest = tmp_path / "dest"
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(dest)))
    job = await deploy_system.deploy_async(spec)
    for rel in gates:
        await within(server.wait_held(f"deps/{rel}"))
    await deploy_system.events.wait(item_done(job, "linux/notes/1.0"))
    service = deploy_service(deploy_system.container)
    clock = task.Clock()
    drained = service.drain(30, clock=clock)
    assert not drained.called and service.draining
    # New deployments are refused while the service drains (503), the one in progress goes on.
    with pytest.raises(ReceivedError) as refused:
        await within(deploy_system.proc.rpc_send(service.id, "deploy", {
            "source": "x", "items": [dict(i.to_dict()) for i in spec.items[:1]]}))
    assert refused.value.response_code == 503 and "stopping" in refused.value.message
    gates[ZIP].callback(None)
    await deploy_system.events.wait(item_done(job, "linux/tool/3.0"))
    assert not drained.called
    clock.advance(30)
    await within(drained)
    assert not service.in_flight
    status = await within(deploy_system.job_status(job))
    assert (status["status"], status["state"]) == (JobStatus.REMOTE_ERROR, "REMOTE_ERROR")
    states = {r["item"]: r["state"] for r in status["results"].values()}
    assert states == {"linux/notes/1.0": "rolled back", "linux/tool/3.0": "rolled back",
                      "linux/zlib/1.2": "cancelled"}
    assert len(status["cancelled"]) == 1 and status["cancelled"][0].endswith("linux/zlib/1.2")
    assert status["error"].startswith("cancelled:") and "linux/zlib/1.2" in status["error"]
    assert not (dest / "tool/tool").exists() and not (dest / "zlib").exists()
    # The record beside the cache says the same.
    record = json.loads(next((tmp_path / "cache" / "jobs").glob("*.json")).read_text())
    assert record["status"] == JobStatus.REMOTE_ERROR and record["cancelled"] == status["cancelled"]
    # The cancel reached the Fetch service too: the held download was dropped there, its lock released
    # and its staging folder removed, without the held file ever coming.
    await within(cleaned_up(tmp_path / "cache"))
    assert server.gets(f"deps/{TGZ}") == 0


@pytest_twisted.ensureDeferred
async def test_an_operator_cancels_a_job_and_another_login_may_not(deploy_system: Any, make_repo: Any,
                                                                  container_factory: Any, tmp_path: Path) -> None:
    """``job_cancel`` is a control operation: a container logged in as another broker user gets a 403
    and the job runs on; the system's own login cancels it: REMOTE_ERROR naming the unfinished items,
    locks released, staging removed, and a second cancel answers ``cancelled: false``."""
    from ion.testing import client_process

    url, server = make_repo("http")
    gates = {rel: server.hold(f"deps/{rel}") for rel in (TGZ, ZIP)}
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(tmp_path / "dest")))
    job = await deploy_system.deploy_async(spec)
    for rel in gates:
        await within(server.wait_held(f"deps/{rel}"))
    await deploy_system.events.wait(item_done(job, "linux/notes/1.0"))
    other = await container_factory(sysname=deploy_system.container.sysname,
                                    config={"ion.core.messaging": {"memory_user": "mallory"}})
    outsider = await client_process(other)
    with pytest.raises(ReceivedError) as refused:
        await within(outsider.rpc_send(job.split("/", 1)[0], "job_cancel", {"job": job}))
    assert refused.value.response_code == 403 and "'mallory' is not an operator" in refused.value.message
    assert (await within(deploy_system.job_status(job)))["state"] in ("RUNNING", "PARTIAL")
    assert await within(deploy_system.cancel_job(job)) == {"job": job, "cancelled": True}
    # All or nothing: the item placed is switched back (in the pool), then the job ends.
    await deploy_system.events.wait(lambda e: e.get("job") == job and e.get("phase") == "rolled back")
    status = await within(deploy_system.job_status(job))
    assert status["state"] == "REMOTE_ERROR" and len(status["cancelled"]) == 2
    assert await within(deploy_system.cancel_job(job)) == {"job": job, "cancelled": False}
    await within(cleaned_up(tmp_path / "cache"))


@pytest_twisted.ensureDeferred
async def test_terminate_cancels_a_sync_deploy_and_tells_its_caller(container_factory: Any, make_repo: Any,
                                                                    tmp_path: Path) -> None:
    """terminate of the Deploy process (drain_timeout 0): the sync caller gets a 503 naming the cancelled item,
    with the finished one switched back (all or nothing); after the container stops no lock and no staging
    folder is left."""
    from ion.services.deploy.service import DeployClient
    from ion.testing import client_process

    (tmp_path / "dest").mkdir()
    (tmp_path / "repos").mkdir()
    container = await container_factory(config=dict(
        system_config(tmp_path, drain_timeout=0), **{"ion.core.process": {"terminate_timeout": 0}}))
    await container.app_manager.start_app("deploy")
    client = DeployClient(await client_process(container))
    events = await scenario_support.event_sink(container)
    url, server = make_repo("http")
    gate = server.hold(f"deps/{TGZ}")
    dest = tmp_path / "dest"
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(dest)[:2]))
    call = client.deploy(spec)
    await within(server.wait_held(f"deps/{TGZ}"))
    await events.wait(item_done(None, "linux/notes/1.0"))  # placed before the terminate
    service = deploy_service(container)
    await within(container.proc_manager.terminate_process(service.id))
    with pytest.raises(ReceivedError) as info:
        await within(call)
    err = info.value
    assert err.response_code == 503 and err.remote_error == "DeployCancelled"
    assert "cancelled: linux/zlib/1.2" in err.message and "finished: linux/notes/1.0" in err.message
    assert err.content["cancelled"] == ["linux/zlib/1.2"]
    assert [(i["item"], i["state"]) for i in err.content["items"]] == [
        ("linux/notes/1.0", "rolled back"), ("linux/zlib/1.2", "cancelled")]
    assert not (dest / "notes/notes.txt").exists()
    # The cancel reached the Fetch service: its held download is dropped, lock and staging cleaned up.
    await within(cleaned_up(tmp_path / "cache"))
    assert server.gets(f"deps/{TGZ}") == 0 and not gate.called
    await container.terminate()
    assert lock_files(tmp_path / "cache") == [] and staging_left(tmp_path / "cache") == []
    assert not (dest / "zlib").exists()


# -- cancellation reaches the fetches (the Deployer over the Fetch core, as ion-deploy runs it) -------------
@pytest_twisted.ensureDeferred
async def test_cancelling_a_deployment_releases_locks_and_removes_staging(make_repo: Any, tmp_path: Path) -> None:
    """Deferred.cancel of a deployment goes through the Deployer into the Fetcher: the held download is
    dropped, its entry lock released and its staging folders removed; the finished item is switched back
    (all or nothing), or stays placed with ``partial``."""
    from twisted.internet import reactor

    from ion.core.threads import BlockingPool
    from ion.services.cache.core import Cache
    from ion.services.deploy.core import Deployer
    from ion.services.fetch.core import Fetcher, local_unpack
    from ion.services.fetch.repository import FetchConfig

    url, server = make_repo("http")
    server.hold(f"deps/{TGZ}")
    dest = tmp_path / "dest"
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(dest)[:2]))
    cache_root = tmp_path / "cache"
    pool = BlockingPool(reactor, maxthreads=4)
    pool.start()
    # retries=0: the HTTP repository still takes a cancelled request for a dropped connection and tries
    # it again (each try waiting read_timeout); see the report of issue 6. One try ends at once.
    fetcher = Fetcher(Cache(cache_root, host_id="test-host", pool=pool), local_unpack(pool), pool=pool,
                      config=FetchConfig(retry_delay=0.0, retries=0))

    def fetch(it: Any, progress: Any) -> defer.Deferred[dict[str, Any]]:
        d = fetcher.fetch(it)
        d.addCallback(lambda r: {"state": r.state, "path": str(r.path), "names": r.info.content_names(),
                                 "stamp": str(r.info.fetched_at)})
        return d

    placed: defer.Deferred[None] = defer.Deferred()

    def on_result(result: Any) -> None:
        if result.item.name == "notes" and not placed.called:
            placed.callback(None)

    try:
        run = Deployer(fetch, pool).deploy(spec, on_result=on_result)
        await within(server.wait_held(f"deps/{TGZ}"))
        await within(placed)
        assert lock_files(cache_root) and staging_left(cache_root)  # the held fetch holds both
        run.cancel()
        results = await within(run)
    finally:
        await fetcher.close()
        await pool.stop()
    assert [(r.item.name, r.state) for r in results] == [("notes", "rolled back"), ("zlib", "cancelled")]
    assert lock_files(cache_root) == [] and staging_left(cache_root) == []
    assert not (dest / "notes/notes.txt").exists() and not (dest / "zlib").exists()


# -- durable job records ---------------------------------------------------------------------------------
async def _deploy_container(container_factory: Any, tmp_path: Path, **deploy: Any) -> tuple[Any, Any]:
    """A container running deploy.app on ``tmp_path``'s cache, and a DeployClient in it."""
    from ion.services.deploy.service import DeployClient
    from ion.testing import client_process

    (tmp_path / "dest").mkdir(exist_ok=True)
    (tmp_path / "repos").mkdir(exist_ok=True)
    container = await container_factory(config=system_config(tmp_path, **deploy))
    await container.app_manager.start_app("deploy")
    return container, DeployClient(await client_process(container))


@pytest_twisted.ensureDeferred
async def test_a_job_record_is_read_back_by_a_new_container_on_the_same_cache(container_factory: Any,
                                                                              make_repo: Any,
                                                                              tmp_path: Path) -> None:
    """A finished job of a container that stopped is answered by the next one started on the same cache,
    from its record (the client falls back from the gone instance to the service)."""
    url, _ = make_repo("file")
    first, client = await _deploy_container(container_factory, tmp_path)
    events = await scenario_support.event_sink(first)
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(tmp_path / "dest")[:2]))
    job = await client.deploy_async(spec)
    await events.wait(item_done(job, "linux/zlib/1.2"))
    await events.wait(item_done(job, "linux/notes/1.0"))
    await first.terminate()
    records = list((tmp_path / "cache" / "jobs").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["state"] == "FINISHED"
    second, client2 = await _deploy_container(container_factory, tmp_path)
    status = await within(client2.job_status(job))
    assert (status["status"], status["state"], status["from_record"]) == (JobStatus.FINISHED, "FINISHED", True)
    assert {r["item"]: r["state"] for r in status["results"].values()} == {
        "linux/notes/1.0": "downloaded", "linux/zlib/1.2": "downloaded"}
    assert status["owner"]["container"] == first.id


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("owner", ["dead pid on this host", "this container id, started again",
                                   "another host, container not among the nodes", "another host, alive"])
@pytest_twisted.ensureDeferred
async def test_a_running_record_of_a_dead_owner_is_lost_in_space(owner: str, container_factory: Any,
                                                                tmp_path: Path) -> None:
    """A record left RUNNING/PARTIAL by a container that is gone answers LOST_IN_SPACE saying it died (never
    RUNNING forever; such a record holds nothing to resume it by); one whose owner is alive (its process
    queue consumed, as the broker shows) is answered as recorded."""
    container, client = await _deploy_container(container_factory, tmp_path)
    dead = _dead_pid()
    live = deploy_service(container).id
    owners = {
        "dead pid on this host": {"container": "gone", "host": "test-host", "pid": dead, "process": "gone.5"},
        "this container id, started again": {"container": container.id, "host": "test-host", "pid": dead,
                                             "process": f"{container.id}.5"},
        "another host, container not among the nodes": {"container": "elsewhere", "host": "other-host",
                                                        "pid": os.getpid(), "process": "elsewhere.5"},
        "another host, alive": {"container": container.id, "host": "other-host", "pid": 1, "process": live},
    }
    job = f"{owners[owner]['process']}/abc123"
    record = {"job": job, "kind": "deploy", "status": 3, "state": "PARTIAL", "total": 2, "error": None,
              "results": {"1 linux/notes/1.0": {"item": "linux/notes/1.0", "state": "downloaded"}},
              "created": 1.0, "ended": None, "cancelled": [], "record": 1, "owner": owners[owner],
              "updated": container.clock.seconds()}
    await JobStore(tmp_path / "cache" / "jobs").save(job, record)
    status = await within(client.job_status(job))
    if owner == "another host, alive":
        assert (status["status"], status["state"]) == (JobStatus.PARTIAL, "PARTIAL")
        return
    assert (status["status"], status["state"], status["died"]) == (JobStatus.LOST_IN_SPACE, "LOST_IN_SPACE", True)
    assert "container died" in status["error"] and "1 part(s) had finished" in status["error"]
    assert list(status["results"]) == ["1 linux/notes/1.0"]


# -- the job table's records (no container) -----------------------------------------------------------------
def test_records_are_written_at_start_per_part_and_at_the_end(tmp_path: Path) -> None:
    """Each state of a job is on disk once written: RUNNING, PARTIAL with the part, the end; no temp file left."""
    clock = task.Clock()
    store = JobStore(tmp_path / "jobs")
    table = JobTable(clock, store=store, owner={"container": "c", "host": "h", "pid": 1, "process": "c.1"})
    work: defer.Deferred[dict[str, Any]] = defer.Deferred()
    job = table.start("deploy", work, total=2, job_id="c.1/ab")
    path = store.path(job.job_id)
    assert path.parent == tmp_path / "jobs" and "/" not in path.name

    def on_disk() -> dict[str, Any]:
        return dict(json.loads(path.read_text()))

    assert on_disk()["state"] == "RUNNING" and on_disk()["owner"]["container"] == "c"
    table.partial(job.job_id, "a", {"state": "downloaded"})
    assert on_disk()["state"] == "PARTIAL" and on_disk()["results"] == {"a": {"state": "downloaded"}}
    table.partial(job.job_id, "b", {"state": "cancelled"}, cancelled=True)
    work.callback({})
    final = on_disk()
    assert (final["state"], final["cancelled"]) == ("REMOTE_ERROR", ["b"])
    assert final["error"].startswith("cancelled: 1 part(s) did not finish (b); 1 finished")
    assert [p.name for p in (tmp_path / "jobs").iterdir()] == [path.name]


def test_records_expire_like_the_table_and_are_pruned(tmp_path: Path) -> None:
    """A record is answered from disk within the retention, LOST_IN_SPACE after it, and then pruned."""
    clock = task.Clock()
    store = JobStore(tmp_path / "jobs")
    first = JobTable(clock, retention=3600, store=store, owner={"container": "a"})
    job = first.start("deploy", defer.succeed({"x": {"state": "cached"}}), job_id="a.1/1")
    running = first.start("deploy", defer.Deferred(), job_id="a.1/2")
    # Another table on the same folder (a new container): it has neither job in memory.
    second = JobTable(clock, retention=3600, store=store, owner={"container": "b"},
                      owner_alive=lambda owner: False)
    answer: list[Any] = []
    second.lookup(job.job_id).addCallback(answer.append)
    assert answer[-1]["state"] == "FINISHED" and answer[-1]["from_record"] is True
    second.lookup(running.job_id).addCallback(answer.append)
    assert answer[-1]["state"] == "LOST_IN_SPACE" and answer[-1]["died"] is True
    clock.advance(3601)
    second.prune().addCallback(answer.append)
    assert sorted(answer[-1]) == ["a.1/1", "a.1/2"]  # ended long ago; left RUNNING by a dead owner
    assert list((tmp_path / "jobs").iterdir()) == []
    second.lookup(job.job_id).addCallback(answer.append)
    assert answer[-1]["state"] == "LOST_IN_SPACE" and "died" not in answer[-1]


def test_a_job_id_cannot_name_a_file_outside_the_folder(tmp_path: Path) -> None:
    """Ids are quoted into one file name: ``..`` and slashes stay inside the records folder."""
    store = JobStore(tmp_path / "jobs")
    for job_id in ("../../etc/passwd", "..", "a/b/../c"):
        assert store.path(job_id).parent == tmp_path / "jobs"


# -- a real twistd, SIGTERMed mid-deploy --------------------------------------------------------------------
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_sigterm_mid_deploy_drains_and_leaves_a_durable_record(amqp_url: str, make_repo: Any,
                                                                     tmp_path: Path) -> None:
    """`twistd -n cc --no-shell res/apps/deploy.app` on RabbitMQ, SIGTERMed while an async job waits on a
    download: it exits 0, the job's record beside the cache says which item finished and which was cancelled,
    and another container on the same cache answers job_status from that record; no lock is left."""
    from twisted.internet import reactor

    from ion.services.deploy.service import DeployClient
    from ion.testing import ContainerFactory, client_process
    from ion.testing.processes import WatchedProcess

    url, server = make_repo("http")
    server.hold(f"deps/{TGZ}")
    dest, cache = tmp_path / "dest", tmp_path / "cache"
    dest.mkdir()
    sysname = f"drain{os.getpid()}"
    settings = child_settings(cache, dest, drain_timeout=0)
    proto = WatchedProcess("twistd")
    reactor.spawnProcess(proto, sys.executable, [
        sys.executable, "-c", TWISTD, "-n", "--pidfile=", "cc", "--no-shell", "--broker", amqp_url, "-s", sysname,
        "-a", repr(settings), "res/apps/deploy.app"], env=dict(os.environ), path=str(ROOT))
    factory = ContainerFactory(broker_url=amqp_url)
    try:
        await proto.wait_for(b"started app deploy")
        container = await factory(sysname=sysname, config=system_config(tmp_path))
        client = DeployClient(await client_process(container))
        events = await scenario_support.event_sink(container)
        job = await deploy_held(client, url, server, tmp_path, dest)
        await events.wait(item_done(job, "linux/notes/1.0"))
        proto.transport.signalProcess("TERM")
        code = await within(proto.ended, 60)
        assert code == 0, proto.tail()
        records = list((cache / "jobs").glob("*.json"))
        assert len(records) == 1, proto.tail()
        record = json.loads(records[0].read_text())
        assert record["state"] == "REMOTE_ERROR" and record["error"].startswith("cancelled:")
        assert {r["item"]: r["state"] for r in record["results"].values()} == {
            "linux/notes/1.0": "rolled back", "linux/zlib/1.2": "cancelled"}
        assert lock_files(cache) == []
        # The stopped instance is gone: any Deploy instance answers from the record.
        await container.app_manager.start_app("deploy")
        status = await within(client.job_status(job))
        assert (status["state"], status["from_record"]) == ("REMOTE_ERROR", True)
    finally:
        if proto.exit_code is None:
            proto.transport.signalProcess("KILL")
        await factory.teardown()


def test_expired_records_are_pruned_while_the_table_is_used(tmp_path: Path) -> None:
    """Records of jobs ended longer than the retention ago go as the table is used, not only at start."""
    clock = task.Clock()
    store = JobStore(tmp_path / "jobs")
    JobTable(clock, retention=60, store=store, owner={"container": "old"}).start(
        "deploy", defer.succeed({}), job_id="old.1/1")
    table = JobTable(clock, retention=60, store=store, owner={"container": "new"})
    assert [p.name for p in (tmp_path / "jobs").iterdir()] == [store.path("old.1/1").name]
    clock.advance(61)
    table.list()
    assert list((tmp_path / "jobs").iterdir()) == []


# -- takeover: a job survives its container (issue #17 §4) ----------------------------------------------------
def _resumable_record(job: str, owner: dict[str, Any], spec: Any, done: list[int], now: float,
                      file: Any = None) -> dict[str, Any]:
    """A PARTIAL record as ``deploy_async`` writes it (with ``resume``), the items at ``done`` finished;
    ``file``: the deployment file the request named (its generations)."""
    from ion.services.deploy.place import Target
    from ion.services.deploy.service import _resume_data

    results = {f"{spec.items[i].position} {spec.items[i].label}": {
        "item": spec.items[i].label, "position": spec.items[i].position, "state": "downloaded", "already": False,
        "reason": None, "destination": str(spec.items[i].destination), "entry": None, "names": [], "link": True}
        for i in done}
    targets = [Target(Path(item.destination).parent, Path(item.destination)) for item in spec.items]
    return {"job": job, "kind": "deploy", "status": 3, "state": "PARTIAL", "total": len(spec.items), "error": None,
            "results": results, "created": 1.0, "ended": None, "cancelled": [], "record": 2, "owner": owner,
            "updated": now, "resume": _resume_data(spec, targets, "alice", file=file)}


@pytest_twisted.ensureDeferred
async def test_a_job_whose_owner_died_is_taken_over_and_finishes_only_the_rest(container_factory: Any,
                                                                              make_repo: Any,
                                                                              tmp_path: Path) -> None:
    """A PARTIAL record of a dead owner (a dead pid of this host) with resume data: the Deploy instance's scan
    claims it, deploys the two items not finished under the same job id (its progress events name it), and
    job_status (the id's instance is gone: asked of the service) answers FINISHED with every item and the
    takeover; the finished item is not fetched again. The request named its deployment file: the job's
    generation is recorded as it ends, with every item (the dead owner's too) and the first caller."""
    from ion.services.deploy.generations import DeploymentFile

    url, server = make_repo("http")
    container, client = await _deploy_container(container_factory, tmp_path, takeover_interval=0.2)
    events = await scenario_support.event_sink(container)
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(tmp_path / "dest")))
    dead = {"container": "gone", "host": "test-host", "pid": _dead_pid(), "process": "gone.5"}
    job = "gone.5/abc123"
    file = DeploymentFile.of(tmp_path / "d.json", "test-host")
    await JobStore(tmp_path / "cache" / "jobs").save(
        job, _resumable_record(job, dead, spec, [0], container.clock.seconds(), file=file))
    taken = await events.wait(lambda e: e.get("job") == job and e.get("phase") == "takeover")
    assert taken["from"] == dead and taken["remaining"] == 2
    await events.wait(item_done(job, "linux/zlib/1.2"))
    await events.wait(item_done(job, "linux/tool/3.0"))
    # All or nothing: the job ends once its items' switches are committed (in the pool).
    await within(observe(deploy_service(container).jobs.jobs[job].deferred))
    status = await within(client.job_status(job))
    assert (status["status"], status["state"]) == (JobStatus.FINISHED, "FINISHED")
    assert {r["item"]: r["state"] for r in status["results"].values()} == {
        "linux/notes/1.0": "downloaded", "linux/zlib/1.2": "downloaded", "linux/tool/3.0": "downloaded"}
    [takeover] = status["takeovers"]
    assert takeover["from"] == dead and takeover["by"]["process"] == deploy_service(container).id
    assert (server.gets(f"deps/{PLAIN}"), server.gets(f"deps/{TGZ}"), server.gets(f"deps/{ZIP}")) == (0, 1, 1)
    assert (tmp_path / "dest/tool/tool/README").exists()
    await within(deploy_service(container).jobs.flush())
    record = json.loads((tmp_path / "cache" / "jobs" / JobStore(tmp_path).path(job).name).read_text())
    assert record["state"] == "FINISHED" and record["owner"]["process"] == deploy_service(container).id
    # The generation is recorded as the job ends, as work the service tracks, not part of the job (its
    # status is final with its last item): wait for that work (found by a CI run on a loaded machine).
    await within(defer.DeferredList([observe(d) for d in deploy_service(container).in_flight], consumeErrors=True))
    history = await within(deploy_service(container).generations.history(file))
    [generation] = history.generations
    assert [i["name"] for i in generation.items] == ["notes", "zlib", "tool"]
    assert generation.caller == "alice" and generation.file_sha256 == spec.file_sha256


@pytest_twisted.ensureDeferred
async def test_a_taken_over_job_outside_the_new_owners_roots_ends_remote_error(container_factory: Any,
                                                                               make_repo: Any,
                                                                               tmp_path: Path) -> None:
    """The instance taking a job over checks its items against its own allowed roots: a destination it may
    not write ends the job REMOTE_ERROR with the 403's reason, nothing written."""
    url, server = make_repo("http")
    container, client = await _deploy_container(container_factory, tmp_path, takeover_interval=0.2,
                                                allowed_destinations=[str(tmp_path / "elsewhere")])
    (tmp_path / "elsewhere").mkdir()
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(tmp_path / "dest")[:2]))
    dead = {"container": "gone", "host": "test-host", "pid": _dead_pid(), "process": "gone.5"}
    job = "gone.5/def456"
    await JobStore(tmp_path / "cache" / "jobs").save(
        job, _resumable_record(job, dead, spec, [0], container.clock.seconds()))
    status = await job_ended(client, job)
    assert status["state"] == "REMOTE_ERROR" and "outside the allowed roots" in status["error"]
    assert status["takeovers"][0]["from"] == dead and not (tmp_path / "dest" / "zlib").exists()
    assert server.gets(f"deps/{TGZ}") == 0


def _pause(seconds: float) -> defer.Deferred[None]:
    """Wait ``seconds`` on the reactor (between two polls of a job's status; no assertion depends on it)."""
    from twisted.internet import reactor

    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_fetch_cut_off_by_a_lost_connection_is_asked_again_once_reconnected(
        container_factory: Any, make_repo: Any, tmp_path: Path) -> None:
    """A deploy whose item's fetch is in flight when the container loses its connection to the broker
    (a cluster node died) does not fail that item: the call fails at once (503, connection lost), the
    Deploy service waits for the connection to come back and asks again; the first request's download
    finishes meanwhile, so the second finds the entry cached (one GET in all)."""
    url, server = make_repo("http")
    gate = server.hold(f"deps/{TGZ}")
    container, client = await _deploy_container(container_factory, tmp_path)
    job = await deploy_held(client, url, server, tmp_path, tmp_path / "dest")
    service = deploy_service(container)
    waiting: defer.Deferred[None] = defer.Deferred()
    reconnected = service._reconnected

    def noted(timeout: float) -> Any:  # the service's wait for the connection, noted as it begins
        if not waiting.called:
            waiting.callback(None)
        return reconnected(timeout)

    service._reconnected = noted
    manager = container.exchange_manager
    manager._connection_changed("lost", "node c1 died")  # (what the transport reports: calls in flight fail)
    await within(waiting)  # the cut-off fetch waits for the connection (rather than failing its item)
    manager._connection_changed("restored", None)
    gate.callback(None)
    # (the loss also cut off the first fetch's own calls to the Cache service: the release of the entry
    # lock it held is sent again once reconnected, or the lock ends with its lease: a generous wait)
    status = await job_ended(client, job, polls=3000)
    assert status["state"] == "FINISHED", status
    states = {r["item"]: r["state"] for r in status["results"].values()}
    # (the held download's item asked again finds its entry cached; the other's call may have been cut
    # off too, after its download)
    assert states["linux/zlib/1.2"] == "cached" and states["linux/notes/1.0"] in ("downloaded", "cached"), status
    assert server.gets(f"deps/{TGZ}") == 1


@pytest_twisted.ensureDeferred
async def test_a_fetch_nobody_takes_just_after_a_reconnect_is_asked_again_until_settled(
        container_factory: Any, make_repo: Any, tmp_path: Path) -> None:
    """After a broker restart every container declares its queues again after its own backoff: a
    fetch the Deploy service sends before the Fetch service is back finds no queue (404). Until the
    Deploy service's own connection has settled it asks again (the item deploys once the Fetch service
    is back); once settled, a 404 fails the item at once, naming the missing service."""
    from ion.services.fetch.service import FetchService

    url, _ = make_repo("file")
    container, client = await _deploy_container(container_factory, tmp_path)
    service = deploy_service(container)
    fetchers = [p for p in container.proc_manager.processes.values() if isinstance(p, FetchService)]
    assert len(fetchers) == 1
    queue = fetchers[0].service_queue
    await container.proc_manager.terminate_process(fetchers[0].id)
    await container.transport.delete_queue(queue)  # (as a broker restart drops it)
    manager = container.exchange_manager
    manager._connection_changed("lost", "the broker restarted")
    manager._connection_changed("restored", None)  # just now: peers may still be restoring
    retried: defer.Deferred[None] = defer.Deferred()
    restoring = service._restoring_peers

    def noted() -> bool:  # the service's look at its connection after a 404, noted as it is taken
        if not retried.called:
            retried.callback(None)
        return restoring()

    service._restoring_peers = noted
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(tmp_path / "dest")[:1]))
    deploying = defer.ensureDeferred(client.deploy(spec))
    await within(retried)  # the first fetch found no queue, and the service will ask again
    assert not deploying.called
    await container.spawn(FetchService)  # the Fetch service is back (its queue declared again)
    result = await within(deploying)
    assert [r["state"] for r in result["items"]] == ["downloaded"], result
    # Settled (long after the reconnection): a fetch nobody takes fails its item at once.
    others = [p for p in container.proc_manager.processes.values() if isinstance(p, FetchService)]
    await container.proc_manager.terminate_process(others[0].id)
    await container.transport.delete_queue(queue)
    manager.connected_since = container.clock.seconds() - 3600
    spec = load_deployment(write_deployment(tmp_path / "d2.json", url, three_items(tmp_path / "dest" / "2")[:1]))
    result = await within(client.deploy(spec))
    [failed] = result["items"]
    assert failed["state"] == "failed" and f"no process or service is bound to '{queue}'" in failed["reason"], failed


@pytest_twisted.ensureDeferred
async def test_no_owner_counts_as_gone_until_our_own_connection_has_settled(container_factory: Any,
                                                                           tmp_path: Path) -> None:
    """After a broker restart every container reconnects, each after its own backoff: the first one
    back sees the others' process queues unconsumed. Until its own connection has been up
    takeover_settle seconds, an owner the broker shows no consumer for is not judged gone (its job is
    not taken, so never run twice); a dead pid on this host is told at once all the same."""
    container, _client = await _deploy_container(container_factory, tmp_path, takeover_settle=30.0)
    service = deploy_service(container)
    manager = container.exchange_manager
    elsewhere = {"container": "elsewhere", "host": "other-host", "pid": 1, "process": "elsewhere.5"}
    dead_here = {"container": "gone", "host": "test-host", "pid": _dead_pid(), "process": "gone.5"}
    now = container.clock.seconds()
    manager.connected_since = now  # just reconnected
    assert await service._owner_is_alive(elsewhere) is True
    assert await service._owner_is_alive(dead_here) is False
    manager.connected_since = None  # the connection is down: nothing the broker says counts
    assert await service._owner_is_alive(elsewhere) is True
    manager.connected_since = now - 31.0  # up longer than takeover_settle
    assert await service._owner_is_alive(elsewhere) is False


@pytest_twisted.ensureDeferred
async def test_the_takeover_grace_is_the_interval_unless_configured(container_factory: Any, tmp_path: Path) -> None:
    """An owner must stay judged gone takeover_grace seconds before its jobs are claimed: by default one
    takeover_interval; configured longer where a live owner's reconnection to another node is slow."""
    default, _ = await _deploy_container(container_factory, tmp_path, takeover_interval=0.5)
    assert deploy_service(default).jobs.takeover_grace == 0.5
    longer, _ = await _deploy_container(container_factory, tmp_path, takeover_interval=0.5, takeover_grace=8)
    assert deploy_service(longer).jobs.takeover_grace == 8.0


async def _job_held_mid_way(client: Any, victim: Any, spec: Any, server: Any, events: Any) -> str:
    """Start ``spec`` as an async job on the Deploy instance ``victim``; fires with its id once its
    first item is done, its second download held and its record written."""
    started, _ = await within(client.proc.rpc_send(victim.id, "deploy_async", client.request_content(spec)))
    job: str = started.job
    await within(server.wait_held(f"deps/{TGZ}"))
    await events.wait(item_done(job, "linux/notes/1.0"))
    await within(victim.jobs.flush())
    return job


async def _stop_abruptly(victim: Any) -> None:
    """What a killed container does to its Deploy instance: its job record stays PARTIAL (nothing more
    written), its fetch goes (lock released), its queues lose their consumers."""
    victim.jobs.store = None
    victim.jobs.resume = None
    victim.jobs.cancel_all()
    for receiver in victim.receivers:
        await within(receiver.deactivate())


@pytest_twisted.ensureDeferred
async def test_two_instances_on_one_broker_the_survivor_takes_the_job_over(container_factory: Any, make_repo: Any,
                                                                           tmp_path: Path) -> None:
    """Two containers of one system on the embedded broker, one cache: the Deploy instance running a job
    stops abruptly mid-download (its queues lose their consumers, as a dead container's connection does;
    it writes nothing more). The other sees at the broker that nobody consumes its process queue, takes
    the job over and finishes it; job_status shows FINISHED with both items and the takeover."""
    url, server = make_repo("http")
    gate = server.hold(f"deps/{TGZ}")
    first, client = await _deploy_container(container_factory, tmp_path, takeover_interval=0.2)
    second = await container_factory(sysname=first.sysname, config=system_config(tmp_path, takeover_interval=0.2))
    await second.app_manager.start_app("deploy")
    events = await scenario_support.event_sink(first)
    victim, heir = deploy_service(first), deploy_service(second)
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(tmp_path / "dest")[:2]))
    job = await _job_held_mid_way(client, victim, spec, server, events)
    await _stop_abruptly(victim)
    taken = await events.wait(lambda e: e.get("job") == job and e.get("phase") == "takeover")
    assert taken["by"]["process"] == heir.id and taken["remaining"] == 1
    gate.callback(None)
    await events.wait(lambda e: item_done(job, "linux/zlib/1.2")(e) and e.get("state") != "cancelled")
    status = await job_ended(client, job)
    assert status["state"] == "FINISHED", status
    assert {r["item"]: r["state"] for r in status["results"].values()} == {
        "linux/notes/1.0": "downloaded", "linux/zlib/1.2": "downloaded"}
    assert [(t["from"]["process"], t["by"]["process"]) for t in status["takeovers"]] == [(victim.id, heir.id)]
    assert server.gets(f"deps/{PLAIN}") == 1 and (tmp_path / "dest/zlib/zlib/include/zlib.h").exists()


@pytest_twisted.ensureDeferred
async def test_a_taken_over_job_is_cancelled_at_its_new_owner(container_factory: Any, make_repo: Any,
                                                              tmp_path: Path) -> None:
    """Three containers of one system on the embedded broker, one cache: the instance running a job stops
    abruptly and another takes it over. Its id still names the dead instance: ``cancel_job`` sees nobody
    consumes that queue and asks the service; an instance that does not run the job answers with the owner
    its record names (asked directly here: the service queue may reach either), and the client sends the
    cancel there. The new owner cancels it: REMOTE_ERROR listing the item not finished, with the takeover."""
    url, server = make_repo("http")
    gate = server.hold(f"deps/{TGZ}")
    first, client = await _deploy_container(container_factory, tmp_path, takeover_interval=0.2)
    events = await scenario_support.event_sink(first)
    others = []
    for _ in range(2):
        other = await container_factory(sysname=first.sysname, config=system_config(tmp_path, takeover_interval=0.2))
        await other.app_manager.start_app("deploy")
        others.append(other)
    victim = deploy_service(first)
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(tmp_path / "dest")[:2]))
    job = await _job_held_mid_way(client, victim, spec, server, events)
    await _stop_abruptly(victim)
    taken = await events.wait(lambda e: e.get("job") == job and e.get("phase") == "takeover")
    heir = next(deploy_service(c) for c in others if deploy_service(c).id == taken["by"]["process"])
    bystander = next(deploy_service(c) for c in others if deploy_service(c) is not heir)
    for _ in range(200):  # the takeover event comes as the heir starts the rest; its record right after
        if job in heir.jobs.jobs:
            break
        await within(_pause(0.01))
    await within(heir.jobs.flush())
    # The instance that does not run it names the owner (authorized and audited as a cancel).
    answer, _ = await within(client.proc.rpc_send(bystander.id, "job_cancel", {"job": job}))
    assert answer == {"job": job, "cancelled": False, "owner": heir.id}
    assert await within(client.cancel_job(job)) == {"job": job, "cancelled": True}
    await within(observe(heir.jobs.jobs[job].deferred))
    await within(heir.jobs.flush())  # the service queue may reach the bystander: it reads the record
    status = await within(client.job_status(job))
    assert status["state"] == "REMOTE_ERROR" and status["error"].startswith("cancelled:"), status
    assert status["cancelled"] == [f"{spec.items[1].position} linux/zlib/1.2"]
    assert [(t["from"]["process"], t["by"]["process"]) for t in status["takeovers"]] == [(victim.id, heir.id)]
    # Once ended, a cancel (asked of whichever instance) is not done again.
    assert (await within(client.cancel_job(job)))["cancelled"] is False
    gate.callback(None)


@dataclass
class _TakenOver:
    """A job of notes and zlib whose zlib download is held, notes switched in (all or nothing), and
    whose record another instance ("elsewhere") has since taken over, unknown to its owner yet."""

    url: str
    gate: defer.Deferred[None]
    client: Any
    events: Any
    dest: Path
    job: str
    svc: Any
    store: JobStore
    taken: str
    work: defer.Deferred[Any]


async def _taken_over_while_running(container_factory: Any, make_repo: Any, tmp_path: Path) -> _TakenOver:
    url, server = make_repo("http")
    gate = server.hold(f"deps/{TGZ}")
    container, client = await _deploy_container(container_factory, tmp_path)
    events = await scenario_support.event_sink(container)
    dest = tmp_path / "dest"
    job = await deploy_held(client, url, server, tmp_path, dest)
    await events.wait(item_done(job, "linux/notes/1.0"))  # switched in, waiting for zlib (all or nothing)
    svc = deploy_service(container)
    await within(svc.jobs.flush())
    store = JobStore(tmp_path / "cache" / "jobs")
    record = json.loads(store.path(job).read_text())
    taker = {"container": "elsewhere", "host": "other-host", "pid": 1, "process": "elsewhere.1"}
    record.update(owner=taker, takeovers=[{"from": record["owner"], "by": taker, "at": 0.0}])
    await store.save(job, record)
    taken = store.path(job).read_text()
    work = svc.jobs.jobs[job].deferred
    return _TakenOver(url, gate, client, events, dest, job, svc, store, taken, work)


@pytest_twisted.ensureDeferred
async def test_a_job_taken_over_while_its_owner_ran_keeps_what_the_owner_switched_in(container_factory: Any,
                                                                                      make_repo: Any,
                                                                                      tmp_path: Path) -> None:
    """Another instance took the job over while this one still ran it (this one was judged gone: its broker
    connection lost, not its process): when this one's deployment is then cancelled (as its service's drain
    does), the item it switched in stays, committed (the new owner counts it as done and runs the rest),
    not switched back; the record stays the new owner's; nothing is left pending."""
    t = await _taken_over_while_running(container_factory, make_repo, tmp_path)
    url, gate, client, dest, job, svc, store, taken, work = (t.url, t.gate, t.client, t.dest, t.job, t.svc,
                                                             t.store, t.taken, t.work)
    assert svc.jobs.cancel(job)
    await within(observe(work))
    gate.callback(None)
    assert (dest / "notes" / "notes.txt").read_bytes() == CONTENT[PLAIN]
    assert store.path(job).read_text() == taken and svc.jobs.superseded(job) and job not in svc.jobs.jobs
    # Committed, not pending: deploying it again finds it in place.
    again = load_deployment(write_deployment(tmp_path / "again.json", url, [item("notes", "1.0", dest / "notes")]))
    summary = await within(client.deploy(again))
    assert [(r["state"], r["already"]) for r in summary["items"]] == [("cached", True)], summary


@pytest_twisted.ensureDeferred
async def test_an_owner_that_finds_its_job_taken_over_cancels_the_rest_and_goes_quiet(container_factory: Any,
                                                                                     make_repo: Any,
                                                                                     tmp_path: Path) -> None:
    """The owner's own takeover scan finds the new owner's record (no write of its own needed): it cancels
    the rest of its deployment on its own (the held item: the new owner runs it), keeps the item it switched
    in, publishes no more progress for the job and records no generation for it."""
    t = await _taken_over_while_running(container_factory, make_repo, tmp_path)
    url, gate, client, events, dest, job, svc, store, taken, work = (t.url, t.gate, t.client, t.events, t.dest,
                                                                     t.job, t.svc, t.store, t.taken, t.work)
    assert not work.called
    assert await within(svc.jobs.scan()) == []  # its own job: not taken over, found superseded
    assert svc.jobs.superseded(job) and job not in svc.jobs.jobs
    await within(observe(work))  # cancelled by the owner itself (nobody called cancel)
    gate.callback(None)
    assert (dest / "notes" / "notes.txt").read_bytes() == CONTENT[PLAIN]
    assert not (dest / "zlib").exists()
    assert store.path(job).read_text() == taken
    # A deployment after it: its events come after any the job's cancelled rest could have published.
    again = load_deployment(write_deployment(tmp_path / "again.json", url, [item("notes", "1.0", dest / "notes")]))
    summary = await within(client.deploy(again))
    assert [(r["state"], r["already"]) for r in summary["items"]] == [("cached", True)], summary
    await events.wait(item_done(None, "linux/notes/1.0"))
    zlib = [e for e in events.events if e.get("job") == job and e.get("item") == "linux/zlib/1.2"]
    # The Deploy service's own (with a position): only its start; no end (cancelled) from anyone.
    assert [e["phase"] for e in zlib if "position" in e] == ["fetch"], zlib
    assert not {e["phase"] for e in zlib} & {"cancelled", "failed", "done", "rolled back"}, zlib
    # One generation: the second deployment's (d.json, the job's file, has none).
    [generation] = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "generations").glob("*.json")]
    assert generation["file"] == str(tmp_path / "again.json"), generation
