"""The deployer's shell helpers (ion.services.deploy.shellhelpers), loaded through the shell's config hook."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer

from ion.core.shell import Listing, ShellHelpers, Text
from ion.services.deploy.shellhelpers import DeployJob

ROOT = Path(__file__).resolve().parents[3]


@pytest_twisted.async_fixture
async def shell(container_factory: Any, tmp_path: Path) -> Any:
    """A container running deploy.app on a temp cache, and the shell's namespace in it."""
    cache_root = tmp_path / "cache"
    container = await container_factory(config={
        # No scheduled reap round (the first would race the tests that show "no round yet").
        "ion.services.cache": {"root": str(cache_root), "host_id": "test-host", "reap_interval": None},
        "ion.services.unpack": {"allowed_roots": [str(cache_root)]},
        "ion.services.fetch": {"allowed_file_repositories": [str(tmp_path)], "retry_delay": 0.0,
                               "allowed_networks": ["127.0.0.0/8", "::1/128"]},
        "ion.services.deploy": {"allowed_destinations": [str(tmp_path)],
                                "allowed_file_repositories": [str(tmp_path)]},
    })
    await container.app_manager.start_app("deploy")
    helpers = await ShellHelpers.create(container)
    return helpers.namespace()


def sample(tmp_path: Path) -> str:
    """The sample deployment, against a copy of examples/repo, into tmp_path/deployed (absolute paths)."""
    shutil.copytree(ROOT / "examples/repo", tmp_path / "repo")
    items = [
        {"name": "hello-tools", "version": "1.0", "platform": "noarch", "destination": str(tmp_path / "d/tools")},
        {"name": "greetings", "version": "2.1", "platform": "noarch", "destination": str(tmp_path / "d/share"),
         "link": False},
        {"name": "motd", "version": "1.0", "platform": "noarch", "destination": str(tmp_path / "d/etc")},
    ]
    path = tmp_path / "deployment.json"
    path.write_text(json.dumps([{"url": "file:repo", "items": items}]))
    return str(path)


@pytest_twisted.ensureDeferred
async def test_helpers_come_from_config(shell: Any) -> None:
    """The shell offers the deploy helpers because ion.config names their module; info() lists them."""
    for name in ("deploy", "deploy_async", "jobs", "job_status", "cache_ls"):
        assert callable(shell[name])
    text = shell["info"]()
    assert "deploy(file" in text and "cache_ls()" in text


@pytest_twisted.ensureDeferred
async def test_deploy_prints_each_item(shell: Any, tmp_path: Path) -> None:
    """deploy(file) answers one row per item; a second call says every item is already deployed."""
    file = sample(tmp_path)
    rows = await shell["deploy"](file)
    assert isinstance(rows, Listing)
    assert [(r["item"], r["state"]) for r in rows] == [
        ("noarch/hello-tools", "downloaded"), ("noarch/greetings", "downloaded"), ("noarch/motd", "downloaded")]
    assert (tmp_path / "d/etc/motd.txt").is_symlink()
    again = await shell["deploy"](file)
    assert all(r["state"] == "cached" for r in again)
    # Linked items; the copied one (greetings) is re-copied once by the Deploy service: its entry
    # stamp is the float fetched_at, which differs between publish and a later lookup (reported).
    assert [r["note"] for r in again if r["item"] != "noarch/greetings"] == ["Already deployed"] * 2
    assert "Already deployed" in repr(again)
    entries = await shell["cache_ls"]()
    assert sorted(r["dependency"] for r in entries) == ["noarch/greetings", "noarch/hello-tools", "noarch/motd"]


@pytest_twisted.ensureDeferred
async def test_deploy_is_all_or_nothing_unless_partial(shell: Any, tmp_path: Path) -> None:
    """deploy(file) with a missing version: the others are switched back (``rolled back``, saying why);
    deploy(file, partial=True) keeps them placed."""
    file = Path(sample(tmp_path))
    data = json.loads(file.read_text())
    data[0]["items"][1]["version"] = "9.9"
    file.write_text(json.dumps(data))
    rows = await shell["deploy"](str(file))
    assert [r["state"] for r in rows] == ["rolled back", "failed", "rolled back"]
    assert "noarch/greetings/9.9" in rows[0]["note"] and not (tmp_path / "d/etc/motd.txt").exists()
    kept = await shell["deploy"](str(file), partial=True)
    assert [r["state"] for r in kept] == ["cached", "failed", "cached"]
    assert (tmp_path / "d/etc/motd.txt").is_symlink()


@pytest_twisted.ensureDeferred
async def test_deploy_async_and_job_status(shell: Any, tmp_path: Path) -> None:
    """deploy_async gives a job at once; job_status goes from RUNNING/PARTIAL to FINISHED; jobs() lists it."""
    container = shell["container"]
    job = shell["deploy_async"](sample(tmp_path))
    assert isinstance(job, DeployJob) and "starting" in repr(job)
    job_id = await job.wait()
    assert repr(job).startswith(f"deploy job {job_id}")
    first = await shell["job_status"](job)
    assert first.state in ("RUNNING", "PARTIAL")
    service = container.proc_manager.find("deploy")
    done: defer.Deferred[None] = defer.Deferred()
    service.jobs.jobs[job_id].deferred.addBoth(lambda result: (done.callback(None), result)[1])
    await done
    status = await shell["job_status"](job)
    assert status.state == "FINISHED"
    assert "3 of 3 items done" in status and "noarch/motd" in status
    listed = await shell["jobs"]()
    assert [(r["job"], r["state"], r["done"]) for r in listed] == [(job_id, "FINISHED", "3/3")]
    unknown = await shell["job_status"]("nope")
    assert unknown.state == "LOST_IN_SPACE"


@pytest_twisted.ensureDeferred
async def test_bad_file_lists_every_problem(shell: Any, tmp_path: Path) -> None:
    """deploy() of an unusable file shows every problem as an Error line, without calling the service."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"url": "file:repo", "items": [
        {"name": "a", "version": 2, "platform": "p", "destination": "/x", "link": "no"}]}]))
    text = shell["deploy"](str(path))
    assert isinstance(text, Text)
    lines = text.splitlines()
    assert len(lines) == 2 and all(line.startswith("Error: ") for line in lines)


@pytest_twisted.ensureDeferred
async def test_cache_verify_shows_last_report(shell: Any, tmp_path: Path) -> None:
    """cache_verify() shows the last periodic-verify round as a table; run=True runs one. A byte flipped in
    a deployed (linked) file is good→bad, quarantined and fetched again at once (the deployed link sees the
    good bytes before any deploy), and the round after that says bad→good."""
    assert callable(shell["cache_verify"])
    none = await shell["cache_verify"]()
    assert isinstance(none, Text) and none.report is None and "no verify round yet" in none
    file = sample(tmp_path)
    await shell["deploy"](file)
    first = await shell["cache_verify"](run=True)
    assert sorted((r["dependency"], r["outcome"]) for r in first.rows) == [
        ("noarch/greetings", "good"), ("noarch/hello-tools", "good"), ("noarch/motd", "good")]
    assert first.startswith("verify round (request): 3 entries: 3 good") and "outcome" in first
    cached = (tmp_path / "d/etc/motd.txt").resolve()
    data = bytearray(cached.read_bytes())
    data[0] ^= 0xFF
    cached.write_bytes(bytes(data))
    bad = await shell["cache_verify"](run=True)
    row = next(r for r in bad.rows if r["dependency"] == "noarch/motd")
    assert (row["outcome"], row["action"]) == ("good→bad", "refetched") and "motd.txt: sha256" in row["problem"]
    assert "good→bad" in repr(bad)
    assert (tmp_path / "d/etc/motd.txt").read_bytes() != bytes(data)
    again = await shell["deploy"](file)
    assert next(r["state"] for r in again if r["item"] == "noarch/motd") == "cached"
    healed = await shell["cache_verify"](run=True)
    assert next(r["outcome"] for r in healed.rows if r["dependency"] == "noarch/motd") == "bad→good"
    last = await shell["cache_verify"]()
    assert last.rows == healed.rows


@pytest_twisted.ensureDeferred
async def test_cache_reap_runs_and_shows_the_reapers_round(shell: Any, tmp_path: Path) -> None:
    """cache_reap(run=True) has the elected reaper run a round: with keep=0 the copied dependency goes,
    the linked ones stay (their destinations link into the cache); cache_reap() shows that round.
    (The deploy's generation, which would keep all three, is removed first.)"""
    import shutil

    from ion.services.cache.reaper import GENERATIONS_DIR, ReapPolicy

    assert "no reap round yet" in await shell["cache_reap"]()
    await shell["deploy"](sample(tmp_path))
    shutil.rmtree(tmp_path / "cache" / GENERATIONS_DIR)
    cache_service = shell["container"].proc_manager.find("cache")
    cache_service.reaper.policy = ReapPolicy(keep=0, min_idle=0)
    report = await shell["cache_reap"](run=True)
    assert [r["dependency"] for r in report.rows] == ["noarch/greetings"]
    assert report.startswith(f"reap round by {cache_service.id}") and "1 of 3 entries removed" in report
    assert "2 linked, 0 kept by generations" in report and "keep=0" in report
    assert (tmp_path / "d/etc/motd.txt").read_text() and (tmp_path / "d/share").is_dir()
    last = await shell["cache_reap"]()
    assert last.rows == report.rows


@pytest_twisted.ensureDeferred
async def test_next_deploy_catches_a_byte_flipped_through_a_link(shell: Any, tmp_path: Path) -> None:
    """A byte flipped in a deployed (linked) file, i.e. in the cache: the next deploy of that entry
    sees it (the file is newer than the entry, and its sha256 differs), fetches it again and heals it."""
    file = sample(tmp_path)
    await shell["deploy"](file)
    deployed = tmp_path / "d/etc/motd.txt"
    good = deployed.read_bytes()
    data = bytearray(good)
    data[0] ^= 0xFF
    deployed.resolve().write_bytes(bytes(data))
    again = await shell["deploy"](file)
    states = {r["item"]: r["state"] for r in again}
    assert states == {"noarch/hello-tools": "cached", "noarch/greetings": "cached", "noarch/motd": "downloaded"}
    assert deployed.read_bytes() == good


@pytest_twisted.ensureDeferred
async def test_job_cancel_says_when_the_job_is_not_running(shell: Any) -> None:
    """job_cancel(job) asks the instance that runs the job; one that ended (or never ran) is not cancelled."""
    deploy = shell["container"].proc_manager.find("deploy")
    assert await shell["job_cancel"](f"{deploy.id}/0123") == f"job {deploy.id}/0123: not running"
