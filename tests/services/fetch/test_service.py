"""The Fetch service over messages: fetch op, error codes, progress events, FetchClient."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from ion.core.exceptions import ReceivedApplicationError
from ion.core.process import Process, Receiver
from ion.services.fetch.core import FetchRequest
from ion.services.fetch.errors import (
    AccessDeniedError,
    ChecksumMismatchError,
    InvalidRequestError,
    NotFoundError,
)
from ion.services.fetch.service import FetchClient
from ion.testing import client_process

from .conftest import CONTENT


class EventSink(Process):
    """Collects the ``deploy.progress`` events of the system."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[dict[str, Any]] = []

    def receivers_to_create(self) -> list[Receiver]:
        return super().receivers_to_create() + [
            Receiver(self, f"{self.sysname}.sink.{self.id}", self._event, exchange=self.container.events_exchange,
                     bindings=["deploy.progress"])]

    def _event(self, msg: dict[str, Any], receiver: Receiver) -> None:
        self.events.append(msg["content"])


@pytest_twisted.async_fixture
async def system(container_factory: Any, tmp_path: Path) -> Any:
    """A container running fetch.app (with cache and unpack) on a temp cache; file: repos allowed under tmp."""
    cache_root = tmp_path / "cache"
    container = await container_factory(config={
        "ion.services.cache": {"root": str(cache_root), "host_id": "test-host"},
        "ion.services.unpack": {"allowed_roots": [str(cache_root)]},
        # The HTTP repositories of the tests are on loopback: allowed here, not by default.
        "ion.services.fetch": {"allowed_file_repositories": [str(tmp_path)], "retry_delay": 0.0,
                               "progress_interval": 0.0, "allowed_networks": ["127.0.0.0/8", "::1/128"]},
    })
    await container.app_manager.start_app("fetch")
    proc = await client_process(container)
    return container, FetchClient(proc), cache_root


@pytest_twisted.ensureDeferred
async def test_fetch_over_rpc_then_cached(system: Any, make_repo: Any) -> None:
    """The fetch op downloads, unpacks and publishes an entry, then answers cached; progress goes out as events."""
    container, client, cache_root = system
    sink_pid = await container.spawn(EventSink, name="sink")
    sink = container.proc_manager.get(sink_pid)
    url, _ = make_repo("file")
    req = FetchRequest(url, "linux", "zlib", "1.1")
    first = await client.fetch(req, job="job-1", position="repository #1, item #1")
    assert first["state"] == "downloaded" and Path(first["path"]).is_relative_to(cache_root)
    assert first["content"] == ["docs", "zlib"] and "zlib/include/zlib.h" in first["files"]
    assert (Path(first["path"]) / "docs/README.txt").read_bytes() == CONTENT["linux/zlib/1.1/docs/README.txt"]
    second = await client.fetch(req)
    assert second["state"] == "cached" and second["path"] == first["path"]
    phases = [e["phase"] for e in sink.events if e.get("job") == "job-1"]
    assert phases[0] == "lookup" and "downloading" in phases and "unpacking" in phases and phases[-1] == "done"
    done = [e for e in sink.events if e.get("job") == "job-1" and e["phase"] == "done"]
    assert done[0]["state"] == "downloaded" and done[0]["item"] == "repository #1, item #1"
    assert done[0]["name"] == "zlib" and done[0]["version"] == "1.1"


@pytest_twisted.ensureDeferred
async def test_deployment_item_dict_is_accepted(system: Any, make_repo: Any, tmp_path: Path) -> None:
    """The wire form of a deployment item (DeploymentItem.to_dict) is a fetch request."""
    from ion.services.deploy.spec import DeploymentItem

    _container, client, _root = system
    url, _ = make_repo("file")
    item = DeploymentItem(url, "multi", "2.0", "linux", tmp_path / "dest", unpack=False)
    result = await client.fetch(item.to_dict())
    assert result["files"] == ["a.bin", "b.bin", "c.bin"] and result["path"].endswith("2.0~packed")


@pytest_twisted.ensureDeferred
async def test_missing_version_is_a_404_naming_the_url(system: Any, make_repo: Any) -> None:
    """A version folder that is not there answers 404; the client raises NotFoundError naming the URL."""
    _container, client, _root = system
    url, _ = make_repo("http")
    with pytest.raises(NotFoundError) as info:
        await client.fetch(FetchRequest(url, "linux", "zlib", "1.2"))
    assert info.value.code == 404 and f"no files under {url.url}/linux/zlib/1.2/" in str(info.value)


@pytest_twisted.ensureDeferred
async def test_checksum_mismatch_is_a_422(system: Any, make_repo: Any) -> None:
    """A wrong sha256 answers 422; the client's ChecksumMismatchError names the file and both digests."""
    _container, client, cache_root = system
    url, _ = make_repo("file")
    with pytest.raises(ChecksumMismatchError) as info:
        await client.fetch(FetchRequest(url, "linux", "multi", "2.0", sha256={"a.bin": "0" * 64}))
    assert info.value.code == 422 and info.value.file == "a.bin" and info.value.expected == "sha256:" + "0" * 64
    assert not list(cache_root.glob("*/linux/multi/2.0"))


@pytest_twisted.ensureDeferred
async def test_access_denied_is_a_403(system: Any, make_repo: Any) -> None:
    """An S3 object a bucket policy denies answers 403 (AccessDeniedError)."""
    _container, client, _root = system
    url, moto = make_repo("s3")
    moto.client().put_bucket_policy(Bucket=url.location, Policy=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
                                                "Resource": f"arn:aws:s3:::{url.location}/*"}]}))
    with pytest.raises(AccessDeniedError) as info:
        await client.fetch(FetchRequest(url, "linux", "zlib", "1.10"))
    assert info.value.code == 403 and url.location in str(info.value)


@pytest_twisted.ensureDeferred
async def test_file_repository_outside_the_allowed_roots_is_a_403(system: Any, tmp_path_factory: Any) -> None:
    """A file: repository outside allowed_file_repositories is refused with 403, before any read."""
    _container, client, _root = system
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with pytest.raises(InvalidRequestError) as info:
        await client.fetch({"url": f"file://{elsewhere}", "platform": "linux", "name": "z", "version": "1"})
    assert info.value.code == 403 and "outside" in str(info.value)


@pytest_twisted.ensureDeferred
async def test_malformed_request_is_a_400(system: Any) -> None:
    """A request without its keys answers 400 naming them."""
    _container, client, _root = system
    with pytest.raises(InvalidRequestError, match="lacks 'platform'") as info:
        await client.fetch({"url": "s3://bucket"})
    assert info.value.code == 400
    with pytest.raises(ReceivedApplicationError):
        await client.rpc_send("no_such_op", {})


@pytest_twisted.ensureDeferred
async def test_error_replies_carry_the_class_name_code_and_url(system: Any, make_repo: Any) -> None:
    """A Fetch error's reply is {error, message, url}; an archive the Unpack service refuses is passed
    on with that service's error name, code and message (no FetchError: a ReceivedApplicationError)."""
    _container, client, _root = system
    url, _ = make_repo("file", {"linux/bad/1.0/bad.tgz": b"not a tar at all"})
    with pytest.raises(NotFoundError) as missing:
        await client.fetch(FetchRequest(url, "linux", "zlib", "1.2"))
    reply = missing.value.__cause__
    assert isinstance(reply, ReceivedApplicationError) and reply.response_code == 404
    assert reply.content == {"error": "NotFoundError", "message": str(missing.value), "url": missing.value.url}
    with pytest.raises(ReceivedApplicationError) as info:
        await client.fetch(FetchRequest(url, "linux", "bad", "1.0"))
    err = info.value
    assert err.response_code == 422 and err.remote_error == "CorruptArchiveError"
    assert "bad.tgz" in err.message and set(err.content) == {"error", "message"}


@pytest_twisted.ensureDeferred
async def test_cancelling_a_fetch_call_cancels_the_download_at_the_service(system: Any, make_repo: Any) -> None:
    """FetchClient.fetch cancelled while the service downloads: the service cancels the download, so its
    lock is released and its staging folder removed at once (not when the download would have ended)."""
    from twisted.internet import reactor, task
    from twisted.internet.defer import CancelledError

    container, client, cache_root = system
    rel = "deps/linux/multi/2.0/b.bin"
    url, server = make_repo("http", stalls={rel: 10})
    service = next(p for p in container.proc_manager.processes.values() if p.proc_name == "fetch")
    d = client.fetch(FetchRequest(url, "linux", "multi", "2.0"))
    await server.wait_for(rel, "GET")
    assert list(cache_root.rglob("*.lock")) and service.in_flight
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    for _ in range(200):  # the cancel travels as a message: wait (bounded) for the service to act on it
        if not service.in_flight:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    assert not service.in_flight
    staging = cache_root / "staging"
    assert not list(cache_root.rglob("*.lock"))
    assert not staging.exists() or not list(staging.iterdir())
    assert server.count(rel, "GET") == 1


# -- the request as an ion.deployer.FetchRequest (encoding: protobuf) ----------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_protobuf_request_gets_what_a_dict_gets(system: Any, make_repo: Any) -> None:
    """``ion.deployer.FetchRequest`` content is answered with an ``ion.deployer.FetchResult`` holding what the
    dict request's answer holds; a plain dict is still answered with a dict."""
    from ion.services.records import convert

    _container, client, _root = system
    url, _ = make_repo("file")
    req = FetchRequest(url, "linux", "multi", "2.0", unpack=False, sha256={"a.bin": hashlib.sha256(
        CONTENT["linux/multi/2.0/a.bin"]).hexdigest()})
    first, first_headers = await client.rpc_send("fetch", req.to_wire())
    assert isinstance(first, dict) and first["state"] == "downloaded" and first_headers["encoding"] == "msgpack"
    as_dict, _ = await client.rpc_send("fetch", req.to_wire())
    as_pb, headers = await client.rpc_send("fetch", convert.request_to_pb(req))
    assert (headers["encoding"], headers["content-type"]) == ("protobuf", "ion.deployer.FetchResult")
    assert isinstance(as_pb, convert.pb.FetchResult) and convert.result_to_wire(as_pb) == as_dict
    assert as_dict["state"] == "cached"
    # FetchClient sends a record as protobuf and answers the dict, as for a dict
    assert await client.fetch(req) == as_dict == await client.fetch(req.to_wire())


@pytest_twisted.ensureDeferred
async def test_a_protobuf_request_is_checked_as_a_dict_is(system: Any, make_repo: Any) -> None:
    """A bad sha256 in an ``ion.deployer.FetchRequest`` is the 400 InvalidRequestError a dict gets."""
    from ion.services.records import convert

    _container, client, _root = system
    url, _ = make_repo("file")
    msg = convert.request_to_pb(FetchRequest(url, "linux", "multi", "2.0"))
    msg.digest = "abc"
    with pytest.raises(InvalidRequestError, match="'sha256' must be 64 hex digits, not 'abc'") as by_pb:
        await client.fetch(convert.request_to_wire(msg))
    with pytest.raises(InvalidRequestError) as raw:
        await client.rpc_send("fetch", msg)
    assert raw.value.code == by_pb.value.code == 400 and str(raw.value) == str(by_pb.value)


@pytest_twisted.ensureDeferred
async def test_malformed_protobuf_content_is_a_400_naming_the_type(system: Any) -> None:
    _container, client, _root = system
    with pytest.raises(ReceivedApplicationError) as info:
        await client.rpc_send("fetch", b"\xff\xff\xff\xff",
                              headers={"encoding": "protobuf", "content-type": "ion.deployer.FetchRequest"})
    assert info.value.headers["response-code"] == 400
    assert "ion.deployer.FetchRequest" in info.value.content["message"]
