"""Hostile deployments (issue 12): files too large to read (``/dev/zero``), NUL bytes in path-like fields.

One deployment parser (:mod:`ion.services.deploy.spec`) answers for ``ion-deploy`` (exit 2, one ``Error:``
line each) and for the Deploy service (400 naming the item and the key); nothing runs, nothing is written.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from ion.services.deploy.spec import (
    DEFAULT_MAX_DEPLOYMENT_BYTES,
    DeploymentError,
    load_deployment,
    parse_deployment,
)
from tests.services.deploy.scenario_support import run_main

ROOT = Path(__file__).resolve().parents[2]
NUL_KEYS = ["destination", "name", "platform", "version"]


def an_item(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    item = {"name": "notes", "version": "1.0", "platform": "linux", "destination": str(tmp_path / "dest/notes")}
    item.update(changes)
    return item


def with_nul(key: str, tmp_path: Path) -> dict[str, Any]:
    value = str(tmp_path / "dest/no\x00tes") if key == "destination" else "no\x00tes"
    return an_item(tmp_path, **{key: value})


# -- size ----------------------------------------------------------------------------------------------
def test_the_default_limit_is_64_mib() -> None:
    assert DEFAULT_MAX_DEPLOYMENT_BYTES == 64 << 20
    from ion.testing import test_config

    assert test_config().get("ion.services.deploy", "max_deployment_bytes") == 64 << 20


def test_a_device_that_never_ends_is_read_up_to_the_limit_only() -> None:
    """``/dev/zero`` (size 0 to stat): at most limit + 1 bytes are read, then a DeploymentError naming the
    limit and its key."""
    with pytest.raises(DeploymentError) as info:
        load_deployment("/dev/zero", max_bytes=4096)
    [problem] = info.value.problems
    assert problem.startswith("/dev/zero: ") and "4096 bytes" in problem and "max_deployment_bytes" in problem


def test_a_regular_file_over_the_limit_is_refused_from_its_size(tmp_path: Path) -> None:
    """A (sparse) file one byte over 64 MiB: refused from its size, not read (the message gives the size)."""
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(DEFAULT_MAX_DEPLOYMENT_BYTES + 1)
    code, out, err = run_main(str(big))
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert f"is {DEFAULT_MAX_DEPLOYMENT_BYTES + 1} bytes" in lines[0] and "64 MiB" in lines[0], err
    assert "max_deployment_bytes" in lines[0] and "Traceback" not in err


def test_ion_deploy_dev_zero_exits_2_with_one_error_line(tmp_path: Path) -> None:
    """``ion-deploy /dev/zero`` in a child process held to 1 GiB of memory: exit 2 and one ``Error:`` line
    naming the 64 MiB limit, not a MemoryError (or the machine's memory exhausted)."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "ion.services.deploy.cli", "/dev/zero"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, preexec_fn=limit_memory, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: /dev/zero: "), done.stderr
    assert "64 MiB" in lines[0] and "max_deployment_bytes" in lines[0]


# -- NUL bytes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", NUL_KEYS)
def test_a_nul_byte_in_a_path_like_field_is_a_problem_naming_the_item_and_the_key(key: str, tmp_path: Path) -> None:
    with pytest.raises(DeploymentError) as info:
        parse_deployment([{"url": "file:repo", "items": [with_nul(key, tmp_path)]}], source="d.json",
                         base_dir=tmp_path)
    [problem] = info.value.problems
    assert problem.startswith("d.json: repository #1 (file:repo), item #1") and f"'{key}'" in problem, problem
    assert "\x00" not in problem  # shown escaped


def test_a_nul_byte_in_the_url_is_a_problem() -> None:
    with pytest.raises(DeploymentError) as info:
        parse_deployment([{"url": "http://example.org/\x00x", "items": [
            {"name": "n", "version": "1", "platform": "p", "destination": "d"}]}], source="d.json")
    [problem] = info.value.problems
    assert "'url'" in problem and "NUL" in problem and "\x00" not in problem


@pytest.mark.parametrize("key", NUL_KEYS)
def test_ion_deploy_exits_2_on_a_nul_byte(key: str, tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    deployment = tmp_path / "d.json"
    deployment.write_text(json.dumps([{"url": "file:repo", "items": [with_nul(key, tmp_path)]}]))
    code, out, err = run_main(str(deployment))
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and f"'{key}'" in lines[0], err
    assert "item #1" in lines[0] and "Traceback" not in err


# -- the Deploy service -------------------------------------------------------------------------------------
async def deploy_client(container_factory: Any, tmp_path: Path, **deploy: Any) -> Any:
    from ion.services.deploy.service import DeployClient
    from ion.testing import client_process

    cache_root = tmp_path / "cache"
    (tmp_path / "dest").mkdir(exist_ok=True)
    (tmp_path / "repo").mkdir(exist_ok=True)
    section = {"allowed_destinations": [str(tmp_path / "dest")], "allowed_file_repositories": [str(tmp_path)],
               "job_dir": False}
    section.update(deploy)
    container = await container_factory(config={
        "ion.services.cache": {"root": str(cache_root), "host_id": "test-host"},
        "ion.services.unpack": {"allowed_roots": [str(cache_root)]},
        "ion.services.deploy": section,
    })
    await container.app_manager.start_app("deploy")
    return DeployClient(await client_process(container))


@pytest.mark.parametrize("key", NUL_KEYS)
@pytest_twisted.ensureDeferred
async def test_the_service_answers_a_nul_byte_with_a_400_naming_the_item_and_the_key(
        key: str, container_factory: Any, tmp_path: Path) -> None:
    """Before: a 500 with a traceback (``embedded null byte`` from realpath). Now: 400; nothing is written."""
    from ion.core.exceptions import ReceivedApplicationError

    client = await deploy_client(container_factory, tmp_path)
    item = dict(with_nul(key, tmp_path), url=f"file://{tmp_path}/repo")
    with pytest.raises(ReceivedApplicationError) as info:
        await client.rpc_send("deploy", {"source": "d.json", "items": [item]})
    assert info.value.response_code == 400, info.value.message
    assert f"'{key}'" in info.value.message and "item #1" in info.value.message, info.value.message
    assert "Traceback" not in info.value.message
    assert list((tmp_path / "dest").iterdir()) == []


@pytest.mark.parametrize("op", ["deploy", "deploy_async"])
@pytest_twisted.ensureDeferred
async def test_the_service_refuses_a_deployment_over_the_limit_with_a_400(op: str, container_factory: Any,
                                                                         tmp_path: Path) -> None:
    """``max_deployment_bytes`` (container config, 4 KiB here): a bigger request is a 400 naming the limit and
    its key; nothing runs."""
    from ion.core.exceptions import ReceivedApplicationError

    client = await deploy_client(container_factory, tmp_path, max_deployment_bytes=4096)
    items = [dict(an_item(tmp_path, name=f"n{i}", destination=str(tmp_path / f"dest/{'x' * 100}{i}")),
                  url=f"file://{tmp_path}/repo") for i in range(40)]
    with pytest.raises(ReceivedApplicationError) as info:
        await client.rpc_send(op, {"source": "d.json", "items": items})
    assert info.value.response_code == 400
    assert "4096 bytes" in info.value.message and "max_deployment_bytes" in info.value.message, info.value.message
    assert list((tmp_path / "dest").iterdir()) == []
    # Under the limit, the same service takes a request (the missing version fails that item, no more).
    content, _ = await client.rpc_send("deploy", {"source": "d.json", "items": items[:1]})
    assert content["items"][0]["state"] == "failed"


@pytest_twisted.ensureDeferred
async def test_spawn_args_may_lower_the_limit_but_never_raise_it(container_factory: Any, process_factory: Any,
                                                                  tmp_path: Path) -> None:
    """``max_deployment_bytes`` is a security bound: a Deploy process spawned with a larger one fails to spawn."""
    from ion.core.exceptions import ConfigurationError
    from ion.services.deploy.service import DeployService

    with pytest.raises(ConfigurationError, match="may only be narrowed") as info:
        await process_factory(DeployService, max_deployment_bytes=DEFAULT_MAX_DEPLOYMENT_BYTES + 1, job_dir=False)
    assert "max_deployment_bytes" in str(info.value)
    proc = await process_factory(DeployService, max_deployment_bytes=1000, job_dir=False)
    assert proc.max_deployment_bytes == 1000
