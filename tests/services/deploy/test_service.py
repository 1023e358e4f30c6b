"""The Deploy service end to end: deploy.app (with fetch, cache, unpack) over RPC, on real repositories."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from ion.core.exceptions import ReceivedApplicationError
from ion.services.deploy.spec import load_deployment

from .scenario_support import (
    CONTENT,
    PLAIN,
    TGZ,
    ZIP,
    ZLIB_H,
    item,
    tree,
    within,
    write_deployment,
)

KINDS = ["file", "http", "s3"]


def three_items(dest: Path) -> list[dict[str, Any]]:
    """The tgz, the zip and the plain file, each linked into a folder of its own."""
    return [item("zlib", "1.2", dest / "zlib"), item("tool", "3.0", dest / "tool"),
            item("notes", "1.0", dest / "notes")]


# -- the service path -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_deploy_over_rpc_downloads_then_serves_from_cache(kind: str, deploy_system: Any, make_repo: Any,
                                                                tmp_path: Path, downloads: Counter[str]) -> None:
    """The same JSON against file:, http: and s3:: downloaded and linked, then cached and already deployed."""
    url, _ = make_repo(kind)
    dest = tmp_path / "dest"
    spec = load_deployment(write_deployment(tmp_path / "deployment.json", url, three_items(dest)))
    first = await deploy_system.deploy(spec)
    assert first["ok"] is True
    assert [(r["item"], r["state"], r["already"]) for r in first["items"]] == [
        ("linux/zlib/1.2", "downloaded", False), ("linux/tool/3.0", "downloaded", False),
        ("linux/notes/1.0", "downloaded", False)]
    assert (dest / "zlib/zlib/include/zlib.h").read_bytes() == ZLIB_H
    assert (dest / "zlib/zlib").is_symlink()
    assert tree(dest / "tool") == {"tool/README": b"tool 3.0\n", "tool/bin/tool": b"#!/bin/sh\necho tool\n"}
    assert tree(dest / "notes") == {"notes.txt": CONTENT[PLAIN]}
    second = await deploy_system.deploy(spec)
    assert [(r["state"], r["already"]) for r in second["items"]] == [("cached", True)] * 3
    assert downloads == Counter({"zlib-1.2.tgz": 1, "tool.zip": 1, "notes.txt": 1})


@pytest_twisted.ensureDeferred
async def test_one_missing_version_never_stops_the_others(deploy_system: Any, make_repo: Any,
                                                          tmp_path: Path) -> None:
    """A version folder that is not there fails that item only (``partial``), with a reason naming the URL
    tried; without ``partial`` (all or nothing) the others are switched back."""
    url, _ = make_repo("http")
    dest = tmp_path / "dest"
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, [
        item("zlib", "1.2", dest / "a"), item("zlib", "9.9", dest / "b"), item("notes", "1.0", dest / "c")]))
    whole = await deploy_system.deploy(spec)
    assert whole["ok"] is False
    assert [(r["item"], r["state"]) for r in whole["items"]] == [
        ("linux/zlib/1.2", "rolled back"), ("linux/zlib/9.9", "failed"), ("linux/notes/1.0", "rolled back")]
    assert "linux/zlib/9.9" in whole["items"][0]["reason"] and not (dest / "c/notes.txt").exists()
    result = await deploy_system.deploy(spec, partial=True)
    assert result["ok"] is False
    states = [(r["item"], r["state"]) for r in result["items"]]
    assert states == [("linux/zlib/1.2", "cached"), ("linux/zlib/9.9", "failed"),
                      ("linux/notes/1.0", "cached")]
    assert f"{url}/linux/zlib/9.9/" in result["items"][1]["reason"]
    assert not (dest / "b").exists()
    assert (dest / "c/notes.txt").read_bytes() == CONTENT[PLAIN]


# -- bad input by RPC ------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [None, [], {"items": "x"}, {"source": "d.json"}])
@pytest_twisted.ensureDeferred
async def test_a_request_that_is_not_items_is_a_400(content: Any, deploy_system: Any) -> None:
    """A deploy request that is not {'items': [...]} is refused with 400 saying what a request is."""
    with pytest.raises(ReceivedApplicationError) as info:
        await deploy_system.rpc_send("deploy", content)
    assert info.value.response_code == 400 and "'items'" in info.value.message


@pytest_twisted.ensureDeferred
async def test_a_relative_destination_is_a_400_naming_it(deploy_system: Any, make_repo: Any,
                                                         tmp_path: Path) -> None:
    """An item whose destination is relative is refused with 400 naming the item and the key; nothing runs."""
    url, _ = make_repo("file")
    bad = {"url": url, "name": "zlib", "version": "1.2", "platform": "linux", "destination": "dest/zlib"}
    with pytest.raises(ReceivedApplicationError) as info:
        await deploy_system.rpc_send("deploy", {"source": "d.json", "items": [bad]})
    assert info.value.response_code == 400
    assert "'destination' must be an absolute path" in info.value.message and "'dest/zlib'" in info.value.message
    assert "zlib" in info.value.message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob(".entry"))


@pytest_twisted.ensureDeferred
async def test_a_mistyped_flag_is_a_400_naming_the_key(deploy_system: Any, make_repo: Any, tmp_path: Path) -> None:
    """``"link": "false"`` in a request is a 400 naming the key, never silently truthy."""
    url, _ = make_repo("file")
    bad = {"url": url, "name": "zlib", "version": "1.2", "platform": "linux",
           "destination": str(tmp_path / "dest/zlib"), "link": "false"}
    with pytest.raises(ReceivedApplicationError) as info:
        await deploy_system.rpc_send("deploy", {"source": "d.json", "items": [bad]})
    assert info.value.response_code == 400 and "'link' must be true or false" in info.value.message
    assert not (tmp_path / "dest/zlib").exists()


# -- who may write where -----------------------------------------------------------------------------------
def _no_writes(tmp_path: Path, *paths: Path) -> None:
    for p in paths:
        assert not os.path.lexists(p), f"{p} was written"
    cache = tmp_path / "cache"
    assert not cache.exists() or not list(cache.rglob(".entry"))


@pytest_twisted.ensureDeferred
async def test_destination_outside_the_allowed_roots_is_a_403(deploy_system: Any, make_repo: Any,
                                                              tmp_path: Path) -> None:
    """A destination outside allowed_destinations is refused with 403 naming the root; nothing is written."""
    url, _ = make_repo("file")
    outside = tmp_path / "elsewhere" / "zlib"
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, [
        item("notes", "1.0", tmp_path / "dest" / "ok"), item("zlib", "1.2", outside)]))
    with pytest.raises(ReceivedApplicationError) as info:
        await deploy_system.deploy(spec)
    assert info.value.response_code == 403
    assert str(tmp_path / "dest") in info.value.message and str(outside) in info.value.message
    _no_writes(tmp_path, outside, tmp_path / "dest" / "ok")


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
@pytest_twisted.ensureDeferred
async def test_destination_escaping_through_dotdot_or_a_symlink_is_a_403(how: str, deploy_system: Any,
                                                                         make_repo: Any, tmp_path: Path) -> None:
    """A destination that leaves the allowed root by ``..`` or through a symlink is refused with 403."""
    url, _ = make_repo("file")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if how == "dotdot":
        dest = f"{tmp_path / 'dest'}/../elsewhere/zlib"
    else:
        (tmp_path / "dest" / "escape").symlink_to(outside)
        dest = str(tmp_path / "dest" / "escape" / "zlib")
    request = {"source": "d.json", "items": [
        {"url": url, "name": "zlib", "version": "1.2", "platform": "linux", "destination": dest}]}
    with pytest.raises(ReceivedApplicationError) as info:
        await deploy_system.rpc_send("deploy", request)
    assert info.value.response_code == 403 and str(tmp_path / "dest") in info.value.message
    assert list(outside.iterdir()) == []
    _no_writes(tmp_path)


@pytest.mark.parametrize("how", ["outside", "dotdot", "symlink"])
@pytest_twisted.ensureDeferred
async def test_file_repository_outside_the_allowed_roots_is_a_403(how: str, deploy_system: Any,
                                                                  tmp_path: Path) -> None:
    """A file: repository outside allowed_file_repositories (also by ``..`` or a symlink) is a 403; nothing read."""
    from ion.testing.servers import write_tree

    secret = write_tree(tmp_path / "secret", CONTENT)
    if how == "outside":
        url = f"file://{secret}"
    elif how == "dotdot":
        url = f"file://{tmp_path / 'repos'}/../secret"
    else:
        (tmp_path / "repos" / "link").symlink_to(secret)
        url = f"file://{tmp_path / 'repos' / 'link'}"
    dest = tmp_path / "dest" / "zlib"
    request = {"source": "d.json", "items": [
        {"url": url, "name": "zlib", "version": "1.2", "platform": "linux", "destination": str(dest)}]}
    with pytest.raises(ReceivedApplicationError) as info:
        await deploy_system.rpc_send("deploy", request)
    assert info.value.response_code == 403 and str(tmp_path / "repos") in info.value.message
    _no_writes(tmp_path, dest)


@pytest_twisted.ensureDeferred
async def test_an_empty_allowed_destinations_allows_nothing(container_factory: Any, make_repo: Any,
                                                            tmp_path: Path) -> None:
    """``allowed_destinations: []`` means no root at all (only None means the working folder): 403."""
    from ion.services.deploy.service import DeployClient
    from ion.testing import client_process

    from .scenario_support import system_config

    (tmp_path / "repos").mkdir()
    container = await container_factory(config=system_config(tmp_path, allowed_destinations=[]))
    await container.app_manager.start_app("deploy")
    client = DeployClient(await client_process(container))
    url, _ = make_repo("file")
    dest = Path(os.getcwd()) / f"ion-test-{tmp_path.name}"
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, [item("notes", "1.0", dest)]))
    with pytest.raises(ReceivedApplicationError) as info:
        await client.deploy(spec)
    assert info.value.response_code == 403 and "none configured" in info.value.message
    assert not dest.exists()


def test_entry_stamp_is_the_same_fresh_or_read_back_from_the_entry_file() -> None:
    """An entry as published and as read back from ``.entry`` give one stamp (a copy is not redone)."""
    import random

    from ion.services.cache.entry import EntryInfo, EntryKey, FileMeta

    key = EntryKey("r.file", "linux", "zlib", "1.2", True)
    rng = random.Random(5)
    for _ in range(200):
        fresh_at = rng.uniform(1.6e9, 2.1e9)
        files = {f"lib/f{n}": FileMeta(rng.randrange(10**6), None, f"{rng.getrandbits(256):064x}") for n in range(3)}
        fresh = EntryInfo(key=key, path=Path("/c/e"), files=files, fetched_at=fresh_at, last_used=fresh_at, url="u")
        back = EntryInfo.parse(fresh.render(), key, Path("/c/e"))
        assert fresh.content_digest() == back.content_digest()
    changed = dict(files, **{"lib/f0": FileMeta(1, None, "0" * 64)})
    assert EntryInfo(key=key, path=Path("/c/e"), files=changed).content_digest() != back.content_digest()


# -- async jobs ----------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_async_job_goes_running_partial_finished(deploy_system: Any, make_repo: Any, tmp_path: Path) -> None:
    """deploy_async answers a job id at once; job_status is RUNNING, then PARTIAL with finished items, then
    FINISHED (``partial``: each item ends as it is placed; all or nothing, the job ends after the commits)."""
    url, server = make_repo("http")
    gates = {rel: server.hold(f"deps/{rel}") for rel in (TGZ, ZIP, PLAIN)}
    dest = tmp_path / "dest"
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(dest)))
    job = await deploy_system.deploy_async(spec, partial=True)
    assert isinstance(job, str) and job
    for rel in gates:
        await within(server.wait_held(f"deps/{rel}"))
    status = await deploy_system.job_status(job)
    assert (status["status"], status["state"], status["results"]) == (0, "RUNNING", {})
    gates[PLAIN].callback(None)
    tgz_gate, zip_gate = gates[TGZ], gates[ZIP]
    events = deploy_system.events

    def item_done(label: str) -> Any:
        # The Deploy service's own event (it has a position); the Fetch service's "done" comes before placing.
        return lambda e: e.get("job") == job and e.get("item") == label and e.get("phase") == "done" and "position" in e

    await events.wait(item_done("linux/notes/1.0"))
    partial = await deploy_system.job_status(job)
    assert (partial["status"], partial["state"]) == (3, "PARTIAL")
    assert [(r["item"], r["state"]) for r in partial["results"].values()] == [("linux/notes/1.0", "downloaded")]
    tgz_gate.callback(None)
    await events.wait(item_done("linux/zlib/1.2"))
    partial = await deploy_system.job_status(job)
    assert partial["state"] == "PARTIAL" and len(partial["results"]) == 2
    assert (dest / "zlib/zlib/include/zlib.h").read_bytes() == ZLIB_H
    downloading = [e for e in events.events if e.get("job") == job and e.get("phase") == "downloading"
                   and e.get("item") == "linux/zlib/1.2"]
    assert downloading and downloading[-1]["bytes"] == len(CONTENT[TGZ])
    zip_gate.callback(None)
    await events.wait(item_done("linux/tool/3.0"))
    done = await deploy_system.job_status(job)
    assert done["state"] == "FINISHED" and done["status"] == 1 and len(done["results"]) == 3
    assert {r["state"] for r in done["results"].values()} == {"downloaded"}
    assert job in [j["job"] for j in await deploy_system.jobs()]


@pytest_twisted.ensureDeferred
async def test_a_long_sync_deploy_keeps_nothing_else_waiting(deploy_system: Any, make_repo: Any,
                                                             tmp_path: Path) -> None:
    """While a sync deploy waits on a download, job_status and another deploy are answered."""
    url, server = make_repo("http")
    gate = server.hold(f"deps/{TGZ}")
    dest = tmp_path / "dest"
    slow = deploy_system.deploy(load_deployment(write_deployment(tmp_path / "a.json", url, [
        item("zlib", "1.2", dest / "zlib")])))
    await within(server.wait_held(f"deps/{TGZ}"))
    status = await within(deploy_system.job_status("nothing"))
    assert status["state"] == "LOST_IN_SPACE"
    other = await within(deploy_system.deploy(load_deployment(write_deployment(tmp_path / "b.json", url, [
        item("notes", "1.0", dest / "notes")]))))
    assert other["ok"] and not slow.called
    gate.callback(None)
    first = await within(slow)
    assert first["ok"] and first["items"][0]["state"] == "downloaded"


# -- metrics -------------------------------------------------------------------------------------------------
def scrape(container: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    container.metrics.snapshot()
    text = generate_latest(container.metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest_twisted.ensureDeferred
async def test_a_deploy_is_counted_in_the_metrics(deploy_system: Any, make_repo: Any, tmp_path: Path) -> None:
    """Items by outcome, fetches by kind and outcome, bytes fetched, cache hits and misses, jobs by state."""
    url, _ = make_repo("http")
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(tmp_path / "dest")))
    assert (await deploy_system.deploy(spec))["ok"]
    found = scrape(deploy_system.container)
    assert found[("ion_deploy_items_total", (("state", "downloaded"),))] == 3
    assert found[("ion_fetch_results_total", (("kind", "http"), ("state", "downloaded")))] == 3
    assert found[("ion_fetch_bytes_total", (("kind", "http"),))] == sum(len(CONTENT[r]) for r in (TGZ, ZIP, PLAIN))
    assert found[("ion_cache_lookups_total", (("result", "miss"),))] == 3
    assert found[("ion_fetch_seconds_count", (("kind", "http"), ("state", "downloaded")))] == 3
    job = await deploy_system.deploy_async(spec)
    await deploy_system.events.wait(lambda e: e.get("job") == job and e.get("phase") == "done"
                                    and e.get("item") == "linux/notes/1.0" and "position" in e)
    found = scrape(deploy_system.container)
    assert found[("ion_cache_lookups_total", (("result", "hit"),))] >= 1
    assert sum(found[("ion_deploy_jobs", (("state", s),))] for s in ("RUNNING", "PARTIAL", "FINISHED")) == 1
    assert found[("ion_deploy_jobs", (("state", "REMOTE_ERROR"),))] == 0


@pytest_twisted.ensureDeferred
async def test_the_cache_is_seen_in_the_metrics_after_a_reap_and_a_verify(deploy_system: Any, make_repo: Any,
                                                                          tmp_path: Path) -> None:
    """The elected Cache instance gives entries and bytes after the last reap round, and entries by verify state."""
    from ion.services.cache.service import CacheClient

    url, _ = make_repo("file")
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(tmp_path / "dest")))
    assert (await deploy_system.deploy(spec))["ok"]
    cache = CacheClient(deploy_system.proc)
    report = await cache.reap(timeout=60)
    await cache.verify_round(timeout=60)
    found = scrape(deploy_system.container)
    assert found[("ion_cache_entries", ())] == report.entries == 3
    assert found[("ion_cache_bytes", ())] == report.bytes_before > 0
    assert found[("ion_cache_verify_entries", (("state", "good"),))] == 3
    assert found[("ion_cache_verify_entries", (("state", "bad"),))] == 0


# -- typed content (ion.deployer, encoding: protobuf) -------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_protobuf_requests_get_what_dict_requests_get(deploy_system: Any, make_repo: Any,
                                                            tmp_path: Path) -> None:
    """DeployClient sends an ``ion.deployer.DeployRequest`` and a ``JobQuery``; the service answers in kind, with
    what a plain-dict client gets (which still gets dicts)."""
    from ion.services.deploy.service import DeployClient
    from ion.services.records import convert

    url, _ = make_repo("file")
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, three_items(tmp_path / "dest")))
    request = DeployClient.request_content(spec)
    assert isinstance(request, convert.pb.DeployRequest) and len(request.items) == 3
    assert (await deploy_system.deploy(spec))["ok"]  # downloaded: the calls below all find it cached
    as_pb, headers = await deploy_system.rpc_send("deploy", request)
    assert (headers["encoding"], headers["content-type"]) == ("protobuf", "ion.deployer.DeploySummary")
    as_dict, headers = await deploy_system.rpc_send("deploy", {"source": spec.source,
                                                               "items": [i.to_dict() for i in spec.items]})
    assert headers["encoding"] == "msgpack" and isinstance(as_dict, dict)
    assert convert.summary_to_wire(as_pb) == as_dict and as_dict["ok"]
    assert [r["state"] for r in as_dict["items"]] == ["cached"] * 3

    started, headers = await deploy_system.rpc_send("deploy_async", request)
    assert headers["content-type"] == "ion.deployer.JobStarted" and started.total == 3
    job = started.job
    for label in ("linux/zlib/1.2", "linux/tool/3.0", "linux/notes/1.0"):
        await deploy_system.events.wait(lambda e, label=label: e.get("job") == job and e.get("item") == label
                                        and e.get("phase") == "done" and "position" in e)
    status = await deploy_system.job_status(job)
    assert status["state"] == "FINISHED" and {r["state"] for r in status["results"].values()} == {"cached"}
    typed, headers = await deploy_system.rpc_send("job_status", convert.pb.JobQuery(job=job))
    assert headers["content-type"] == "ion.deployer.JobStatus" and typed.status == convert.pb.FINISHED
    plain, _ = await deploy_system.rpc_send("job_status", {"job": job})
    assert convert.job_status_to_wire(typed) == status == plain


@pytest_twisted.ensureDeferred
async def test_a_protobuf_request_is_checked_as_a_dict_is(deploy_system: Any, tmp_path: Path) -> None:
    """A bad item in a DeployRequest is the 400 naming the problem that the same dict gets."""
    from ion.services.records import convert

    bad = convert.pb.DeployRequest(source="d.json", items=[convert.pb.Item(
        repository=convert.pb.Repository(url="s3://b"), name="../x", version="1", platform="linux",
        destination=str(tmp_path / "dest"), digest="abc")])
    with pytest.raises(ReceivedApplicationError) as by_pb:
        await deploy_system.rpc_send("deploy", bad)
    with pytest.raises(ReceivedApplicationError) as by_dict:
        await deploy_system.rpc_send("deploy", convert.deploy_request_to_wire(bad))
    assert by_pb.value.headers["response-code"] == by_dict.value.headers["response-code"] == 400
    assert by_pb.value.content["message"] == by_dict.value.content["message"]
    assert "must be 64 hex digits" in by_pb.value.content["message"]


@pytest_twisted.ensureDeferred
async def test_unknown_job_is_lost_in_space(deploy_system: Any) -> None:
    """job_status of an id the service never gave is LOST_IN_SPACE (2)."""
    status = await deploy_system.job_status("no-such-job")
    assert status["status"] == 2 and status["state"] == "LOST_IN_SPACE"


@pytest_twisted.ensureDeferred
async def test_job_status_reaches_the_instance_that_runs_the_job(container_factory, tmp_path):
    """With two Deploy instances on one queue, job_status always asks the one holding the job."""
    from twisted.internet import defer

    from ion.core.jobs import JobStatus
    from ion.services.deploy.service import DeployClient, DeployService
    from ion.testing import client_process

    first = await container_factory()
    second = await container_factory()
    a = first.proc_manager.get(await first.spawn(DeployService))
    await second.spawn(DeployService)
    job = "x"
    a.jobs.start("deploy", defer.succeed({}), job_id=f"{a.id}/{job}")
    client = DeployClient(await client_process(second))
    for _ in range(4):  # round-robin would hit the other instance half the time
        status = await client.job_status(f"{a.id}/{job}")
        assert status["status"] == JobStatus.FINISHED
