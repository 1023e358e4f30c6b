"""Fixtures of the Fetch tests: a blocking pool, and one repository content served by file:, http: and s3:."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from ion.services.deploy.spec import RepositoryURL, parse_repository_url
from ion.testing.servers import HTTPRepositoryServer, MotoServer, tgz, write_tree, zipped

#: The repository every kind serves: exact versions, sub-folders, several files per version.
CONTENT: dict[str, bytes] = {
    "linux/zlib/1.1/zlib-1.1.tgz": tgz({"zlib/include/zlib.h": b"/* 1.1 */\n", "zlib/lib/libz.a": b"\0" * 300}),
    "linux/zlib/1.1/docs/README.txt": b"zlib 1.1 readme\n",
    "linux/zlib/1.1/docs/api/index.html": b"<html>api</html>\n",
    "linux/zlib/1.10/zlib-1.10.tgz": tgz({"zlib/include/zlib.h": b"/* 1.10 */\n"}),
    "linux/multi/2.0/a.bin": b"A" * 1000,
    "linux/multi/2.0/b.bin": b"B" * 2000,
    "linux/multi/2.0/c.bin": b"C" * 3000,
    "linux/tool/3.0/tool.zip": zipped({"tool/bin/tool": b"#!/bin/sh\necho tool\n", "tool/README": b"tool\n"}),
    "linux/tool/3.0/notes.txt": b"plain file kept as it is\n",
    "linux/big/1.0/big.bin": bytes(range(256)) * 20000,  # 5 MB: several chunks
}


#: Repository kinds every contract test runs against.
KINDS = ["file", "http", "s3"]


@pytest.fixture
def make_repo(tmp_path: Path, http_repository: Callable[[str | Path], HTTPRepositoryServer],
              request: pytest.FixtureRequest) -> Callable[..., tuple[RepositoryURL, Any]]:
    """``make_repo(kind, files=CONTENT)`` -> (repository URL, server or None): the files served by
    ``kind`` under a prefix (``.../deps``). S3 needs the ``s3_env`` fixture (requested on use)."""
    counter = iter(range(1000))

    def make(kind: str, files: Mapping[str, bytes] = CONTENT, **options: Any) -> tuple[RepositoryURL, Any]:
        n = next(counter)
        if kind == "file":
            root = write_tree(tmp_path / f"repo{n}" / "deps", files)
            return parse_repository_url(f"file://{root}"), None
        if kind == "http":
            www = tmp_path / f"www{n}"
            write_tree(www / "deps", files)
            server = http_repository(www)
            for key, value in options.items():
                setattr(server, key, value)
            return parse_repository_url(f"{server.url}/deps"), server
        if kind == "s3":
            moto: MotoServer = request.getfixturevalue("s3_env")
            bucket = moto.new_bucket()
            moto.put_tree(bucket, files, prefix="deps", acl=options.get("acl"))
            return parse_repository_url(f"s3://{bucket}/deps"), moto
        raise ValueError(kind)

    return make
