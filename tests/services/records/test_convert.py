"""The deployer's records as ``ion.deployer`` protobuf messages: the same values as their dict forms."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ion.core.messaging.message import _protobuf_class
from ion.services.deploy.spec import item_from_dict
from ion.services.fetch.core import FetchRequest
from ion.services.records import convert
from ion.services.records.convert import pb

ROOT = Path(__file__).resolve().parents[3]
ITEM = {"url": "s3://bkt/deps", "platform": "linux", "name": "zlib", "version": "1.2", "destination": "/opt/z"}
RESULT: dict[str, Any] = {
    "state": "downloaded", "path": "/c/bkt.s3/linux/zlib/1.2", "files": ["a", "lib/b.so"], "links": {"l": "a"},
    "content": ["a", "l", "lib"],
    "key": {"repo_id": "bkt.s3", "platform": "linux", "name": "zlib", "version": "1.2", "unpack": True},
    "size": 1 << 40, "url": "s3://bkt/deps/linux/zlib/1.2/", "fetched_at": 1700000000.25, "stamp": "ab" * 32,
    "warnings": ["w"],
}


@pytest.mark.parametrize("extra", [{}, {"sha256": "AB" * 32, "unpack": False, "link": False},
                                   {"sha256": {"lib/b.so": "cd" * 32}, "keep_updated": True, "position": "r #1"}])
def test_an_item_round_trips(extra: dict[str, Any]) -> None:
    item = item_from_dict(dict(ITEM, **extra))
    msg = pb.Item.FromString(convert.item_to_pb(item).SerializeToString())
    assert item_from_dict(convert.item_to_wire(msg)) == item


@pytest.mark.parametrize("extra", [{}, {"sha256": "ab" * 32, "unpack": False},
                                   {"sha256": {"x": "cd" * 32}, "keep_updated": True, "position": "r #1"}])
def test_a_fetch_request_round_trips(extra: dict[str, Any]) -> None:
    request = FetchRequest.from_wire(dict(ITEM, **extra))
    msg = pb.FetchRequest.FromString(convert.request_to_pb(request, job="j1", item="i").SerializeToString())
    wire = convert.request_to_wire(msg)
    assert FetchRequest.from_wire(wire) == request and (wire["job"], wire["item"]) == ("j1", "i")


def test_unset_flags_take_the_dict_defaults() -> None:
    """proto3 would read an absent bool as false: the flags are ``optional``, so absent means the default."""
    wire = convert.request_to_wire(pb.FetchRequest(repository=pb.Repository(url="s3://b"), platform="l",
                                                   name="n", version="1"))
    assert "unpack" not in wire and "job" not in wire
    request = FetchRequest.from_wire(wire)
    assert request.unpack and not request.keep_updated and request.sha256 is None


def test_a_message_is_checked_as_a_dict_is() -> None:
    """A bad sha256 or component in a message is the same 400 as in a dict."""
    from ion.services.fetch.errors import InvalidRequestError

    msg = pb.FetchRequest(repository=pb.Repository(url="s3://b"), platform="l", name="n/x", version="1", digest="x")
    with pytest.raises(InvalidRequestError, match="'name' must be one path component.*'sha256' must be 64 hex"):
        FetchRequest.from_wire(convert.request_to_wire(msg))
    with pytest.raises(InvalidRequestError, match="lacks 'url'"):
        FetchRequest.from_wire(convert.request_to_wire(pb.FetchRequest(platform="l", name="n", version="1")))


@pytest.mark.parametrize("url", [RESULT["url"], None])
def test_a_fetch_result_round_trips(url: str | None) -> None:
    result = dict(RESULT, url=url)
    msg = pb.FetchResult.FromString(convert.result_to_pb(result).SerializeToString())
    assert convert.result_to_wire(msg) == result


def test_the_types_are_registered_under_their_full_names() -> None:
    for name in ("Repository", "Item", "FetchRequest", "FetchResult", "JobStatus", "EntryKey", "FileDigests",
                 "ItemResult", "DeployRequest", "DeploySummary", "JobStarted", "JobQuery", "JobOwner", "JobTakeover"):
        assert _protobuf_class(f"ion.deployer.{name}").DESCRIPTOR.full_name == f"ion.deployer.{name}"


def test_the_generated_module_is_current(tmp_path: Path) -> None:
    """``bin/gen-protos`` run now writes what is committed (skipped without grpcio-tools)."""
    pytest.importorskip("grpc_tools")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={out}", f"--pyi_out={out}",
                    "ion/services/records/deployer.proto"], cwd=ROOT, check=True, env=dict(os.environ))
    for name in ("deployer_pb2.py", "deployer_pb2.pyi"):
        assert (out / "ion/services/records" / name).read_text() == (ROOT / "ion/services/records" / name).read_text()


def test_the_job_states_are_funcs_codes() -> None:
    """``ion.deployer.JobState`` numbers the states as ``ion.core.jobs.JobStatus`` (Func's codes) does."""
    from ion.core.jobs import JobStatus

    assert {s.name: int(s) for s in JobStatus} == dict(pb.JobState.items())


ITEM_RESULT: dict[str, Any] = {
    "item": "linux/zlib/1.2", "position": "repository #1, item #1", "state": "downloaded", "already": False,
    "reason": None, "destination": "/opt/z", "entry": "/c/bkt.s3/linux/zlib/1.2", "names": ["zlib"], "link": True,
}
FAILED = dict(ITEM_RESULT, item="linux/tool/3.0", state="failed", reason="no such version", entry=None, names=[])


def test_a_deploy_request_round_trips() -> None:
    """The items of a DeployRequest read back as the dicts ``DeploymentItem.to_dict`` sends."""
    items = [item_from_dict(dict(ITEM, sha256="ab" * 32)), item_from_dict(dict(ITEM, name="tool", link=False))]
    msg = pb.DeployRequest.FromString(convert.deploy_request_to_pb("d.json", items).SerializeToString())
    wire = convert.deploy_request_to_wire(msg)
    assert wire["source"] == "d.json" and [item_from_dict(i) for i in wire["items"]] == items
    assert wire["partial"] is False


def test_a_partial_deploy_request_round_trips() -> None:
    """``partial`` (keep each item placed whatever the others do) survives the wire; absent, it is all or nothing."""
    items = [item_from_dict(ITEM)]
    msg = pb.DeployRequest.FromString(convert.deploy_request_to_pb("d.json", items, partial=True).SerializeToString())
    assert convert.deploy_request_to_wire(msg)["partial"] is True
    assert pb.DeployRequest.FromString(pb.DeployRequest(source="d.json").SerializeToString()).partial is False


def test_a_deploy_summary_round_trips() -> None:
    summary = {"source": "d.json", "ok": False, "items": [ITEM_RESULT, FAILED]}
    msg = pb.DeploySummary.FromString(convert.summary_to_pb(summary).SerializeToString())
    assert convert.summary_to_wire(msg) == summary


def test_a_job_status_round_trips() -> None:
    """A job in memory (``Job.to_wire``) reads back key for key, results typed."""
    from ion.core.jobs import Job, JobStatus

    job = Job("deploy.1/ab", "deploy", 1700000000.5, total=2, results={"#1 linux/zlib/1.2": ITEM_RESULT})
    wire = job.to_wire()
    msg = pb.JobStatus.FromString(convert.job_status_to_pb(wire).SerializeToString())
    assert msg.results["#1 linux/zlib/1.2"].entry == ITEM_RESULT["entry"] and msg.status == JobStatus.PARTIAL
    assert convert.job_status_to_wire(msg) == wire


def test_an_unknown_and_a_dead_owners_job_status_round_trip() -> None:
    """LOST_IN_SPACE has no kind nor creation time; a durable record of a dead owner says so and who it was."""
    from twisted.internet.task import Clock

    from ion.core.jobs import JobTable

    unknown = JobTable(Clock()).status("nope")
    back = convert.job_status_to_wire(pb.JobStatus.FromString(convert.job_status_to_pb(unknown).SerializeToString()))
    assert back == dict(unknown, kind=None, total=None, created=None, ended=None, cancelled=[])
    owner = {"container": "c1", "host": "h", "pid": 42, "process": "deploy.1"}
    record = dict(unknown, kind="deploy", created=1.0, total=3, results={"#2": FAILED}, owner=owner, died=True,
                  from_record=True, ended=None, cancelled=[])
    back = convert.job_status_to_wire(pb.JobStatus.FromString(convert.job_status_to_pb(record).SerializeToString()))
    assert back == record


def test_a_taken_over_jobs_status_round_trips() -> None:
    """A job taken over from a dead owner lists each takeover (from, by, at) in ``ion.deployer.JobStatus``;
    one never taken over has none (and no ``takeovers`` key)."""
    from ion.core.jobs import Job

    first = {"container": "c1", "host": "h1", "pid": 41, "process": "c1.3"}
    second = {"container": "c2", "host": "h2", "pid": 42, "process": "c2.3"}
    job = Job("c1.3/ab", "deploy", 1700000000.5, total=2, results={"#1 linux/zlib/1.2": ITEM_RESULT},
              takeovers=[{"from": first, "by": second, "at": 1700000010.25}])
    wire = dict(job.to_wire(), owner=second)
    msg = pb.JobStatus.FromString(convert.job_status_to_pb(wire).SerializeToString())
    assert len(msg.takeovers) == 1 and msg.takeovers[0].from_owner.pid == 41 and msg.takeovers[0].by_owner.host == "h2"
    assert convert.job_status_to_wire(msg) == wire
    plain = Job("c1.3/cd", "deploy", 1.0).to_wire()
    assert "takeovers" not in plain and "takeovers" not in convert.job_status_to_wire(convert.job_status_to_pb(plain))
