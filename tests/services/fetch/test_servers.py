"""The shipped repository servers (ion.testing.servers): what the other fetch tests rely on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq

from ion.testing.servers import MotoServer, write_tree


def test_moto_server_listens_on_loopback_only() -> None:
    """A test S3 server refuses any address but loopback."""
    with pytest.raises(ValueError, match="loopback"):
        MotoServer(host="0.0.0.0")


def test_moto_env_points_boto3_at_the_server_only(s3_env: MotoServer) -> None:
    """The test env names the loopback endpoint, dummy credentials, no config files and no metadata service."""
    import os

    assert os.environ["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true" and os.environ["AWS_SHARED_CREDENTIALS_FILE"] == os.devnull
    assert s3_env.env(credentials=False)["AWS_ACCESS_KEY_ID"] is None
    bucket = s3_env.new_bucket()
    s3_env.put_tree(bucket, {"a/b.txt": b"x"}, prefix="p")
    assert [o["Key"] for o in s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]] == ["p/a/b.txt"]


def test_moto_server_keeps_connections_open_and_counts_them(s3_env: MotoServer) -> None:
    """S3 keeps a connection for the next request, and so does the test server (werkzeug's moto_server
    closes each): one client's GETs, listings, PUT and HEAD go over one connection, counted; a chunked
    request body is read whole before the next request on its connection."""
    import http.client

    client = s3_env.client()
    bucket = s3_env.new_bucket()
    client.put_object(Bucket=bucket, Key="k", Body=b"x" * 4096)
    before, requests = s3_env.connections, len(s3_env.requests)
    for _ in range(5):
        assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"x" * 4096
        assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["k"]
    client.put_object(Bucket=bucket, Key="a b/é", Body=b"y" * 10)
    assert client.head_object(Bucket=bucket, Key="a b/é")["ContentLength"] == 10
    assert s3_env.connections - before <= 1
    assert len(s3_env.requests) - requests == 12
    assert s3_env.count("GET", f"/{bucket}") == 10 and s3_env.count("HEAD", f"/{bucket}/") == 1

    raw = http.client.HTTPConnection(s3_env.host, s3_env.port)
    raw.request("PUT", f"/{bucket}/c", body=iter([b"zz", b"z" * 8]), encode_chunked=True)
    response = raw.getresponse()
    assert (response.status, response.read()) == (200, b"")
    raw.request("GET", f"/{bucket}/c")  # the same connection, past the chunked body (anonymous: 403)
    response = raw.getresponse()
    assert (response.status, response.read()) == (403, b"")
    raw.close()
    assert client.get_object(Bucket=bucket, Key="c")["Body"].read() == b"z" * 10


@pytest_twisted.ensureDeferred
async def test_http_repository_serves_counts_and_drops(http_repository: Any, tmp_path: Path) -> None:
    """The HTTP repository lists folders, counts requests, and cuts a file short when told to."""
    write_tree(tmp_path, {"dir/f.bin": b"0123456789"})
    server = http_repository(tmp_path)
    listing = await treq.text_content(await treq.get(f"{server.url}/dir/"))
    assert 'href="f.bin"' in listing
    assert await treq.content(await treq.get(f"{server.url}/dir/f.bin")) == b"0123456789"
    server.drops["dir/f.bin"] = 1
    with pytest.raises(Exception):  # noqa: B017 - ResponseFailed or PotentialDataLoss, by Twisted version
        await treq.content(await treq.get(f"{server.url}/dir/f.bin"))
    assert server.count("dir/f.bin", "GET") == 2 and server.dropped["dir/f.bin"] == 1
