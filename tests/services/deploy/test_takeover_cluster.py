"""A deploy job when the node its owner is connected to dies (issue #18), on the 3-node cluster.

Two containers running deploy.app (each connected to its own node: 1 and 2) share one cache folder,
hence one job store; a client container on node 0 starts an async job whose second download is held.
The node of the job's owner is killed (``kill -9``): the owner lives on and reconnects to another node.

- With a takeover grace longer than that reconnection, the other instance must not take the job over (it
  judges an owner by the consumers of its process queue, which the owner declares again within a second),
  and the owner asks again for the fetches the loss cut off: the job finishes whole under its owner.
- With no grace, the other instance takes the job over while the owner reconnects; the owner, back, stops
  its part, and the job finishes whole under the other instance. Its calls go out at once, while the
  quorum service queues led from the dead node elect new leaders: RabbitMQ refuses them (basic.nack) on a
  channel that had not sent to those queues before, and they are sent again on a new channel.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.core.test_cluster import FAST_RECONNECT, rotated, until

from . import scenario_support
from .scenario_support import TGZ, deploy_held, job_ended, system_config

pytestmark = [pytest.mark.amqp, pytest.mark.cluster]


async def _owners_node_dies(cluster: Any, cluster_urls: list[str], make_repo: Any, tmp_path: Path,
                            log_events: list[dict[str, Any]], *, taken_over: bool) -> None:
    """The scenario of the module notes; ``taken_over``: with no takeover grace (else 10 s)."""
    from ion.services.deploy.service import JOB_SEP, DeployClient
    from ion.testing import ContainerFactory, client_process

    url, server = make_repo("http")
    gate = server.hold(f"deps/{TGZ}")
    (tmp_path / "dest").mkdir()
    (tmp_path / "repos").mkdir()
    dest = tmp_path / "dest"
    sysname = f"clusterjob{os.getpid()}"
    # The owner's reconnection to another node (its queues declared again) takes 0.5-1 s here, more on a
    # loaded machine: a 10 s grace keeps its job; none lets the other instance take it at its next scan.
    deploy = {"takeover_interval": 0.2, "takeover_grace": 0.0} if taken_over else {
        "takeover_interval": 0.5, "takeover_grace": 10.0}
    config = {**system_config(tmp_path, **deploy), "ion.core.messaging": FAST_RECONNECT,
              "ion.core.process": {"terminate_timeout": 1}}
    # A cache lock granted over messages to a call cut off by the loss is freed once its lease runs out
    # (60 s by default): short here, so that the deployment run again does not wait a minute for it.
    config["ion.services.cache"]["lock_lease"] = 3
    factory = ContainerFactory(broker_url=cluster_urls)
    killed: int | None = None
    status: dict[str, Any] = {}
    try:
        deployers = []
        for node in (1, 2):
            container = await factory(sysname=sysname, broker_url=rotated(cluster_urls, node), config=config)
            await container.app_manager.start_app("deploy")
            deployers.append(container)
        client_container = await factory(sysname=sysname, broker_url=rotated(cluster_urls, 0), config=config)
        client = DeployClient(await client_process(client_container))
        events = await scenario_support.event_sink(client_container)
        job = await deploy_held(client, url, server, tmp_path, dest)
        owner_id = job.split(JOB_SEP, 1)[0].rsplit(".", 1)[0]
        [owner] = [c for c in deployers if c.id == owner_id]
        [other] = [c for c in deployers if c is not owner]
        other_deploy = next(p for p in other.proc_manager.processes.values() if type(p).__name__ == "DeployService")
        scans = [0]
        scan = other_deploy.jobs.scan

        def counted_scan() -> Any:
            scans[0] += 1
            return scan()

        other_deploy.jobs.scan = counted_scan
        killed = cluster.ports.index(owner.transport.url.port)
        cluster.kill_node(killed)
        await until(lambda: owner.transport.connected, what="the owner reconnected")
        if taken_over:
            await events.wait(lambda e: e.get("job") == job and e.get("phase") == "takeover")
        else:
            seen = scans[0]
            await until(lambda: scans[0] >= seen + 6, what="six takeover scans of the other instance")
        gate.callback(None)
        # (Up to 90 s: on a loaded machine a cut-off call can wait out its timeout before it is asked again;
        # a rehearsal under extra load found it still RUNNING at 30 s. The job must still end FINISHED, whole.)
        status = await job_ended(client, job, polls=1800, every=0.05)
        takeovers = [e for e in events.events if e.get("job") == job and e.get("phase") == "takeover"]
        if taken_over:
            [takeover] = status["takeovers"]
            assert takeover["by"]["process"] == other_deploy.id and len(takeovers) == 1, status
        else:
            assert not status.get("takeovers") and not takeovers, status
        # The calls in flight at the loss failed at once (503, connection lost); their caller asked again
        # (the owner once reconnected to another node, or the instance that took the job over), and the
        # job finished whole.
        assert status["state"] == "FINISHED", status
        assert {r["state"] for r in status["results"].values()} <= {"downloaded", "cached"}, status
        assert (dest / "zlib" / "zlib" / "include" / "zlib.h").exists()
        await threads.deferToThread(cluster.restart_node, killed)
        killed = None
    except BaseException:
        # On a failure, the containers' logs, calls and threads go to the report: a node loss's races are read there.
        print(f"STATUS {status!r}")
        scenario_support.report_system(factory.containers, log_events)
        raise
    finally:
        await factory.teardown()
        if killed is not None:
            await threads.deferToThread(cluster.restart_node, killed)


@pytest_twisted.ensureDeferred
async def test_a_job_stays_with_its_owner_when_the_owners_node_dies(rabbitmq_cluster: Any, cluster_urls: list[str],
                                                                    make_repo: Any, tmp_path: Path,
                                                                    log_events: list[dict[str, Any]]) -> None:
    """The owner loses its node mid-job and reconnects to another within the takeover grace: the other
    instance scans the job records all along and takes nothing over; the job ends under its owner, whole."""
    await _owners_node_dies(rabbitmq_cluster, cluster_urls, make_repo, tmp_path, log_events, taken_over=False)


@pytest_twisted.ensureDeferred
async def test_a_job_taken_over_while_its_owner_reconnects_ends_whole(rabbitmq_cluster: Any,
                                                                      cluster_urls: list[str], make_repo: Any,
                                                                      tmp_path: Path,
                                                                      log_events: list[dict[str, Any]]) -> None:
    """The owner loses its node mid-job; with no takeover grace the other instance takes the job over
    before the owner is back (which then stops its part); the job ends under the other instance, whole,
    its calls sent while the queues of the dead node elected new leaders."""
    await _owners_node_dies(rabbitmq_cluster, cluster_urls, make_repo, tmp_path, log_events, taken_over=True)
