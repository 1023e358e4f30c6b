"""Fault suite: RabbitMQ restarts in the middle of a deploy that spans containers (issue 6).

Container A (``deploy.app``) and container B (``fetch.app``) run in child
processes on the test RabbitMQ and share one cache; this test's container asks
A for an async deploy of three dependencies from an HTTP repository that holds
one file back. The broker stops and starts while that file is being fetched.
The job must end (never RUNNING for ever), and whole: the fetch cut off by the
restart is asked again once the Deploy service has reconnected.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from ion.core.messaging.amqp import AmqpTransport
from ion.services.deploy.service import DeployClient
from ion.services.deploy.spec import load_deployment
from ion.testing import ContainerFactory, client_process
from ion.testing.pytest_plugin import require_managed_broker
from ion.testing.servers import write_tree
from tests.core.test_multicontainer import SYSNAME, Launcher, launch  # noqa: F401 - the fixture, by name

from .scenario_support import (  # noqa: F401 - http_servers: the fixture, by name
    CONTENT,
    PLAIN,
    ZIP,
    GatedHTTPServer,
    files_named,
    http_servers,
    item,
    tree,
    write_deployment,
)

pytestmark = [pytest.mark.amqp, pytest.mark.slow]

#: Func's job codes: RUNNING and PARTIAL (some parts done) mean still running.
RUNNING, FINISHED, PARTIAL = 0, 1, 3


async def _job_done(deploy: DeployClient, job: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = await deploy.job_status(job)
            if status["status"] not in (RUNNING, PARTIAL):
                return status  # type: ignore[no-any-return]
        except Exception:
            pass  # the client's own connection may still be coming back
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} still running after {timeout:g} s")
        await task.deferLater(reactor, 0.2, lambda: None)


@pytest_twisted.ensureDeferred
async def test_broker_restart_during_a_multi_container_deploy(launch: Launcher, amqp_url: str,  # noqa: F811
                                                              rabbitmq: Any, tmp_path: Path,
                                                              http_servers: Any) -> None:  # noqa: F811
    require_managed_broker(rabbitmq, "restart")
    www = tmp_path / "www"
    write_tree(www / "deps", CONTENT)
    server: GatedHTTPServer = http_servers(www)
    gate = server.hold(f"deps/{ZIP}")
    cache, dest = tmp_path / "cache", tmp_path / "dest"
    settings = ",".join([
        f"ion.services.cache.root='{cache}'", "ion.services.cache.host_id='restart-host'",
        "ion.services.cache.lock_lease=5", f"ion.services.unpack.allowed_roots=['{cache}']",
        f"ion.services.deploy.allowed_destinations=['{dest}']", "ion.services.fetch.retry_delay=0",
        "ion.services.fetch.allowed_networks=['127.0.0.0/8','::1/128']",
        "ion.core.messaging.reconnect_max=1", "ion.core.process.terminate_timeout=1"])
    a = await launch("res/apps/deploy.app", args=["-a", settings], name="container A (deploy)")
    b = await launch("res/apps/fetch.app", args=["-a", settings], name="container B (fetch)")
    deployment_file = write_deployment(tmp_path / "deploy.json", f"{server.url}/deps", [
        item("zlib", "1.2", dest / "zlib"), item("tool", "3.0", dest / "tool"), item("notes", "1.0", dest / "notes")])
    deployment = load_deployment(deployment_file)
    factory = ContainerFactory(broker_url=amqp_url)
    broker_down = False
    try:
        client = await factory(sysname=SYSNAME, transport=AmqpTransport(amqp_url, reconnect_initial=0.2,
                                                                        reconnect_max=1.0))
        deploy = DeployClient(await client_process(client))
        job = await deploy.deploy_async(deployment)
        await server.wait_held(f"deps/{ZIP}")

        marks = {c.name: len(c.lines) for c in (a, b)}
        broker_down = True
        await threads.deferToThread(rabbitmq.stop_app)
        for c in (a, b):
            await c.wait_for(r"lost the connection to broker at ", after=marks[c.name])
        await threads.deferToThread(rabbitmq.start_app)
        broker_down = False
        for c in (a, b):
            await c.wait_for(r"connection to the broker restored", 60, after=marks[c.name])
        gate.callback(None)

        status = await _job_done(deploy, job)
        results = list(status["results"].values())
        # The tool item's fetch was a call in flight when the broker went: it failed at once (503,
        # connection lost) and the Deploy service asked again once reconnected: the job finished whole.
        assert status["status"] == FINISHED and len(results) == 3, status
        assert {r["state"] for r in results} <= {"cached", "downloaded"}, status
        print(f"\njob after the broker restart: {status['state']}; "
              f"{[(r['item'], r['state']) for r in results]}")
        assert tree(dest / "notes") == {"notes.txt": CONTENT[PLAIN]}
        assert tree(dest / "zlib")["zlib/include/zlib.h"] == b"/* zlib 1.2 */\n"
        assert tree(dest / "tool")["tool/bin/tool"] == b"#!/bin/sh\necho tool\n"
        assert not files_named(cache, "*.lock"), files_named(cache, "*.lock")  # (a walk a late cleanup cannot break)
    finally:
        if broker_down:
            await threads.deferToThread(rabbitmq.start_app)
        await factory.teardown()
    for c in (a, b):
        assert await c.stop() == 0, c.output
        assert "Traceback" not in c.output, c.output
