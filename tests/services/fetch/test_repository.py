"""Repositories: the same content listed and downloaded through file:, http: and s3:, and their failures."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task

from ion.services.deploy.spec import parse_repository_url
from ion.services.fetch.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    CertificateError,
    ChecksumMismatchError,
    FetchError,
    NotFoundError,
    RepositoryError,
    TransferError,
)
from ion.services.fetch.repository import (
    Checksum,
    FetchConfig,
    RemoteFile,
    Repository,
    S3Repository,
    _index_hrefs,
    _PoolWriter,
    _Retryable,
    _Sink,
    parse_index_links,
    repository_for,
)
from ion.testing.servers import write_tree

from .conftest import CONTENT, KINDS

FAST = FetchConfig(retry_delay=0.0)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def listed(repo: Repository, platform: str, name: str, version: str) -> dict[str, RemoteFile]:
    files = await repo.list_version(platform, name, version)
    return {f.path: f for f in files}


# -- the same content through every kind ---------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_listing_finds_every_file_with_sub_folders(kind: str, make_repo: Any, pool: Any) -> None:
    """A version folder lists every file, sub-folders kept, with its size."""
    url, _ = make_repo(kind)
    repo = repository_for(url, pool, config=FAST)
    try:
        files = await listed(repo, "linux", "zlib", "1.1")
    finally:
        await repo.close()
    assert sorted(files) == ["docs/README.txt", "docs/api/index.html", "zlib-1.1.tgz"]
    for rel, f in files.items():
        assert f.size == len(CONTENT[f"linux/zlib/1.1/{rel}"])
        assert f.marker


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_version_match_is_exact(kind: str, make_repo: Any, pool: Any) -> None:
    """Version 1.1 never picks up 1.10's files, nor 1.10 those of 1.1 (Umpire matched by prefix)."""
    url, _ = make_repo(kind)
    repo = repository_for(url, pool, config=FAST)
    try:
        one_one = await listed(repo, "linux", "zlib", "1.1")
        one_ten = await listed(repo, "linux", "zlib", "1.10")
        with pytest.raises(NotFoundError):
            await repo.list_version("linux", "zlib", "1")
    finally:
        await repo.close()
    assert "zlib-1.10.tgz" not in one_one
    assert sorted(one_ten) == ["zlib-1.10.tgz"]


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_every_file_of_a_multi_file_version_downloads(kind: str, make_repo: Any, pool: Any,
                                                           tmp_path: Path) -> None:
    """Each file of a multi-file version is downloaded and hashed (Umpire kept only the last)."""
    url, _ = make_repo(kind)
    repo = repository_for(url, pool, config=FAST)
    try:
        files = await repo.list_version("linux", "multi", "2.0")
        results = {f.path: await repo.download(f, tmp_path / "out" / f.path) for f in files}
    finally:
        await repo.close()
    assert sorted(results) == ["a.bin", "b.bin", "c.bin"]
    for rel, got in results.items():
        data = CONTENT[f"linux/multi/2.0/{rel}"]
        assert (tmp_path / "out" / rel).read_bytes() == data
        assert (got.size, got.sha256) == (len(data), sha(data))
        # md5 is computed only where the repository gives one to check (S3's single-part ETag).
        assert got.md5 == (hashlib.md5(data).hexdigest() if kind == "s3" else None)


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_download_streams_with_progress(kind: str, make_repo: Any, pool: Any, tmp_path: Path) -> None:
    """A multi-chunk file arrives whole, with progress rising to its size."""
    url, _ = make_repo(kind)
    repo = repository_for(url, pool, config=FetchConfig(retry_delay=0.0, chunk_size=256 * 1024))
    seen: list[tuple[int, int | None]] = []
    try:
        (f,) = await repo.list_version("linux", "big", "1.0")
        got = await repo.download(f, tmp_path / "big.bin", progress=lambda done, total: seen.append((done, total)))
    finally:
        await repo.close()
    data = CONTENT["linux/big/1.0/big.bin"]
    assert got.sha256 == sha(data) and (tmp_path / "big.bin").read_bytes() == data
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and dones[-1] == len(data) and len(dones) > 3
    assert seen[-1][1] == len(data)


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_missing_version_names_the_url_tried(kind: str, make_repo: Any, pool: Any) -> None:
    """A version folder that is not there fails with NotFoundError naming the URL tried."""
    url, _ = make_repo(kind)
    repo = repository_for(url, pool, config=FAST)
    try:
        with pytest.raises(NotFoundError) as info:
            await repo.list_version("linux", "zlib", "1.2")
    finally:
        await repo.close()
    where = repo.version_url("linux", "zlib", "1.2")
    assert where.endswith("deps/linux/zlib/1.2/")
    assert f"no files under {where}" in str(info.value)
    assert info.value.url is not None and "linux/zlib/1.2" in info.value.url


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_sidecar_gives_the_sha256_and_is_no_file(kind: str, make_repo: Any, pool: Any, tmp_path: Path) -> None:
    """A <file>.sha256 sidecar is folded into its file's checksum; a wrong one fails the download."""
    good, bad = b"good content\n", b"bad content\n"
    url, _ = make_repo(kind, {"linux/car/1.0/good.bin": good, "linux/car/1.0/good.bin.sha256": f"{sha(good)}  good.bin\n",
                              "linux/car/1.0/bad.bin": bad, "linux/car/1.0/bad.bin.sha256": "0" * 64 + "\n",
                              "linux/car/1.0/lonely.sha256": "not a sidecar of anything"})
    repo = repository_for(url, pool, config=FAST)
    try:
        files = await listed(repo, "linux", "car", "1.0")
        assert sorted(files) == ["bad.bin", "good.bin", "lonely.sha256"]
        assert Checksum("sha256", sha(good)) in files["good.bin"].checksums
        got = await repo.download(files["good.bin"], tmp_path / "good.bin")
        assert Checksum("sha256", sha(good)) in got.verified
        with pytest.raises(ChecksumMismatchError) as info:
            await repo.download(files["bad.bin"], tmp_path / "bad.bin")
    finally:
        await repo.close()
    assert info.value.file == "bad.bin" and info.value.expected == "sha256:" + "0" * 64
    assert info.value.got == "sha256:" + sha(bad)
    assert not (tmp_path / "bad.bin").exists()


# -- s3 -----------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_s3_etag_is_the_md5_checked(make_repo: Any, pool: Any, tmp_path: Path) -> None:
    """A single-part S3 object's ETag is its md5: listed, then checked against the bytes."""
    url, _ = make_repo("s3")
    repo = repository_for(url, pool, config=FAST)
    try:
        (f,) = await repo.list_version("linux", "zlib", "1.10")
        got = await repo.download(f, tmp_path / "z.tgz")
    finally:
        await repo.close()
    md5 = hashlib.md5(CONTENT["linux/zlib/1.10/zlib-1.10.tgz"]).hexdigest()
    assert f.checksums == (Checksum("md5", md5),) and got.verified == (Checksum("md5", md5),)
    assert f.marker == f"etag:{md5}"


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_sha256_is_skipped_only_where_an_md5_checks_the_file(kind: str, make_repo: Any, pool: Any,
                                                                   tmp_path: Path) -> None:
    """download(sha256=False) (an archive to extract) leaves out the sha256 where an md5 checks
    the bytes (S3 ETag, HTTP Content-MD5); without one, or with a .sha256 sidecar, it is computed."""
    data = CONTENT["linux/zlib/1.10/zlib-1.10.tgz"]
    url, server = make_repo(kind, {"linux/zlib/1.10/zlib-1.10.tgz": data,
                                   "linux/car/1.0/c.tgz": data, "linux/car/1.0/c.tgz.sha256": sha(data) + "\n"})
    if kind == "http":
        server.content_md5 = {"deps/linux/zlib/1.10/zlib-1.10.tgz": base64.b64encode(hashlib.md5(data).digest()).decode()}
    repo = repository_for(url, pool, config=FAST)
    try:
        (f,) = await repo.list_version("linux", "zlib", "1.10")
        lean = await repo.download(f, tmp_path / "lean.tgz", sha256=False)
        full = await repo.download(f, tmp_path / "full.tgz")
        (car,) = await repo.list_version("linux", "car", "1.0")
        checked = await repo.download(car, tmp_path / "car.tgz", sha256=False)
    finally:
        await repo.close()
    md5_checked = kind in ("s3", "http")
    assert (lean.sha256, lean.md5) == ((None, hashlib.md5(data).hexdigest()) if md5_checked else (sha(data), None))
    assert full.sha256 == sha(data) and (tmp_path / "lean.tgz").read_bytes() == data
    assert checked.sha256 == sha(data) and Checksum("sha256", sha(data)) in checked.verified


@pytest_twisted.ensureDeferred
async def test_s3_tampered_etag_fails_and_leaves_nothing(make_repo: Any, pool: Any, tmp_path: Path) -> None:
    """An object whose bytes do not match its ETag fails with ChecksumMismatchError; the file is removed."""
    url, _ = make_repo("s3")
    repo = repository_for(url, pool, config=FAST)
    assert isinstance(repo, S3Repository)
    try:
        (f,) = await repo.list_version("linux", "zlib", "1.10")
        signed, _unsigned = await pool.run(repo.clients.get)

        def tamper(parsed: dict[str, Any], **_: Any) -> None:
            parsed["ETag"] = '"' + "f" * 32 + '"'

        signed.meta.events.register("after-call.s3.GetObject", tamper)
        with pytest.raises(ChecksumMismatchError) as info:
            await repo.download(f, tmp_path / "z.tgz")
    finally:
        await repo.close()
    assert info.value.expected == "md5:" + "f" * 32
    assert "zlib-1.10.tgz" in str(info.value)
    assert not (tmp_path / "z.tgz").exists()


@pytest_twisted.ensureDeferred
async def test_s3_missing_bucket(s3_env: Any, pool: Any) -> None:
    """A bucket that does not exist fails with BucketNotFoundError naming it."""
    repo = repository_for(parse_repository_url("s3://no-such-bucket-ion/deps"), pool, config=FAST)
    with pytest.raises(BucketNotFoundError) as info:
        await repo.list_version("linux", "zlib", "1.1")
    assert "no-such-bucket-ion" in str(info.value)
    assert isinstance(info.value, NotFoundError)


@pytest_twisted.ensureDeferred
async def test_s3_bucket_policy_denying_is_access_denied(make_repo: Any, pool: Any, tmp_path: Path) -> None:
    """A bucket policy denying GetObject fails the download with AccessDeniedError naming the object."""
    url, moto = make_repo("s3")
    moto.client().put_bucket_policy(Bucket=url.location, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
                       "Resource": f"arn:aws:s3:::{url.location}/*"}]}))
    repo = repository_for(url, pool, config=FAST)
    (f,) = await repo.list_version("linux", "zlib", "1.10")
    with pytest.raises(AccessDeniedError) as info:
        await repo.download(f, tmp_path / "z.tgz")
    assert f"s3://{url.location}/deps/linux/zlib/1.10/zlib-1.10.tgz" in str(info.value)
    assert "with the credentials found, and anonymously" in str(info.value)
    assert not (tmp_path / "z.tgz").exists()


@pytest_twisted.ensureDeferred
async def test_s3_public_bucket_works_without_credentials(moto_server: Any, s3_env_anonymous: Any, pool: Any,
                                                         tmp_path: Path) -> None:
    """Without any credentials, a public bucket is listed and read anonymously."""
    bucket = moto_server.new_bucket()
    moto_server.put_tree(bucket, {"linux/pub/1.0/pub.txt": b"public\n"}, prefix="deps", acl="public-read")
    repo = repository_for(parse_repository_url(f"s3://{bucket}/deps"), pool, config=FAST)
    assert isinstance(repo, S3Repository)
    (f,) = await repo.list_version("linux", "pub", "1.0")
    got = await repo.download(f, tmp_path / "pub.txt")
    assert (tmp_path / "pub.txt").read_bytes() == b"public\n" and got.size == 7
    assert repo.clients.signed is None and repo.anonymous_calls == 2


@pytest_twisted.ensureDeferred
async def test_s3_private_object_without_credentials_is_denied(moto_server: Any, s3_env_anonymous: Any, pool: Any,
                                                              tmp_path: Path) -> None:
    """Without credentials, a private object fails with AccessDeniedError saying none were found."""
    bucket = moto_server.new_bucket()
    moto_server.put_tree(bucket, {"linux/priv/1.0/priv.txt": b"private\n"}, prefix="deps")
    repo = repository_for(parse_repository_url(f"s3://{bucket}/deps"), pool, config=FAST)
    (f,) = await repo.list_version("linux", "priv", "1.0")
    with pytest.raises(AccessDeniedError) as info:
        await repo.download(f, tmp_path / "priv.txt")
    assert "no AWS credentials found" in str(info.value) and f"s3://{bucket}/deps/linux/priv/1.0/priv.txt" in str(
        info.value)


@pytest_twisted.ensureDeferred
async def test_s3_refused_credentials_fall_back_to_anonymous(s3_env: Any, pool: Any) -> None:
    """Credentials refused as such (InvalidAccessKeyId) are retried anonymously, and not tried again."""
    from botocore.stub import Stubber

    repo = repository_for(parse_repository_url("s3://stubbed/deps"), pool, config=FAST)
    assert isinstance(repo, S3Repository)
    signed, unsigned = await pool.run(repo.clients.get)
    assert signed is not None
    listing = {"Contents": [{"Key": "deps/linux/z/1.0/z.txt", "Size": 3, "ETag": '"' + "a" * 32 + '"'}],
               "IsTruncated": False}
    with Stubber(signed) as s_signed, Stubber(unsigned) as s_unsigned:
        s_signed.add_client_error("list_objects_v2", service_error_code="InvalidAccessKeyId", http_status_code=403)
        s_unsigned.add_response("list_objects_v2", listing, {"Bucket": "stubbed", "Prefix": "deps/linux/z/1.0/"})
        s_unsigned.add_response("list_objects_v2", listing, {"Bucket": "stubbed", "Prefix": "deps/linux/z/1.0/"})
        first = await repo.list_version("linux", "z", "1.0")
        second = await repo.list_version("linux", "z", "1.0")  # straight to anonymous
        s_signed.assert_no_pending_responses()
        s_unsigned.assert_no_pending_responses()
    assert [f.path for f in first] == [f.path for f in second] == ["z.txt"]
    assert repo.clients.credentials_refused and repo.anonymous_calls == 2


def test_s3_without_boto3_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without boto3, an s3 repository fails with a hint on how to install it."""
    from ion.services.fetch import repository

    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(RepositoryError, match=r"pip install 'ioncore\[s3\]'"):
        repository._import_boto3()


_WITHOUT_BOTO3 = """
import sys

class NoBoto:  # as if the [s3] extra were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("boto3", "botocore", "s3transfer"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoBoto())
from ion.services.deploy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ion_deploy_of_an_s3_repository_without_boto3_says_to_install_the_extra(tmp_path: Path) -> None:
    """`ion-deploy` of an s3:// repository without boto3 names `ioncore[s3]`, not "No module named
    'botocore'" (a botocore import ran before the check that gives the hint)."""
    import subprocess

    from ion.testing.servers import free_port

    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps([{"url": "s3://bucket/deps", "items": [
        {"name": "x", "version": "1.0", "platform": "noarch", "destination": "out/x"}]}]))
    repo_root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(repo_root), "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_BOTO3, "--cache-dir", str(tmp_path / "cache"),
                           str(deployment)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "pip install 'ioncore[s3]'" in out and "No module named" not in out, out


# -- http ---------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_http_content_md5_is_checked(make_repo: Any, pool: Any, tmp_path: Path) -> None:
    """A right Content-MD5 is verified; a wrong one fails with ChecksumMismatchError and leaves nothing."""
    wrong = base64.b64encode(hashlib.md5(b"something else").digest()).decode()
    url, server = make_repo("http", content_md5={"deps/linux/multi/2.0/b.bin": wrong})
    repo = repository_for(url, pool, config=FAST)
    try:
        files = await listed(repo, "linux", "multi", "2.0")
        assert files["a.bin"].checksums == ()
        server.content_md5 = {"deps/linux/multi/2.0/b.bin": wrong,
                              "deps/linux/multi/2.0/a.bin": base64.b64encode(hashlib.md5(b"A" * 1000).digest()).decode()}
        got = await repo.download(files["a.bin"], tmp_path / "a.bin")
        assert got.verified == (Checksum("md5", hashlib.md5(b"A" * 1000).hexdigest()),)
        with pytest.raises(ChecksumMismatchError) as info:
            await repo.download(files["b.bin"], tmp_path / "b.bin")
    finally:
        await repo.close()
    assert info.value.expected == "md5:" + hashlib.md5(b"something else").hexdigest()
    assert info.value.got == "md5:" + hashlib.md5(b"B" * 2000).hexdigest()
    assert not (tmp_path / "b.bin").exists()


@pytest_twisted.ensureDeferred
async def test_http_small_file_is_written_by_a_short_call_a_big_one_by_the_pool(
        make_repo: Any, pool: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small file come whole is written, hashed and closed by one short call (on run_short's
    thread, beside the pool's); a big file's pieces by the pool's threads. Both arrive whole."""
    writers: dict[str, set[str]] = {}
    write = _Sink.write

    def recording(self: _Sink, data: Any) -> int:
        writers.setdefault(self.path.name, set()).add(threading.current_thread().name)
        return write(self, data)

    monkeypatch.setattr(_Sink, "write", recording)
    url, _ = make_repo("http")
    repo = repository_for(url, pool, config=FAST)
    try:
        small = (await listed(repo, "linux", "multi", "2.0"))["a.bin"]
        (big,) = await repo.list_version("linux", "big", "1.0")
        got_small = await repo.download(small, tmp_path / "a.bin")
        got_big = await repo.download(big, tmp_path / "big.bin")
    finally:
        await repo.close()
    assert writers["a.bin"] == {f"PoolThread-{pool.name}-short-0"}
    assert writers["big.bin"] and not any(name.endswith("-short-0") for name in writers["big.bin"])
    assert got_small.sha256 == sha(CONTENT["linux/multi/2.0/a.bin"])
    assert (tmp_path / "a.bin").read_bytes() == CONTENT["linux/multi/2.0/a.bin"]
    assert got_big.sha256 == sha(CONTENT["linux/big/1.0/big.bin"])
    assert (tmp_path / "big.bin").read_bytes() == CONTENT["linux/big/1.0/big.bin"]


@pytest_twisted.ensureDeferred
async def test_a_cancelled_finish_waits_for_the_last_write_so_the_abort_comes_after_it(
        pool: Any, tmp_path: Path) -> None:
    """A download cancelled while its last write (a short call, run a reactor turn later) is still
    to come: the writer's finish raises only once that write is done, so the abort that follows
    removes the file for good."""
    sink = _Sink(tmp_path / "staging" / "f.bin", within=tmp_path / "staging")
    (tmp_path / "staging").mkdir()
    writer = _PoolWriter(pool, sink, FAST)
    writer.feed(b"x" * 4096)
    finishing = defer.ensureDeferred(writer.finish(close=True))
    finishing.cancel()
    with pytest.raises(defer.CancelledError):
        await finishing
    await pool.run(sink.abort)  # what Repository._download does next
    await pool.run_short(lambda: None)  # (after every short call handed out before it)
    assert not (tmp_path / "staging" / "f.bin").exists()


@pytest_twisted.ensureDeferred
async def test_http_dropped_connection_is_retried(make_repo: Any, pool: Any, tmp_path: Path) -> None:
    """A connection dropped mid-file twice is retried and the third GET succeeds."""
    rel = "deps/linux/big/1.0/big.bin"
    url, server = make_repo("http", drops={rel: 2})
    repo = repository_for(url, pool, config=FAST)
    try:
        (f,) = await repo.list_version("linux", "big", "1.0")
        got = await repo.download(f, tmp_path / "big.bin")
    finally:
        await repo.close()
    assert server.dropped[rel] == 2 and server.count(rel, "GET") == 3
    assert got.sha256 == sha(CONTENT["linux/big/1.0/big.bin"])
    assert (tmp_path / "big.bin").read_bytes() == CONTENT["linux/big/1.0/big.bin"]


@pytest_twisted.ensureDeferred
async def test_http_dropped_connection_fails_after_retries(make_repo: Any, pool: Any, tmp_path: Path) -> None:
    """A connection dropped every time fails with TransferError after 1 + retries attempts; no file is left."""
    rel = "deps/linux/multi/2.0/c.bin"
    url, server = make_repo("http", drops={rel: 10})
    repo = repository_for(url, pool, config=FetchConfig(retry_delay=0.0, retries=2))
    try:
        files = await listed(repo, "linux", "multi", "2.0")
        with pytest.raises(TransferError) as info:
            await repo.download(files["c.bin"], tmp_path / "c.bin")
    finally:
        await repo.close()
    assert info.value.attempts == 3 and server.count(rel, "GET") == 3
    assert "after 3 attempts" in str(info.value) and f"{url.url}/linux/multi/2.0/c.bin" in str(info.value)
    assert not (tmp_path / "c.bin").exists()


@pytest_twisted.ensureDeferred
async def test_http_refused_connection_is_a_transfer_error(pool: Any) -> None:
    """Nothing listening on the port: TransferError after the retries, naming the URL."""
    from ion.testing.servers import free_port

    url = f"http://127.0.0.1:{free_port()}/deps"
    repo = repository_for(parse_repository_url(url), pool, config=FetchConfig(retry_delay=0.0, retries=1))
    try:
        with pytest.raises(TransferError) as info:
            await repo.list_version("linux", "zlib", "1.1")
    finally:
        await repo.close()
    assert f"{url}/linux/zlib/1.1/" in str(info.value) and info.value.attempts == 2


def test_index_links_of_common_servers() -> None:
    """Links of nginx, Apache and python http.server index pages give files and folders; the rest is ignored."""
    folder = "http://h/deps/linux/zlib/1.1/"
    nginx = ('<html><head><title>Index of /deps/linux/zlib/1.1/</title></head><body><h1>Index of ...</h1><hr><pre>'
             '<a href="../">../</a>\n<a href="docs/">docs/</a>   01-Jan-2024 00:00 -\n'
             '<a href="zlib-1.1.tgz">zlib-1.1.tgz</a>  01-Jan-2024 00:00  1234\n'
             '<a href="a%20b.txt">a b.txt</a>\n</pre><hr></body></html>')
    apache = ('<table><tr><th><a href="?C=N;O=D">Name</a></th><th><a href="?C=M;O=A">Last modified</a></th></tr>'
              '<tr><td><a href="/deps/linux/zlib/"><img src="/icons/back.gif"></a></td>'
              '<td><a href="/deps/linux/zlib/">Parent Directory</a></td></tr>'
              '<tr><td><a href="docs/"><img src="/icons/folder.gif"></a></td><td><a href="docs/">docs/</a></td></tr>'
              '<tr><td><a href="zlib-1.1.tgz">zlib-1.1.tgz</a></td></tr>'
              '<tr><td><a href="a%20b.txt">a b.txt</a></td></tr></table>')
    pyserver = ('<ul><li><a href="a%20b.txt">a b.txt</a></li><li><a href="docs/">docs/</a></li>'
                '<li><a href="zlib-1.1.tgz">zlib-1.1.tgz</a></li>'
                '<li><a href="http://elsewhere/x.tgz">x</a></li><li><a href="#top">top</a></li>'
                '<li><a href="/deps/linux/zlib/1.1/docs/deeper.txt">deep</a></li></ul>')
    for page in (nginx, apache, pyserver):
        files, folders = parse_index_links(page, folder)
        assert sorted(files) == ["a b.txt", "zlib-1.1.tgz"], page
        assert folders == ["docs"], page
    # A charset Python does not know (the Content-Type's word) is read as UTF-8, not an error.
    from ion.services.fetch.repository import _parse_index_page

    assert _parse_index_page(nginx.encode(), "x-no-such-charset", folder) == parse_index_links(nginx, folder)


@pytest_twisted.ensureDeferred
async def test_a_cookie_a_server_sets_goes_with_the_next_requests(make_repo: Any, pool: Any, tmp_path: Path) -> None:
    """Cookies are kept as treq keeps them: none is sent before a server sets one, and one set by
    a response (here an index page's) goes with every later request to that server."""
    url, server = make_repo("http", {"linux/zlib/1.10/zlib-1.10.tgz": b"z", "linux/c/1.0/c.bin": b"c"})
    server.headers["deps/linux/zlib/1.10/"] = {"Set-Cookie": "session=abc; Path=/"}
    repo = repository_for(url, pool, config=FAST)
    try:
        (f,) = await repo.list_version("linux", "zlib", "1.10")
        assert (await repo.download(f, tmp_path / "z.tgz")).size == 1
        await repo.list_version("linux", "c", "1.0")
    finally:
        await repo.close()
    assert server.cookies_sent[0] == ("deps/linux/zlib/1.10/", None)
    assert [cookie for _, cookie in server.cookies_sent[1:]] == ["session=abc"] * (len(server.requests) - 1)
    assert ("GET", "deps/linux/zlib/1.10/zlib-1.10.tgz") in server.requests and len(server.requests) >= 3


class _HTMLParserLinks(HTMLParser):
    """The reference: the ``href`` of each ``a`` tag as the standard library's HTML parser reads it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links.extend(value for key, value in attrs if key == "href" and value)


def _reference_hrefs(page: str) -> list[str]:
    parser = _HTMLParserLinks()
    parser.feed(page)
    parser.close()
    return parser.links


# No whitespace and no "&" of their own: CPython releases since 3.11 differ on non-ASCII whitespace
# in tags and on references without ";" (the parser read here follows HTML5 on both).
_NAMES = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"),
                                        blacklist_characters="&"), min_size=1, max_size=12)
_VALUES = st.one_of(_NAMES, st.sampled_from([
    "../", "docs/", "a%20b.txt", "?C=N;O=D", "#top", "x&amp;y", "&lt;b&gt;", "http://elsewhere/x.tgz",
    "/abs/path/", "caf&eacute;", "./dot.tgz", "./sub/", "./", "/deps/linux/zlib/1.1/abs.tgz",
    "/deps/linux/zlib/1.1/", "/deps/linux/zlib/1.1/sub/", "/deps/linux/zlib/1.1/../x", "//other/x", "a;b",
    "http://h/deps/linux/zlib/1.1/full.tgz"]))


@st.composite
def _anchor(draw: st.DrawFn) -> str:
    value = draw(_VALUES).replace("<", "")  # servers escape it in a link (%3C or &lt;)
    quote = draw(st.sampled_from(['"', "'", ""]))
    if not quote and any(c.isspace() or c in ">\"'`=<" for c in value):
        quote = '"'
    if quote:
        value = value.replace(quote, "")
    name = draw(st.sampled_from(["href", "HREF", "Href"]))
    before = draw(st.sampled_from(["", ' class="x"', " title='a > b'", " data-x=1"]))
    after = draw(st.sampled_from(["", ' id="n"', " download"]))
    space = draw(st.sampled_from([" ", "  ", "\n"]))
    tag = draw(st.sampled_from(["a", "A"]))
    text = draw(_NAMES).replace("<", "").replace("&", "")
    return f"<{tag}{before}{space}{name}={quote}{value}{quote}{after}>{text}</{tag}>"


_FILLER = st.sampled_from([
    "<pre>", "</pre>", "<hr>", "\n", "  01-Jan-2024 00:00  1234\n", "<!-- <a href=\"hidden\">x</a> -->",
    "<script>var s = '<a href=\"no\">';</script>", "<style>a[href] { color: red }</style>",
    "<abbr title=\"href=x\">y</abbr>", "<img src=\"/icons/back.gif\" alt=\"[DIR]\">", "<td>", "</td>",
    "<a name=\"top\">", "<a href=\"\">empty</a>", "<area href=\"not-an-anchor\">",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_anchor(), _FILLER), max_size=25))
def test_index_links_are_what_htmlparser_reads(parts: list[str]) -> None:
    """The links of an index page, read by regular expressions, are the standard library
    HTMLParser's: the same hrefs in the same order, comments, scripts and styles skipped,
    attribute names in any case, values in either quotes or none, character references decoded.
    (A ``<`` inside a tag, which servers escape, ends it: see ``_ANCHOR``.)"""
    page = "<html><body>" + "".join(parts) + "</body></html>"
    assert _index_hrefs(page) == _reference_hrefs(page)
    folder = "http://h/deps/linux/zlib/1.1/"
    expected_files: list[str] = []
    expected_folders: list[str] = []
    for href in _reference_hrefs(page):  # what urljoin makes of each link, as before
        href = href.strip()
        if not href or href.startswith(("?", "#")):
            continue
        target = urlsplit(urljoin(folder, href))
        if (target.scheme, target.netloc) != ("http", "h") or not target.path.startswith("/deps/linux/zlib/1.1/"):
            continue
        rel = target.path[len("/deps/linux/zlib/1.1/"):]
        name = unquote(rel.rstrip("/"))
        if not rel.rstrip("/") or "/" in rel.rstrip("/") or name in (".", "..") or "/" in name or "\0" in name \
                or name in expected_files + expected_folders:
            continue
        (expected_folders if rel.endswith("/") else expected_files).append(name)
    assert parse_index_links(page, folder) == (expected_files, expected_folders)


@pytest_twisted.ensureDeferred
async def test_a_big_index_page_is_parsed_in_the_pool_a_small_one_inline(make_repo: Any, pool: Any) -> None:
    """A folder's index page bigger than INLINE_INDEX_BYTES is parsed in the blocking pool (a page of
    20,000 entries would hold the reactor ~55 ms); a small one on the reactor thread. Both list alike."""
    from ion.services.fetch import repository as repository_module

    files = {f"linux/many/1.0/f{i:04d}.txt": b"x" for i in range(1500)}  # an index page of ~110 KB
    files["linux/many/1.0/sub/one.txt"] = b"y"
    url, _ = make_repo("http", files)
    ran: list[str] = []

    class Recording:
        def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
            ran.append(getattr(fn, "__name__", repr(fn)))
            return pool.run(fn, *args, **kwargs)

    repo = repository_for(url, Recording(), config=FAST)
    try:
        listed_files = await listed(repo, "linux", "many", "1.0")
    finally:
        await repo.close()
    assert len(listed_files) == 1501 and "sub/one.txt" in listed_files
    # The version's page (~110 KB) in the pool; its sub-folder's page (one entry) inline.
    assert ran.count("_parse_index_page") == 1, ran
    assert repository_module.INLINE_INDEX_BYTES < 110_000


# -- file ---------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_file_marker_follows_changes(make_repo: Any, pool: Any) -> None:
    """A local file's version marker changes when the file does."""
    url, _ = make_repo("file")
    repo = repository_for(url, pool)
    (before,) = await repo.list_version("linux", "zlib", "1.10")
    path = Path(url.location, "linux/zlib/1.10/zlib-1.10.tgz")
    path.write_bytes(b"new")
    os.utime(path, ns=(1, 1))
    (after,) = await repo.list_version("linux", "zlib", "1.10")
    assert before.marker != after.marker and after.size == 3


def test_unknown_scheme_is_refused() -> None:
    """A URL of another scheme fails with FetchError naming it."""
    with pytest.raises(FetchError, match="ftp"):
        repository_for("ftp://host/deps", pool=None)


# -- big files: reused buffers, hashing threads, S3 bodies read directly ----------------------------------
def _sink_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("ion-sink-")]


class _Pieces:
    """A source whose ``readinto`` gives at most ``most`` bytes at a time (short reads, as a socket's),
    and raises ``fail`` once ``fail_after`` bytes are read."""

    def __init__(self, data: bytes, most: int, fail_after: int | None = None,
                 fail: Exception | None = None) -> None:
        self.data, self.most, self.pos = data, most, 0
        self.fail_after, self.fail = fail_after, fail

    def readinto(self, buffer: memoryview) -> int:
        if self.fail_after is not None and self.pos >= self.fail_after and self.fail is not None:
            raise self.fail
        n = min(len(buffer), self.most, len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


#: A small file (hashed in the reading thread) and a big one (hashed by helper threads beside the reads).
EXPECTED_SIZES = [pytest.param(300_000, id="small-inline"), pytest.param(1 << 30, id="big-beside")]


@pytest.mark.parametrize("expected", EXPECTED_SIZES)
@pytest.mark.parametrize("md5", [False, True])
def test_sink_fill_from_writes_and_hashes_every_piece_in_order(tmp_path: Path, md5: bool, expected: int) -> None:
    """fill_from, over several calls with short reads and buffers reused many times over, writes the
    bytes in order and hashes them all (md5 too when wanted); its hashing threads end with each call."""
    data = os.urandom(300_000)
    sink = _Sink(tmp_path / "f")
    sink.expected = expected
    sink.want_md5(md5)
    src = _Pieces(data, most=777)
    calls = []
    while n := sink.fill_from(src.readinto, 50_000, 4096):
        calls.append(n)
        assert _sink_threads() == []
    size, sha256, got_md5 = sink.close()
    assert calls == [50_000] * 6 and size == len(data)
    assert (tmp_path / "f").read_bytes() == data and sha256 == sha(data)
    assert got_md5 == (hashlib.md5(data).hexdigest() if md5 else None)


@pytest.mark.parametrize("expected", EXPECTED_SIZES)
def test_sink_fill_from_failing_source_stops_cleanly(tmp_path: Path, expected: int) -> None:
    """A source failing mid-way raises out of fill_from with its hashing threads joined; after a
    reset the sink starts again from byte 0 and hashes only the new bytes."""
    data = os.urandom(100_000)
    sink = _Sink(tmp_path / "f")
    sink.expected = expected
    sink.want_md5(True)
    with pytest.raises(ConnectionResetError):
        sink.fill_from(_Pieces(data, 1000, fail_after=40_000, fail=ConnectionResetError()).readinto, 1 << 20, 4096)
    assert _sink_threads() == []
    sink.reset()
    sink.want_md5(True)
    src = _Pieces(data, 5000)
    while sink.fill_from(src.readinto, 1 << 20, 4096):
        pass
    size, sha256, md5 = sink.close()
    assert (size, sha256, md5) == (len(data), sha(data), hashlib.md5(data).hexdigest())
    assert (tmp_path / "f").read_bytes() == data


@pytest.mark.parametrize("actual", [4096, 4096 * 3 + 5, 10], ids=["as-said", "longer", "shorter"])
def test_sink_reads_a_small_file_into_a_buffer_of_its_size(tmp_path: Path, actual: int) -> None:
    """A small file of known size is read into a buffer of that size and a byte (the end seen in
    the same read), not one of chunk_size (1 MiB made per 4 KB file was mostly page faults), and
    the pipeline's buffers of a big file (2 MiB) are not made at all; a source that sends more or
    fewer bytes than it said is still written and hashed whole."""
    data = os.urandom(actual)
    sink = _Sink(tmp_path / "f")
    sink.expected = 4096
    sink.want_md5(True)
    src = _Pieces(data, most=1 << 30)
    sizes: list[int] = []

    def readinto(buffer: memoryview) -> int:
        sizes.append(len(buffer))
        return src.readinto(buffer)

    assert sink.fill_from(readinto, 1 << 30, 1 << 20) == actual
    assert set(sizes) == {4097}
    assert sink._buffers == []
    assert sink.close() == (actual, sha(data), hashlib.md5(data).hexdigest())
    assert (tmp_path / "f").read_bytes() == data


def _put_multipart(moto: Any, bucket: str, key: str, data: bytes) -> str:
    """Upload ``data`` in 5 MiB parts (S3's smallest); returns the ETag (``<hex>-<parts>``)."""
    client = moto.client()
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    parts = []
    for n, start in enumerate(range(0, len(data), 5 << 20), start=1):
        part = client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=n,
                                  Body=data[start:start + (5 << 20)])
        parts.append({"PartNumber": n, "ETag": part["ETag"]})
    done = client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                            MultipartUpload={"Parts": parts})
    return str(done["ETag"]).strip('"')


#: Small pieces and steps, so that a few MB go through many buffers and many pool jobs.
SMALL_STEPS = FetchConfig(retry_delay=0.0, chunk_size=64 << 10)


@pytest_twisted.ensureDeferred
async def test_s3_multipart_object_is_read_directly_and_hashed(s3_env: Any, pool: Any, tmp_path: Path) -> None:
    """A multipart object (its ETag no md5: nothing but the sha256 computed) is read from the HTTP
    response under botocore's body, straight into the sink's buffers: every byte lands in order and
    the sha256 is that of the whole file; a single-part object's body, which botocore checksums
    itself, is read through that body."""
    from ion.services.fetch.repository import _body_readinto

    data = os.urandom(11 << 20)
    bucket = s3_env.new_bucket()
    etag = _put_multipart(s3_env, bucket, "deps/linux/multi/1.0/big.bin", data)
    s3_env.put_tree(bucket, {"linux/single/1.0/one.bin": b"one" * 1000}, prefix="deps")
    assert etag.endswith("-3")
    repo = repository_for(parse_repository_url(f"s3://{bucket}/deps"), pool, config=SMALL_STEPS)
    assert isinstance(repo, S3Repository)
    steps: list[int] = []
    try:
        (f,) = await repo.list_version("linux", "multi", "1.0")
        assert f.checksums == () and f.marker == f"etag:{etag}"
        got = await repo.download(f, tmp_path / "big.bin", progress=lambda done, total: steps.append(done))
        for key, direct in (("deps/linux/multi/1.0/big.bin", True), ("deps/linux/single/1.0/one.bin", False)):
            body, _size, _etag = await pool.run(repo._open_blocking, key, key)
            try:
                reader = getattr(_body_readinto(body), "__self__", None)
                assert reader is (body._raw_stream._fp if direct else body)
            finally:
                await pool.run(repo._close_body, body)
    finally:
        await repo.close()
    assert (tmp_path / "big.bin").read_bytes() == data
    assert (got.size, got.sha256, got.md5, got.verified) == (len(data), sha(data), None, ())
    assert len(steps) > 10 and steps[-1] == len(data) and _sink_threads() == []


@pytest_twisted.ensureDeferred
async def test_s3_multipart_object_is_checked_against_its_sidecar(s3_env: Any, pool: Any, tmp_path: Path) -> None:
    """A multipart object read directly is still checked against its .sha256 sidecar: a wrong one
    fails the download and leaves no file."""
    data = os.urandom(6 << 20)
    bucket = s3_env.new_bucket()
    _put_multipart(s3_env, bucket, "deps/linux/multi/1.0/big.bin", data)
    s3_env.put_tree(bucket, {"linux/multi/1.0/big.bin.sha256": "0" * 64 + "  big.bin\n"}, prefix="deps")
    repo = repository_for(parse_repository_url(f"s3://{bucket}/deps"), pool, config=SMALL_STEPS)
    try:
        (f,) = await repo.list_version("linux", "multi", "1.0")
        with pytest.raises(ChecksumMismatchError) as info:
            await repo.download(f, tmp_path / "big.bin")
    finally:
        await repo.close()
    assert info.value.expected == "sha256:" + "0" * 64 and info.value.got == "sha256:" + sha(data)
    assert not (tmp_path / "big.bin").exists() and _sink_threads() == []


@pytest.mark.parametrize("drops", [1, 5])
@pytest_twisted.ensureDeferred
async def test_s3_body_dropped_mid_way(drops: int, s3_env: Any, pool: Any, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A body whose connection drops after a few MB is fetched again from byte 0 (the file is right,
    its sha256 that of the content); when it keeps dropping, TransferError and no file is left."""
    from ion.services.fetch import repository

    data = os.urandom(6 << 20)
    bucket = s3_env.new_bucket()
    _put_multipart(s3_env, bucket, "deps/linux/multi/1.0/big.bin", data)
    real = repository._body_readinto
    bodies: list[Any] = []  # one per attempt, kept (their ids stay theirs)
    read: list[int] = []  # bytes read from each

    def dropping(body: Any) -> Any:
        readinto = real(body)
        if not any(b is body for b in bodies):
            bodies.append(body)
            read.append(0)
        attempt = next(i for i, b in enumerate(bodies) if b is body)
        if attempt >= drops:
            return readinto

        def read_then_drop(buffer: memoryview) -> int:
            if read[attempt] >= 3 << 20:
                raise ConnectionResetError(104, "Connection reset by peer")
            n = readinto(buffer)
            read[attempt] += n
            return n

        return read_then_drop

    monkeypatch.setattr(repository, "_body_readinto", dropping)
    config = FetchConfig(retries=2, retry_delay=0.0, chunk_size=64 << 10)
    repo = repository_for(parse_repository_url(f"s3://{bucket}/deps"), pool, config=config)
    try:
        (f,) = await repo.list_version("linux", "multi", "1.0")
        if drops > config.retries:
            with pytest.raises(TransferError) as info:
                await repo.download(f, tmp_path / "big.bin")
            assert info.value.attempts == 3 and "connection dropped" in str(info.value)
            assert not (tmp_path / "big.bin").exists()
        else:
            got = await repo.download(f, tmp_path / "big.bin")
            assert (tmp_path / "big.bin").read_bytes() == data and got.sha256 == sha(data)
            assert len(bodies) == 2 and read[0] == 3 << 20
    finally:
        await repo.close()
    assert _sink_threads() == []


# -- retries, on a clock ----------------------------------------------------------------------------------
class _SyncPool:
    def run(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(fn, *args, **kwargs)


class _Flaky(Repository):
    """A repository whose transfers drop ``failures`` times before succeeding."""

    def __init__(self, failures: int, **kwargs: Any) -> None:
        super().__init__(parse_repository_url("file:///nowhere"), _SyncPool(), **kwargs)
        self.failures = failures
        self.attempts = 0

    async def _transfer(self, remote: RemoteFile, sink: _Sink, progress: Any) -> RemoteFile:
        self.attempts += 1
        sink.write(b"partial")
        if self.attempts <= self.failures:
            raise _Retryable("connection dropped")
        sink.write(b"!")
        return remote


def test_retries_back_off_on_the_clock(tmp_path: Path) -> None:
    """Retries wait 0.5 s, then 1 s, then 2 s on the injected clock, and the file restarts from byte 0."""
    clock = task.Clock()
    repo = _Flaky(3, reactor=clock, clock=clock)
    d = repo.download(RemoteFile("f", "file:///nowhere/f", None), tmp_path / "f")
    assert repo.attempts == 1 and not d.called
    clock.advance(0.49)
    assert repo.attempts == 1
    clock.advance(0.01)
    assert repo.attempts == 2
    clock.advance(1.0)
    assert repo.attempts == 3 and not d.called
    clock.advance(2.0)
    assert repo.attempts == 4 and d.called
    results: list[Any] = []
    d.addBoth(results.append)
    assert results[0].size == len(b"partial!") and (tmp_path / "f").read_bytes() == b"partial!"


def test_retries_give_up_with_transfer_error(tmp_path: Path) -> None:
    """After ``retries`` retries the download fails with TransferError and removes the file."""
    clock = task.Clock()
    repo = _Flaky(10, reactor=clock, clock=clock, config=FetchConfig(retries=2, retry_delay=1.0))
    d = repo.download(RemoteFile("f", "file:///nowhere/f", None), tmp_path / "f")
    clock.advance(1.0)
    clock.advance(2.0)
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert repo.attempts == 3 and failures and failures[0].check(TransferError)
    assert failures[0].value.attempts == 3 and not (tmp_path / "f").exists()


def test_cancelled_download_removes_the_file(tmp_path: Path) -> None:
    """Cancelling a download waiting for its retry removes the partial file."""
    clock = task.Clock()
    repo = _Flaky(1, reactor=clock, clock=clock)
    d = repo.download(RemoteFile("f", "file:///nowhere/f", None), tmp_path / "f")
    assert (tmp_path / "f").exists()
    d.cancel()
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures[0].check(defer.CancelledError) and not (tmp_path / "f").exists()


@pytest_twisted.ensureDeferred
async def test_http_stalled_body_is_abandoned_and_retried(make_repo: Any, pool: Any, tmp_path: Path) -> None:
    """A body that stops arriving is given up after read_timeout (on the injected clock) and fetched again."""
    rel = "deps/linux/multi/2.0/b.bin"
    url, server = make_repo("http", stalls={rel: 1})
    clock = task.Clock()
    repo = repository_for(url, pool, config=FetchConfig(retry_delay=0.0, read_timeout=5.0), clock=clock)
    try:
        files = await listed(repo, "linux", "multi", "2.0")
        d = repo.download(files["b.bin"], tmp_path / "b.bin")
        await server.wait_for(rel, "GET")
        assert not d.called
        clock.advance(5.0)
        got = await d
    finally:
        await repo.close()
    assert server.count(rel, "GET") == 2 and got.sha256 == sha(b"B" * 2000)


@pytest_twisted.ensureDeferred
async def test_http_1_0_server_like_python_http_server(pool: Any, tmp_path: Path) -> None:
    """``python -m http.server`` (HTTP/1.0: it closes every connection without a Connection header):
    listing, HEADs and GETs one after the other all work."""
    import functools
    import http.server

    write_tree(tmp_path / "www" / "deps", CONTENT)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    repo = repository_for(f"http://127.0.0.1:{server.server_address[1]}/deps", pool,
                          config=FetchConfig(retry_delay=0.0, retries=0))
    try:
        files = await listed(repo, "linux", "multi", "2.0")
        for rel, f in files.items():
            got = await repo.download(f, tmp_path / "out" / rel)
            assert got.sha256 == sha(CONTENT[f"linux/multi/2.0/{rel}"])
    finally:
        await repo.close()
        server.shutdown()
        server.server_close()
    assert len(files) >= 2


@pytest_twisted.ensureDeferred
async def test_http_cancelled_download_is_not_retried(make_repo: Any, pool: Any, tmp_path: Path) -> None:
    """Cancelling a download whose GET is stalled ends it at once with CancelledError: one GET,
    no retry (the HTTP client wraps the cancel in ResponseFailed/ResponseNeverReceived)."""
    rel = "deps/linux/multi/2.0/b.bin"
    url, server = make_repo("http", stalls={rel: 5})
    repo = repository_for(url, pool, config=FetchConfig(retry_delay=0.0, retries=3, read_timeout=600.0))
    try:
        files = await listed(repo, "linux", "multi", "2.0")
        d = repo.download(files["b.bin"], tmp_path / "b.bin")
        await server.wait_for(rel, "GET")
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d.addTimeout(30, _reactor())
    finally:
        await repo.close()
    assert server.count(rel, "GET") == 1
    assert not (tmp_path / "b.bin").exists()


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest_twisted.ensureDeferred
async def test_file_repository_refuses_links_out_of_it(pool: Any, tmp_path: Path) -> None:
    """A file: repository never reads through a symlink that points outside it (file or version folder)."""
    import os

    from ion.services.deploy.spec import parse_repository_url
    from ion.services.fetch.errors import AccessDeniedError

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the cache")
    root = tmp_path / "repo"
    (root / "linux" / "leak" / "1.0").mkdir(parents=True)
    os.symlink(secret, root / "linux" / "leak" / "1.0" / "innocent.txt")
    (root / "linux" / "folder").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f").write_text("x")
    os.symlink(tmp_path / "outside", root / "linux" / "folder" / "1.0")
    (root / "linux" / "fine" / "1.0").mkdir(parents=True)
    (root / "linux" / "fine" / "1.0" / "real.txt").write_text("ok")
    os.symlink(root / "linux" / "fine" / "1.0" / "real.txt", root / "linux" / "fine" / "1.0" / "alias.txt")
    repo = repository_for(parse_repository_url(f"file://{root}"), pool, config=FAST)
    for name in ("leak", "folder"):
        with pytest.raises(AccessDeniedError, match="out(side)? (of )?the repository") as info:
            await repo.list_version("linux", name, "1.0")
        assert str(secret) not in str(info.value)  # (the link's target is not named: no probing outside)
    assert set(await listed(repo, "linux", "fine", "1.0")) == {"real.txt", "alias.txt"}


@pytest_twisted.ensureDeferred
async def test_file_repository_refuses_a_file_swapped_for_a_link_out_of_it_after_the_listing(
        pool: Any, tmp_path: Path) -> None:
    """The listing saw regular files; before their download one became a link to a file outside the
    repository, a sub-folder a link to a folder outside it, and another file a FIFO. Each read is
    refused (AccessDeniedError, naming nothing outside; the FIFO never opened for reading), nothing
    is copied, and a file left as it was still downloads."""
    from ion.services.deploy.spec import parse_repository_url
    from ion.services.fetch.errors import AccessDeniedError

    root = tmp_path / "repo"
    version = root / "linux" / "app" / "1.0"
    write_tree(version, {"a.txt": "a", "lib/b.txt": "b", "c.txt": "c", "d.txt": "d"})
    (tmp_path / "outside" / "lib").mkdir(parents=True)
    (tmp_path / "outside" / "secret").write_text("not for the cache")
    (tmp_path / "outside" / "lib" / "b.txt").write_text("not for the cache either")
    repo = repository_for(parse_repository_url(f"file://{root}"), pool, config=FAST)
    files = await listed(repo, "linux", "app", "1.0")
    assert set(files) == {"a.txt", "lib/b.txt", "c.txt", "d.txt"}
    (version / "a.txt").unlink()
    os.symlink(tmp_path / "outside" / "secret", version / "a.txt")
    shutil.rmtree(version / "lib")
    os.symlink(tmp_path / "outside" / "lib", version / "lib")
    (version / "d.txt").unlink()
    os.mkfifo(version / "d.txt")
    for rel in ("a.txt", "lib/b.txt", "d.txt"):
        with pytest.raises(AccessDeniedError, match="changed since it was listed") as info:
            await repo.download(files[rel], tmp_path / "out" / rel)
        assert str(tmp_path / "outside") not in str(info.value)
        assert not (tmp_path / "out" / rel).exists()
    got = await repo.download(files["c.txt"], tmp_path / "out" / "c.txt")
    assert got.size == 1 and (tmp_path / "out" / "c.txt").read_text() == "c"
    # Rewritten in place (an rsync, a write and rename): the repository's own file, read as it is now.
    (version / "c.txt").write_text("c2")
    got = await repo.download(files["c.txt"], tmp_path / "out" / "c2.txt")
    assert (tmp_path / "out" / "c2.txt").read_text() == "c2"


def test_file_read_errors_tell_nothing_of_what_lies_outside(tmp_path: Path) -> None:
    """A listed folder swapped for a link out of the repository: whether the file exists out there
    or not, the read says the same thing ("changed since it was listed"), never "gone"."""
    from ion.services.fetch import repository as repo_module
    from ion.services.fetch.errors import AccessDeniedError

    root = tmp_path / "repo"
    version = root / "linux" / "app" / "1.0"
    write_tree(version, {"sub/there.txt": "t", "sub/absent.txt": "a"})
    write_tree(tmp_path / "outside", {"there.txt": "secret"})
    files = {f.path: f for f in repo_module._list_folder(version, str(root)) or []}
    shutil.rmtree(version / "sub")
    os.symlink(tmp_path / "outside", version / "sub")
    messages = set()
    for rel in ("sub/there.txt", "sub/absent.txt"):
        with pytest.raises(AccessDeniedError) as info:
            repo_module._read_head(files[rel].source, 100)
        messages.add(str(info.value).replace(rel, "REL"))
    assert len(messages) == 1 and "changed since it was listed" in messages.pop()


def test_file_listing_never_walks_through_a_folder_swapped_for_a_link(tmp_path: Path, monkeypatch: Any) -> None:
    """A sub-folder swapped for a link out of the repository between the reading of its parent and
    its own opening is refused, not listed through (the folders are opened without following links)."""
    from ion.services.fetch import repository as repo_module
    from ion.services.fetch.errors import AccessDeniedError

    version = tmp_path / "repo" / "linux" / "app" / "1.0"
    write_tree(version, {"a.txt": "a", "sub/secret-name": "s"})
    write_tree(tmp_path / "outside", {"other-secret": "x"})
    real_scandir = os.scandir
    swapped: list[bool] = []

    def swapping_scandir(fd: Any) -> Any:
        if swapped:
            return real_scandir(fd)
        swapped.append(True)  # the first folder read (the version folder): then "sub" becomes a link
        with real_scandir(fd) as it:
            entries = list(it)
        shutil.rmtree(version / "sub")
        os.symlink(tmp_path / "outside", version / "sub")
        return contextlib.nullcontext(entries)

    monkeypatch.setattr(repo_module.os, "scandir", swapping_scandir)
    with pytest.raises(AccessDeniedError, match="sub changed while it was listed"):
        repo_module._list_folder(version, str(tmp_path / "repo"))


def test_file_listing_refuses_a_tree_deeper_than_its_bound(tmp_path: Path, monkeypatch: Any) -> None:
    """Each level of a walk holds a descriptor: a version folder nested deeper than the bound is a
    RepositoryError naming the folder, not a process out of descriptors."""
    from ion.services.fetch import repository as repo_module
    from ion.services.fetch.errors import RepositoryError

    monkeypatch.setattr(repo_module, "_MAX_FILE_DEPTH", 3)
    version = tmp_path / "repo" / "linux" / "deep" / "1.0"
    write_tree(version, {"a/b/c/f.txt": "ok"})
    assert [f.path for f in repo_module._list_folder(version, str(tmp_path / "repo")) or []] == ["a/b/c/f.txt"]
    write_tree(version, {"a/b/c/d/f.txt": "too deep"})
    with pytest.raises(RepositoryError, match="more than 3 folders deep"):
        repo_module._list_folder(version, str(tmp_path / "repo"))


def test_file_listing_keeps_one_branch_open_and_judges_every_link(tmp_path: Path, monkeypatch: Any) -> None:
    """A version folder of 200 sub-folders is listed with at most its depth of folders open at once
    (not one per folder waiting its turn: a wide tree would run out of descriptors). A looping or
    dangling link inside is skipped; a dangling link leading out of the repository is refused like
    any other link out."""
    from ion.services.fetch import repository as repo_module
    from ion.services.fetch.errors import AccessDeniedError

    root = tmp_path / "repo"
    version = root / "linux" / "wide" / "1.0"
    write_tree(version, {f"d{i:03d}/deep/f.txt": str(i) for i in range(200)})
    os.symlink("loop", version / "loop")
    os.symlink(version / "missing", version / "dangling")
    real_open, real_close = os.open, os.close
    open_folders: set[int] = set()
    most = [0]

    def counting_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECTORY:
            open_folders.add(fd)
            most[0] = max(most[0], len(open_folders))
        return fd

    def counting_close(fd: int) -> None:
        open_folders.discard(fd)
        real_close(fd)

    monkeypatch.setattr(repo_module.os, "open", counting_open)
    monkeypatch.setattr(repo_module.os, "close", counting_close)
    files = repo_module._list_folder(version, str(root))
    monkeypatch.undo()
    assert files is not None and len(files) == 200 and {f.path for f in files} == {
        f"d{i:03d}/deep/f.txt" for i in range(200)}
    assert most[0] <= 3 and not open_folders  # the version folder, d<i>, deep
    os.symlink(tmp_path / "nowhere", version / "out")
    with pytest.raises(AccessDeniedError, match="out is a link out of the repository"):
        repo_module._list_folder(version, str(root))


# -- https ------------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_https_with_an_untrusted_certificate_fails_at_once(http_repository: Any, pool: Any,
                                                                  tmp_path: Path) -> None:
    """A real HTTPS server with a self-signed certificate: the listing fails on the first attempt
    with the certificate error (CertificateError), not retried as if the connection had dropped."""
    from ion.testing.servers import self_signed_certificate

    write_tree(tmp_path / "www" / "deps", CONTENT)
    server = http_repository(tmp_path / "www", tls=self_signed_certificate())
    url = parse_repository_url(f"{server.url}/deps")
    clock = task.Clock()  # a retry would wait on it: none may be scheduled
    repo = repository_for(url, pool, config=FetchConfig(retry_delay=5.0, retries=4), clock=clock)
    try:
        with pytest.raises(CertificateError) as info:
            await repo.list_version("linux", "zlib", "1.1")
    finally:
        await repo.close()
    message = str(info.value)
    assert "certificate verify failed" in message and f"{url.url}/linux/zlib/1.1/" in message, message
    assert "connection dropped" not in message and "attempts" not in message, message
    assert server.count("deps/linux/zlib/1.1/") == 0  # no request got through the handshake
    assert clock.getDelayedCalls() == [] or all(not c.active() for c in clock.getDelayedCalls())


def test_a_sink_below_a_removed_staging_folder_fails_and_makes_nothing(tmp_path: Path) -> None:
    """A write that comes after its fetch was given up (a pool job a cancel could not stop) and its
    staging folder removed fails, naming the file; it never makes the folder again (found by a CI
    run: a 403 on one file of a folder left a staging folder behind). While the folder exists, the
    parents below it are made as before."""
    from ion.services.fetch.errors import WriteError

    staging = tmp_path / "staging" / "abc"
    staging.mkdir(parents=True)
    live = _Sink(staging / "lib" / "deep" / "a.txt", within=staging)
    live.write(b"x")
    assert live.close()[0] == 1 and (staging / "lib" / "deep" / "a.txt").read_bytes() == b"x"
    late = _Sink(staging / "lib" / "b.txt", within=staging)
    shutil.rmtree(staging)
    with pytest.raises(WriteError, match="b.txt"):
        late.write(b"y")
    assert not staging.exists()


@pytest.mark.parametrize(("size", "jobs"), [(0, ["_open_and_fill"]), (4096, ["_open_and_fill"]),
                                            (3 * 1024, ["_open_and_fill", "fill_from", "fill_from", "close", "close"])])
def test_a_small_file_of_a_folder_is_copied_in_one_pool_job(tmp_path: Path, size: int, jobs: list[str]) -> None:
    """file: a file that fits in one step (chunk_size x 8) is opened, copied, hashed and closed, its copy
    too, in one pool job; a bigger one goes on a step per job (progress between them), then is closed."""
    from ion.services.fetch.repository import FileRepository

    class Pool(_SyncPool):
        def __init__(self) -> None:
            self.calls: list[str] = []

        def run(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            self.calls.append(fn.__name__)
            return super().run(fn, *args, **kwargs)

    data = os.urandom(size)
    write_tree(tmp_path / "www", {"linux/z/1.0/z.bin": data})
    pool = Pool()
    chunk = 256 if size == 3 * 1024 else 64 << 10
    repo = FileRepository(parse_repository_url(f"file://{tmp_path / 'www'}"), pool, config=FetchConfig(chunk_size=chunk))
    [remote] = _fired(repo.list_version("linux", "z", "1.0"))
    pool.calls.clear()
    seen: list[int] = []
    got = _fired(repo.download(remote, tmp_path / "out" / "z.bin", lambda done, total: seen.append(done)))
    assert pool.calls == jobs
    assert (tmp_path / "out" / "z.bin").read_bytes() == data and got.size == size and got.sha256 == sha(data)
    assert seen[-1] == size


def _fired(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_an_http_repository_makes_each_endpoint_once():
    """Twisted's Agent asks for an endpoint at every request: _EndpointsOnce makes the one of each
    (scheme, host, port) once and hands it out again; another host or port gets its own, and a
    factory's refusal (an unsupported scheme) is raised every time, never kept."""
    from twisted.web.client import URI

    from ion.services.fetch.repository import _EndpointsOnce

    made: list[bytes] = []

    class Factory:
        def endpointForURI(self, uri):  # noqa: N802 - Twisted's interface
            if uri.scheme == b"ftp":
                raise ValueError("unsupported")
            made.append(uri.toBytes())
            return object()

    endpoints = _EndpointsOnce(Factory())
    first = endpoints.endpointForURI(URI.fromBytes(b"http://repo.example:8080/a/1.0/"))
    assert endpoints.endpointForURI(URI.fromBytes(b"http://repo.example:8080/a/1.0/a.bin")) is first
    assert endpoints.endpointForURI(URI.fromBytes(b"http://repo.example:8081/a/")) is not first
    assert endpoints.endpointForURI(URI.fromBytes(b"https://repo.example:8080/a/")) is not first
    assert len(made) == 3
    for _ in range(2):
        with pytest.raises(ValueError):
            endpoints.endpointForURI(URI.fromBytes(b"ftp://repo.example/a/"))


def test_a_request_slot_is_held_until_its_call_ends_and_a_wait_cancelled_takes_none(tmp_path: Path) -> None:
    """_slot: with one slot, a second call waits for the first; cancelling it while it waits gives
    up no slot it never had; the slot is freed when the call holding it ends, however it ends."""
    from ion.core.threads import SynchronousPool

    (tmp_path / "deps").mkdir()
    repo = repository_for(parse_repository_url(f"file://{tmp_path}/deps"), SynchronousPool(),
                          config={"max_connections": 1})
    first: defer.Deferred[str] = defer.Deferred()
    held = repo._slot(lambda: first)
    waiting = repo._slot(lambda: defer.succeed("never run"))
    assert repo.slots.tokens == 0 and not waiting.called
    waiting.cancel()
    assert isinstance(waiting.result.value, defer.CancelledError)
    waiting.addErrback(lambda f: None)
    assert repo.slots.tokens == 0  # still the first call's
    first.errback(KeyError("boom"))
    assert isinstance(held.result.value, KeyError)
    held.addErrback(lambda f: None)
    assert repo.slots.tokens == 1
    assert repo._slot(lambda: defer.succeed("next")).result == "next" and repo.slots.tokens == 1
