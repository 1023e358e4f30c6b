"""The deployer's records: one home below the Deploy and Fetch services, one validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ion.services.deploy.spec import DeploymentError, item_from_dict, parse_deployment
from ion.services.fetch.core import FetchRequest
from ion.services.fetch.errors import InvalidRequestError
from ion.services.records import deployer as records

ROOT = Path(__file__).resolve().parents[3]
GOOD = {"url": "s3://bkt/deps", "platform": "linux", "name": "zlib", "version": "1.2"}


def _imported_after(module: str) -> list[str]:
    code = (f"import sys, json; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('ion.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(out.stdout)
    return loaded


@pytest.mark.parametrize("module", ["ion.services.fetch", "ion.services.fetch.core", "ion.services.fetch.service",
                                    "ion.services.fetch.repository", "ion.services.records.deployer"])
def test_fetch_and_the_records_import_nothing_of_deploy(module: str) -> None:
    """No package cycle: the Fetch service and the records load without ``ion.services.deploy``."""
    loaded = _imported_after(module)
    assert module in loaded
    assert [m for m in loaded if m.startswith("ion.services.deploy")] == []
    if module.startswith("ion.services.records"):
        assert [m for m in loaded if m.startswith("ion.services.fetch")] == []


def test_the_old_names_stay_importable() -> None:
    """deploy.spec and fetch.core re-export the records they used to define."""
    from ion.services.deploy import spec
    from ion.services.fetch import core

    assert spec.DeploymentItem is records.DeploymentItem and spec.RepositoryURL is records.RepositoryURL
    assert spec.parse_repository_url is records.parse_repository_url and spec.ITEM_KEYS is records.ITEM_KEYS
    assert core.FetchResult is records.FetchResult and issubclass(core.FetchRequest, records.FetchRequest)


@pytest.mark.parametrize("sha", ["abc", "A" * 63, "g" * 64, {"a.bin": "0" * 10}, {"../x": "0" * 64}, [], 5, {}])
def test_a_bad_sha256_is_refused_by_the_file_and_the_request_alike(sha: object) -> None:
    """The deployment parser and ``FetchRequest.from_wire`` answer a bad sha256 with the same reason."""
    with pytest.raises(DeploymentError) as by_file:
        parse_deployment([{"url": GOOD["url"], "items": [dict(GOOD, destination="/d", sha256=sha)]}],
                         source="d.json")
    with pytest.raises(InvalidRequestError) as by_request:
        FetchRequest.from_wire(dict(GOOD, sha256=sha))
    assert by_request.value.code == 400
    (problem,) = by_file.value.problems
    assert problem.endswith(str(by_request.value)), (problem, str(by_request.value))


@pytest.mark.parametrize("key, value", [("name", "a/b"), ("version", ".."), ("platform", ""), ("name", 3),
                                        ("unpack", "false"), ("keep_updated", 1)])
def test_a_bad_key_is_refused_with_the_same_reason(key: str, value: object) -> None:
    with pytest.raises(DeploymentError) as by_file:
        parse_deployment([{"url": GOOD["url"], "items": [dict(GOOD, destination="/d", **{key: value})]}],
                         source="d.json")
    with pytest.raises(InvalidRequestError) as by_request:
        FetchRequest.from_wire(dict(GOOD, **{key: value}))
    assert any(p.endswith(str(by_request.value)) for p in by_file.value.problems), (by_file.value.problems,
                                                                                    str(by_request.value))


def test_an_item_becomes_the_same_request_by_record_or_by_wire() -> None:
    """item -> request directly, or item -> dict -> request (as a Deploy request's item travels): equal."""
    item = item_from_dict(dict(GOOD, destination="/opt/z", sha256="AB" * 32, unpack=False, position="r #1, i #2"))
    direct = FetchRequest.from_item(item)
    assert FetchRequest.from_wire(item.to_dict()) == direct == FetchRequest.from_wire(direct.to_wire())
    assert direct.sha256 == "ab" * 32 and direct.label == "r #1, i #2" and not direct.unpack


def test_a_record_error_lists_every_problem() -> None:
    with pytest.raises(records.RecordError) as info:
        records.FetchRequest.from_wire(dict(GOOD, name="", unpack="yes", sha256="x"))
    assert len(info.value.problems) == 3 and str(info.value).count(";") == 2
