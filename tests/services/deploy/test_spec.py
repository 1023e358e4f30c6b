"""Deployment files are read as Umpire wrote them and every problem is reported at once.

Bad files (invalid JSON, wrong types, missing and unknown keys, unset variables, path
components that escape...) are cases of ``tests/hostile/deployment_files.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ion.services.deploy.spec import (
    DeploymentError,
    load_deployment,
    parse_deployment,
    parse_repository_url,
)

UMPIRE_EXAMPLE = [
    {
        "url": "s3://umpire-test/",
        "items": [
            {"name": "test", "version": "test_tgz", "platform": "test", "keep_updated": True,
             "link": False, "destination": "$ENVIRONMENT_VARIABLE/destination"},
            {"name": "test", "version": "test_zip", "platform": "test", "keep_updated": True,
             "destination": "./destination"},
        ],
    }
]


def write(tmp_path: Path, data: object, name: str = "deployment.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def problems_of(data: object, tmp_path: Path, **kwargs) -> list[str]:
    with pytest.raises(DeploymentError) as info:
        parse_deployment(data, source="d.json", base_dir=tmp_path, cwd=tmp_path, environ=kwargs.get("environ", {}))
    return info.value.problems


def test_umpire_example_reads_unchanged(tmp_path):
    """Umpire's README example parses with its defaults and flags."""
    dep = parse_deployment(UMPIRE_EXAMPLE, source="d.json", cwd=tmp_path,
                           environ={"ENVIRONMENT_VARIABLE": "/opt/x"})
    first, second = dep.items
    assert first.repository.scheme == "s3" and first.repository.location == "umpire-test"
    assert first.destination == Path("/opt/x/destination")
    assert (first.link, first.unpack, first.keep_updated) == (False, True, True)
    assert second.destination == tmp_path / "destination"
    assert (second.link, second.unpack, second.keep_updated) == (True, True, True)
    assert first.label == "test/test/test_tgz" and first.position == "repository #1, item #1"
    assert dep.warnings == []


def test_missing_file_is_a_clear_error(tmp_path):
    """A deployment file that does not exist is named in the error."""
    with pytest.raises(DeploymentError, match="cannot read the deployment file"):
        load_deployment(tmp_path / "nope.json")


def test_sha256_forms(tmp_path):
    """sha256 is one hex digest or {file: digest}; anything else is an error."""
    good = "a" * 64
    ok = [{"url": "s3://b", "items": [
        {"name": "a", "version": "1", "platform": "p", "destination": "d", "sha256": good.upper()},
        {"name": "b", "version": "1", "platform": "p", "destination": "d", "sha256": {"lib/x.so": good}},
    ]}]
    dep = parse_deployment(ok, source="d.json", cwd=tmp_path, environ={})
    assert dep.items[0].sha256 == good and dep.items[1].sha256 == {"lib/x.so": good}
    bad = [{"url": "s3://b", "items": [
        {"name": "a", "version": "1", "platform": "p", "destination": "d", "sha256": "abc"},
        {"name": "b", "version": "1", "platform": "p", "destination": "d", "sha256": {"../x": good}},
    ]}]
    assert len(problems_of(bad, tmp_path)) == 2


def test_repository_urls(tmp_path):
    """s3, http(s) and file URLs parse; file:relative resolves against the deployment's folder."""
    s3 = parse_repository_url("s3://bucket/some/prefix/")
    assert (s3.location, s3.prefix) == ("bucket", "some/prefix")
    assert s3.child("linux", "zlib", "1.2") == "s3://bucket/some/prefix/linux/zlib/1.2"
    http = parse_repository_url("https://example.test:8443/repo")
    assert (http.scheme, http.location, http.prefix) == ("https", "example.test:8443", "repo")
    rel = parse_repository_url("file:repo", base_dir=tmp_path)
    assert rel.location == str(tmp_path / "repo")
    absolute = parse_repository_url("file:///srv/repo")
    assert absolute.child("p", "n", "v") == "/srv/repo/p/n/v"
    for bad in ("s3://", "http:///x", "ftp://x/y", "file://otherhost/x", ""):
        with pytest.raises(ValueError):
            parse_repository_url(bad)


def test_relative_file_url_in_a_file(tmp_path):
    """load_deployment resolves file:relative against the deployment file's folder."""
    sub = tmp_path / "conf"
    sub.mkdir()
    path = write(sub, [{"url": "file:repo", "items": [{"name": "a", "version": "1", "platform": "p",
                                                        "destination": "out"}]}])
    dep = load_deployment(path, cwd=tmp_path, environ={})
    assert dep.items[0].repository.location == str(sub / "repo")
    assert dep.items[0].destination == tmp_path / "out"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["url", "items", "name", "version", "platform", "destination", "link", "unpack",
                         "keep_updated", "sha256", "x"]), children, max_size=6),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parser_only_raises_its_documented_error(data):
    """Whatever JSON it is given, the parser returns a Deployment or raises DeploymentError."""
    try:
        parse_deployment(data, source="d.json", cwd=Path("/tmp"), environ={})
    except DeploymentError as exc:
        assert exc.problems
