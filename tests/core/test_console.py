"""The web console (ion.core.console): its JSON API over real HTTP against real containers, its event
stream, the operator token, and the page itself in a real browser (headless Chromium driven by selenium).

The browser tests need Debian's ``chromium`` and ``chromium-driver`` (``bin/test`` installs them when
missing) and selenium; without them they skip, and fail when CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task, threads

from ion.core.agent import agent_queue
from ion.core.container import Container
from ion.core.process import Process, Receiver
from ion.core.security import control
from ion.core.service import ServiceProcess
from ion.testing import ContainerFactory, on_ci
from ion.testing.asyncfixtures import async_yield_fixture

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def http_config(tmp_path: Path, name: str = "c1", **http: Any) -> dict[str, Any]:
    """The HTTP port on any free port, the token file and the audit file in ``tmp_path``."""
    return {"ion.core.http": {"port": 0, "token_file": str(tmp_path / f"{name}.token"), **http},
            "ion.core.audit": {"path": str(tmp_path / f"{name}-audit.jsonl")}}


async def get(url: str) -> tuple[int, bytes, str]:
    response = await treq.get(url, persistent=False)
    return response.code, await response.content(), (response.headers.getRawHeaders("content-type") or [""])[0]


async def get_json(url: str) -> tuple[int, Any]:
    code, body, _ = await get(url)
    return code, json.loads(body)


async def post(url: str, body: Any, token: str | None = None) -> tuple[int, Any]:
    headers = {"content-type": ["application/json"]}
    if token is not None:
        headers["authorization"] = [f"Bearer {token}"]
    response = await treq.post(url, data=json.dumps(body).encode(), headers=headers, persistent=False)
    return response.code, json.loads(await response.content())


async def wait_for(check: Callable[[], Any], what: str, limit: float = 20.0) -> Any:
    """Poll ``check()`` (sync or async) every 50 ms until it answers non-None; fail after ``limit`` s."""
    for _ in range(int(limit / 0.05)):
        found = check()
        if isinstance(found, defer.Deferred) or hasattr(found, "__await__"):
            found = await found
        if found is not None:
            return found
        await task.deferLater(reactor, 0.05, lambda: None)
    pytest.fail(f"timed out waiting for {what}")


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def two_containers(factory: ContainerFactory, tmp_path: Path) -> tuple[Container, Container]:
    """c1 with the console, c2 without a port, on one embedded broker; c1's agent knows c2."""
    c1 = await factory(config=http_config(tmp_path, "c1"))
    c2 = await factory(config={"ion.core.audit": {"path": str(tmp_path / "c2-audit.jsonl")}})
    agent = c1.proc_manager.get(c1.agent_pid)
    await agent.wait_for_node(c2.id, timeout=10)
    return c1, c2


class Parent(Process):
    """Spawns one child, so the tree has depth."""

    name = "parent"

    async def slc_activate(self) -> None:  # type: ignore[override]
        await self.spawn_child(Process, name="child")


class FakeNode(Process):
    """Answers ``ps`` as the agent of a container ``fake-node`` with many processes would."""

    rows: list[dict[str, Any]] = []

    def receivers_to_create(self) -> list[Receiver]:
        return super().receivers_to_create() + [Receiver(self, agent_queue(self.sysname, "fake-node"), self._receive)]

    def op_ps(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return FakeNode.rows


def fake_rows(n: int) -> list[dict[str, Any]]:
    """``n`` process rows: parents of 99 children each."""
    rows = []
    for i in range(n):
        parent = None if i % 100 == 0 else f"fake-node.{i - i % 100}"
        rows.append({"pid": f"fake-node.{i}", "name": f"worker-{i}", "class": "Process", "module": "fake",
                     "state": "ACTIVE", "parent": parent})
    return rows


async def add_fake_node(c1: Container, n: int) -> None:
    FakeNode.rows = fake_rows(n)
    await c1.spawn(FakeNode, name="fake-agent")
    c1.publish_event("container.heartbeat", {"container": "fake-node", "sysname": c1.sysname, "pids": n,
                                             "started_at": time.time(), "interval": 60.0,
                                             "agent": agent_queue(c1.sysname, "fake-node")})
    await c1.proc_manager.get(c1.agent_pid).wait_for_node("fake-node", timeout=10)


class FakeCache(ServiceProcess):
    """The Cache service's read ops and ``verify_round`` over a made-up cache of ``entries`` entries."""

    service_name = "cache"
    entries = 10_000
    rounds = 0

    def op_list(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return {"root": "/cache", "entries": [
            {"key": {"name": f"dep{i:05d}", "version": "1.0", "platform": "any", "repo_id": "r", "unpack": False},
             "size": 1000 + i, "files": {"a": {}}, "last_used": 1.0e9, "fetched_at": 1.0e9, "url": None}
            for i in range(self.entries)]}

    def op_verify_report(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        bad = {"key": {"name": "dep00007", "version": "1.0"}, "outcome": "good→bad", "action": "quarantined",
               "moved_to": "/cache/quarantine/dep00007", "problems": {"a": "sha256 differs"}}
        return {"started": 1.0e9, "finished": 1.0e9 + 5, "trigger": "schedule",
                "outcomes": [{"outcome": "good"}] * 3 + [bad]}

    @control("cache.verify")
    def op_verify_round(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        FakeCache.rounds += 1
        return {"entries": []}


class FakeDeploy(ServiceProcess):
    """The Deploy service's ``jobs`` and ``job_cancel``: one job half done."""

    service_name = "deploy"
    cancelled: list[str] = []

    def op_jobs(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return [{"job": "j1", "kind": "deploy", "status": 3, "state": "PARTIAL", "total": 4, "error": None,
                 "results": {"1 a": {"ok": True}, "2 b": {"ok": False}}, "created": 1.0e9, "ended": None}]

    @control("job.cancel")
    def op_job_cancel(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        FakeDeploy.cancelled.append(content["job"])
        return {"job": content["job"], "cancelled": True}


# -- the API -------------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_the_page_and_its_files_are_served(container_factory: Any, tmp_path: Path) -> None:
    container = await container_factory(config=http_config(tmp_path))
    url = container.http.url
    code, body, kind = await get(url + "/")
    assert code == 200 and kind.startswith("text/html") and b"static/app.js" in body
    code, body, kind = await get(url + "/static/app.js")
    assert code == 200 and kind.startswith("text/javascript") and b"EventSource" in body
    code, _, kind = await get(url + "/static/style.css")
    assert code == 200 and kind.startswith("text/css")
    assert (await get(url + "/static/"))[0] == 404
    assert (await get(url + "/api/nosuch"))[0] == 404
    assert (await get(url + "/healthz"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_the_console_can_be_turned_off(container_factory: Any, tmp_path: Path) -> None:
    container = await container_factory(config=http_config(tmp_path, console=False))
    assert (await get(container.http.url + "/"))[0] == 404
    assert (await get(container.http.url + "/api/system"))[0] == 404
    assert not (tmp_path / "c1.token").exists()
    assert not any(p.proc_name == "console" for p in container.proc_manager.processes.values())


@pytest_twisted.ensureDeferred
async def test_without_an_agent_the_console_shows_its_own_container(container_factory: Any, tmp_path: Path) -> None:
    config = http_config(tmp_path)
    config["ion.core.container"] = {"agent": False}
    container = await container_factory(config=config)
    await container.app_manager.start_app("hello")
    code, data = await get_json(container.http.url + "/api/system")
    assert code == 200 and [c["container"] for c in data["containers"]] == [container.id]
    assert [a["app"] for a in data["containers"][0]["apps"]] == ["hello"]
    assert sorted(r["name"] for r in data["processes"]["items"]) == ["console", "hello"]


@pytest_twisted.ensureDeferred
async def test_the_token_file_is_its_owners_only_and_removed_at_stop(tmp_path: Path) -> None:
    factory = ContainerFactory()
    try:
        container = await factory(config=http_config(tmp_path))
        path = tmp_path / "c1.token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        assert token == container.http.console.token and len(token) >= 40
        await container.terminate()
        assert not path.exists()
        # A configured token: no file.
        other = await factory(config=http_config(tmp_path, "c2", token="s3cret-token-of-the-config"))
        assert other.http.console.token == "s3cret-token-of-the-config"
        assert not (tmp_path / "c2.token").exists()
    finally:
        await factory.teardown()


@pytest_twisted.ensureDeferred
async def test_system_shows_two_containers_and_their_process_trees(container_factory: Any, tmp_path: Path) -> None:
    c1, c2 = await two_containers(container_factory, tmp_path)
    await c1.app_manager.start_app("hello")
    await c2.app_manager.start_app("hello")
    parent = await c2.spawn(Parent)
    child = c2.proc_manager.get(parent).children[0].id
    code, data = await get_json(c1.http.url + "/api/system")
    assert code == 200 and data["system"] == c1.sysname and data["container"] == c1.id
    assert {c["container"]: c["local"] for c in data["containers"]} == {c1.id: True, c2.id: False}
    rows = {r["pid"]: r for r in data["processes"]["items"]}
    assert rows[c2.agent_pid]["container"] == c2.id and rows[c2.agent_pid]["class"] == "ContainerAgent"
    assert (rows[parent]["depth"], rows[child]["depth"], rows[child]["parent"]) == (0, 1, parent)
    pids = [r["pid"] for r in data["processes"]["items"]]
    assert pids.index(child) == pids.index(parent) + 1  # a child right under its parent
    here, there = (next(r for r in rows.values() if r["name"] == "hello" and r["container"] == c.id)
                   for c in (c1, c2))
    assert here["app"] == "hello" and here["state"] == "ACTIVE" and here["queues"]
    assert there["app"] == "hello" and there["state"] == "ACTIVE"  # from c2's agent: ps and apps
    for info in data["containers"]:
        assert [(a["app"], a["failed"]) for a in info["apps"]] == [("hello", None)]
        assert len(info["apps"][0]["pids"]) == 1
    code, found = await get_json(c1.http.url + "/api/system?q=child")
    assert [r["pid"] for r in found["processes"]["items"]] == [child]


@pytest_twisted.ensureDeferred
async def test_the_event_stream_tells_a_spawn_and_ends_when_the_container_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ion.core.console

    monkeypatch.setattr(ion.core.console, "HEARTBEAT", 0.1)
    factory = ContainerFactory()
    try:
        c1 = await factory(config=http_config(tmp_path))
        c2 = await factory()
        await c1.proc_manager.get(c1.agent_pid).wait_for_node(c2.id, timeout=10)
        response = await treq.get(c1.http.url + "/api/events", unbuffered=True, persistent=False)
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type")[0].startswith("text/event-stream")
        chunks: list[bytes] = []
        ended = treq.collect(response, chunks.append)
        pid = await c2.spawn(Process, name="newcomer")

        def told() -> Any:
            text = b"".join(chunks).decode()
            return True if "event: process" in text and pid in text else None

        await wait_for(told, "the spawn to reach the event stream")
        event = next(json.loads(block.split("data: ", 1)[1]) for block in b"".join(chunks).decode().split("\n\n")
                     if pid in block and '"ACTIVE"' in block)
        assert event == {"pid": pid, "name": "newcomer", "state": "ACTIVE", "previous": "READY", "container": c2.id}
        await wait_for(lambda: True if b": keep-alive" in b"".join(chunks) else None, "a keep-alive comment")
        await c1.terminate()
        await wait_for(lambda: True if ended.called else None, "the stream to end with the container")
    finally:
        await factory.teardown()


@pytest_twisted.ensureDeferred
async def test_kill_with_the_token_terminates_over_messages_and_is_audited(container_factory: Any,
                                                                          tmp_path: Path) -> None:
    c1, c2 = await two_containers(container_factory, tmp_path)
    victim = await c2.spawn(Process, name="victim")
    code, answer = await post(c1.http.url + "/api/kill", {"pid": victim}, c1.http.console.token)
    assert code == 200 and answer["ok"] is True and answer["result"]["pid"] == victim
    await wait_for(lambda: True if c2.proc_manager.get(victim) is None else None, "the victim to end")
    await c2.audit.flush()
    (entry,) = [r for r in records(tmp_path / "c2-audit.jsonl") if r["action"] == "process.terminate"]
    assert entry["result"] == "ok" and entry["target"] == f"victim ({victim})"
    assert entry["user"] == c1.transport.user and entry["claimed_user"] == "web 127.0.0.1"
    assert entry["sender_name"] == "console"
    # The console saw it (control.* events) and shows it.
    code, audit = await get_json(c1.http.url + "/api/audit")
    assert any(a["target"] == f"victim ({victim})" and a["result"] == "ok" for a in audit["items"])
    # A pid no one has: the call's 404, not a 200.
    code, answer = await post(c1.http.url + "/api/kill", {"pid": victim}, c1.http.console.token)
    assert code == 404 and "no process" in answer["error"]


@pytest_twisted.ensureDeferred
async def test_an_action_without_the_token_is_refused_403_and_audited(container_factory: Any,
                                                                      tmp_path: Path) -> None:
    c1, c2 = await two_containers(container_factory, tmp_path)
    victim = await c2.spawn(Process, name="victim")
    code, answer = await post(c1.http.url + "/api/kill", {"pid": victim})
    assert code == 403 and "no operator token" in answer["error"]
    code, answer = await post(c1.http.url + "/api/kill", {"pid": victim}, "not-the-token")
    assert code == 403 and "wrong operator token" in answer["error"]
    code, answer = await post(c1.http.url + "/api/verify", {}, "")
    assert code == 403
    assert c2.proc_manager.get(victim) is not None
    await c1.audit.flush()
    refused = records(tmp_path / "c1-audit.jsonl")
    assert [(r["action"], r["target"], r["result"], r["code"], r["user"], r["claimed_user"]) for r in refused] == [
        ("process.terminate", victim, "refused", 403, None, "web 127.0.0.1"),
        ("process.terminate", victim, "refused", 403, None, "web 127.0.0.1"),
        ("cache.verify", "cache", "refused", 403, None, "web 127.0.0.1"),
    ]
    assert "no operator token" in refused[0]["error"] and "wrong operator token" in refused[1]["error"]
    assert not records(tmp_path / "c2-audit.jsonl")
    # A GET of a view needs no token.
    assert (await get(c1.http.url + "/api/system"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_2000_processes_are_paged(container_factory: Any, tmp_path: Path) -> None:
    c1 = await container_factory(config=http_config(tmp_path))
    await add_fake_node(c1, 2000)
    started = time.perf_counter()
    code, data = await get_json(c1.http.url + "/api/system?offset=1000&limit=100")
    elapsed = time.perf_counter() - started
    procs = data["processes"]
    assert code == 200 and procs["total"] == 2000 + len(c1.proc_manager.processes)
    assert (procs["offset"], procs["limit"], len(procs["items"])) == (1000, 100, 100)
    fake = [r for r in procs["items"] if r["container"] == "fake-node"]
    assert fake and all(r["depth"] == (0 if r["parent"] is None else 1) for r in fake)
    print(f"\nconsole: /api/system, page 11 of {procs['total']} processes, in {elapsed * 1000:.0f} ms")
    code, last = await get_json(c1.http.url + "/api/system?offset=1990&limit=1000")
    assert len(last["processes"]["items"]) == procs["total"] - 1990
    for bad in ("limit=0", "limit=5000", "offset=-1", "offset=x"):
        code, error = await get_json(c1.http.url + "/api/system?" + bad)
        assert code == 400 and ("offset" in error["error"] or "limit" in error["error"])


@pytest_twisted.ensureDeferred
async def test_10000_cache_entries_are_paged_and_verify_runs_with_the_token(container_factory: Any,
                                                                           tmp_path: Path) -> None:
    c1, c2 = await two_containers(container_factory, tmp_path)
    await c2.spawn(FakeCache)
    FakeCache.rounds = 0
    started = time.perf_counter()
    code, data = await get_json(c1.http.url + "/api/cache?offset=9950&limit=100")
    print(f"\nconsole: /api/cache, the last page of 10,000 entries (a list call over messages), in "
          f"{(time.perf_counter() - started) * 1000:.0f} ms")
    assert code == 200 and data["available"] is True and data["total"] == 10_000
    assert [e["name"] for e in data["items"]] == [f"dep{i:05d}" for i in range(9950, 10_000)]
    assert data["bytes"] == sum(1000 + i for i in range(10_000))
    assert data["verify"]["counts"] == {"good": 3, "good→bad": 1}
    assert data["quarantine"] == [{"name": "dep00007", "version": "1.0", "moved_to": "/cache/quarantine/dep00007",
                                   "problems": {"a": "sha256 differs"}}]
    code, found = await get_json(c1.http.url + "/api/cache?q=dep0999")
    assert found["total"] == 10
    code, answer = await post(c1.http.url + "/api/verify", {}, c1.http.console.token)
    assert code == 200 and FakeCache.rounds == 1


@pytest_twisted.ensureDeferred
async def test_jobs_with_their_progress_and_cancel(container_factory: Any, tmp_path: Path) -> None:
    c1 = await container_factory(config=http_config(tmp_path))
    code, data = await get_json(c1.http.url + "/api/jobs")
    assert code == 200 and data["available"] is False and data["code"] == 404
    await c1.spawn(FakeDeploy)
    FakeDeploy.cancelled = []
    code, data = await wait_for(lambda: _available(c1.http.url + "/api/jobs"), "the jobs")
    assert data["items"] == [{"job": "j1", "kind": "deploy", "state": "PARTIAL", "done": 2, "total": 4,
                              "failed": 1, "error": None, "created": 1.0e9, "ended": None}]
    code, answer = await post(c1.http.url + "/api/job_cancel", {"job": "j1"}, c1.http.console.token)
    assert code == 200 and answer["result"] == {"job": "j1", "cancelled": True} and FakeDeploy.cancelled == ["j1"]
    code, answer = await post(c1.http.url + "/api/job_cancel", {}, c1.http.console.token)
    assert code == 400


async def _available(url: str) -> Any:
    code, data = await get_json(url)
    return (code, data) if data.get("available") else None


class Holder(Process):
    """Holds each ``hold`` request until ``release`` fires."""

    release: defer.Deferred[None]

    def op_hold(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return Holder.release


@pytest_twisted.ensureDeferred
async def test_queues_conversations_and_the_observer(container_factory: Any, tmp_path: Path) -> None:
    c1, c2 = await two_containers(container_factory, tmp_path)
    await c1.app_manager.start_app("observer")
    await c2.app_manager.start_app("observer")
    Holder.release = defer.Deferred()
    holder = await c1.spawn(Holder, name="holder")
    caller = c1.proc_manager.get(await c1.spawn(Process, name="caller"))
    call = caller.rpc_send(holder, "hold", None, timeout=30)
    sent = time.perf_counter()  # both conversations started before this
    try:
        # Held for a measurable time (bounded polling): each age is at least that long.
        await wait_for(lambda: True if time.perf_counter() - sent >= 0.3 else None, "0.3 s to pass")
        code, convs = await get_json(c1.http.url + "/api/convs")
        assert code == 200
        mine = {(r["role"], r["op"]) : r for r in convs["items"] if r["op"] == "hold"}
        assert mine[("initiator", "hold")]["age"] >= 0.3 and mine[("responder", "hold")]["age"] >= 0.3
        assert mine[("initiator", "hold")]["peer"] == holder
        assert mine[("initiator", "hold")]["initiator"] == f"caller ({caller.id})"
        assert mine[("responder", "hold")]["peer"] == f"holder ({holder})"
        assert all(r["age"] is not None and r["age"] >= 0 for r in mine.values())
        assert len({r["trace"] for r in mine.values()}) == 1 and len(mine[("initiator", "hold")]["trace"]) == 32
        assert {r["container"] for r in mine.values()} == {c1.id}
        code, queues = await get_json(c1.http.url + "/api/queues?limit=1000")
        assert queues["depth_known"] is True
        row = next(q for q in queues["items"] if q["queue"] == holder)
        assert row["pid"] == holder and row["consumers"] == 1 and row["depth"] == 0
    finally:
        Holder.release.callback("done")
    await call
    # A conversation answered in the other container: its responder side comes from that container's agent.
    Holder.release = defer.Deferred()
    far = await c2.spawn(Holder, name="far-holder")
    far_call = caller.rpc_send(far, "hold", None, timeout=30)
    try:
        async def far_row() -> Any:
            code, convs = await get_json(c1.http.url + "/api/convs")
            rows = [r for r in convs["items"] if r["role"] == "responder" and r["peer"] == f"far-holder ({far})"]
            return rows[0] if rows else None

        row = await wait_for(far_row, "the other container's responder row")
        assert row["container"] == c2.id and row["op"] == "hold" and isinstance(row["age"], float)
    finally:
        Holder.release.callback("done")
    await far_call
    code, seen = await wait_for(lambda: _observed(c1.http.url + "/api/observer", "hold", 2), "the observers' tails")
    assert sorted(o["container"] for o in seen["observers"]) == sorted([c1.id, c2.id])


async def _observed(url: str, op: str, times: int) -> Any:
    """The observers' tail once ``op`` is in it ``times`` times (once per observer)."""
    code, data = await get_json(url)
    seen = sum(1 for line in data["items"] if f": {op} [" in line["line"] and "events" not in line["line"])
    return (code, data) if seen >= times else None


@pytest_twisted.ensureDeferred
async def test_on_rabbitmq(rabbitmq: Any, amqp_url: str, tmp_path: Path) -> None:
    """Two containers on RabbitMQ: the other's processes come from its agent, a kill goes over the broker;
    the queues listed are this container's, with their depth and consumers as the broker counts them."""
    factory = ContainerFactory(broker_url=amqp_url)
    try:
        c1, c2 = await two_containers(factory, tmp_path)
        victim = await c2.spawn(Process, name="victim")
        code, data = await get_json(c1.http.url + "/api/system")
        assert code == 200 and {c["container"] for c in data["containers"]} == {c1.id, c2.id}
        assert victim in {r["pid"] for r in data["processes"]["items"]}
        code, queues = await get_json(c1.http.url + "/api/queues?limit=1000")
        assert queues["depth_known"] is True and queues["broker"] == "amqp"
        assert {q["queue"] for q in queues["items"]} >= {c1.agent_pid}
        assert all(isinstance(q["depth"], int) and q["consumers"] >= 1 for q in queues["items"]), queues["items"]
        assert not any(q["queue"] == c2.agent_pid for q in queues["items"])
        code, answer = await post(c1.http.url + "/api/kill", {"pid": victim}, c1.http.console.token)
        assert code == 200
        await wait_for(lambda: True if c2.proc_manager.get(victim) is None else None, "the victim to end")
    finally:
        await factory.teardown()


@pytest_twisted.ensureDeferred
async def test_the_real_cache_service_verified_from_the_console(container_factory: Any, tmp_path: Path) -> None:
    """The Cache service itself: its entry listed, a verification run from the console finds it good; once
    damaged, the next one quarantines it and the console lists it there."""
    from ion.services.cache.core import sha256_file
    from ion.services.cache.entry import EntryKey, FileMeta
    from ion.services.cache.service import CacheClient, CacheService

    c1 = await container_factory(config=http_config(tmp_path))
    c2 = await container_factory(config={"ion.services.cache": {"root": str(tmp_path / "cache")}})
    await c1.proc_manager.get(c1.agent_pid).wait_for_node(c2.id, timeout=10)
    await c2.spawn(CacheService, {"host_id": "test-host"})
    cache = CacheClient(c2.proc_manager.get(await c2.spawn(Process, name="filler")))
    key = EntryKey("repo.file", "linux", "tool", "1.0")
    lock = await cache.lock(key, timeout=5)
    staging = Path(await cache.new_staging())
    (staging / "tool").write_bytes(b"v1")
    info = await cache.publish(lock, str(staging), {"tool": FileMeta(2, None, sha256_file(staging / "tool"))})
    await cache.unlock(lock)

    code, data = await get_json(c1.http.url + "/api/cache")
    assert code == 200 and data["available"] and data["root"] == str(tmp_path / "cache")
    assert [(e["name"], e["version"], e["size"], e["files"]) for e in data["items"]] == [("tool", "1.0", 2, 1)]
    assert data["verify"] == {} and data["quarantine"] == []
    token = c1.http.console.token
    assert (await post(c1.http.url + "/api/verify", {}, token))[0] == 200
    code, data = await get_json(c1.http.url + "/api/cache")
    assert data["verify"]["counts"] == {"good": 1} and data["verify"]["trigger"] == "request"
    (info.path / "tool").write_bytes(b"XX")
    assert (await post(c1.http.url + "/api/verify", {}, token))[0] == 200
    code, data = await get_json(c1.http.url + "/api/cache")
    assert data["verify"]["counts"] == {"good→bad": 1} and data["total"] == 0
    (gone,) = data["quarantine"]
    assert (gone["name"], gone["version"]) == ("tool", "1.0") and "quarantine" in gone["moved_to"]


# -- in a browser ------------------------------------------------------------------------------------------------------
def _no_browser(reason: str) -> None:
    if on_ci():
        pytest.fail(f"the console's browser tests need Chromium on CI (CI=true): {reason}", pytrace=False)
    pytest.skip(f"no browser: {reason}")


@async_yield_fixture
async def browser() -> AsyncIterator[Any]:
    """Headless Chromium through selenium and Debian's chromedriver (selenium's own download cannot work
    here). Started in a thread: every selenium call blocks, and the reactor must keep serving the page."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        _no_browser(f"selenium is not installed ({exc})")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(path) or shutil.which(os.path.basename(path))):
            _no_browser(f"{path} is missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1360,900"):
        options.add_argument(arg)
    driver = await threads.deferToThread(webdriver.Chrome, options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        await threads.deferToThread(driver.quit)


def in_thread(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return threads.deferToThread(fn, *args)


def wait_until(driver: Any, condition: Callable[[Any], Any], what: str, limit: float = 20.0) -> Any:
    """Bounded polling by selenium's WebDriverWait (run in a thread)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, limit, poll_frequency=0.1).until(condition)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}") from None


def click(driver: Any, selector: str) -> None:
    """Click the element ``selector`` once it is there (tables are redrawn as events come: an element
    found just before a redraw is stale, and is looked up again)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def clicked(d: Any) -> bool:
        try:
            found = d.find_elements(By.CSS_SELECTOR, selector)
            if not found:
                return False
            found[0].click()
            return True
        except StaleElementReferenceException:
            return False

    wait_until(driver, clicked, selector)


def row(pid: str) -> Callable[[Any], Any]:
    from selenium.webdriver.common.by import By

    def find(driver: Any) -> Any:
        found = driver.find_elements(By.CSS_SELECTOR, f'tr[data-pid="{pid}"]')
        return found[0] if found else False

    return find


def no_row(pid: str) -> Callable[[Any], bool]:
    from selenium.webdriver.common.by import By

    return lambda driver: not driver.find_elements(By.CSS_SELECTOR, f'tr[data-pid="{pid}"]')


@pytest_twisted.ensureDeferred
async def test_the_console_in_a_browser(browser: Any, container_factory: Any, tmp_path: Path) -> None:
    """The page shows the process tree of a two-container system, a spawned process appears without a
    reload, a kill without the token is refused (403, audited) and with it works (audited)."""
    from selenium.webdriver.common.by import By

    c1, c2 = await two_containers(container_factory, tmp_path)
    await c2.app_manager.start_app("hello")
    parent = await c2.spawn(Parent)
    child = c2.proc_manager.get(parent).children[0].id
    await in_thread(browser.get, c1.http.url + "/")
    for pid in (c1.agent_pid, c2.agent_pid, parent, child):
        await in_thread(wait_until, browser, row(pid), f"the process {pid}")
    headers = await in_thread(lambda: [e.text for e in browser.find_elements(By.CSS_SELECTOR, "tr.container td")])
    assert c1.id in headers and c2.id in headers
    indent = await in_thread(lambda: browser.execute_script(
        "return [document.querySelector(arguments[0]).children[1].style.paddingLeft,"
        " document.querySelector(arguments[1]).children[1].style.paddingLeft]",
        f'tr[data-pid="{parent}"]', f'tr[data-pid="{child}"]'))
    assert float(indent[1].rstrip("em")) > float(indent[0].rstrip("em"))
    await in_thread(wait_until, browser, lambda d: "live" == d.find_element(By.ID, "live").text, "the stream live")

    # A spawn shows up without a reload (the mark set on this document survives).
    await in_thread(browser.execute_script, "window.__sameDocument = true")
    newcomer = await c2.spawn(Process, name="newcomer")
    await in_thread(wait_until, browser, row(newcomer), "the spawned process")
    await in_thread(wait_until, browser, lambda d: d.execute_script(
        "const r = document.querySelector(arguments[0]); return r && r.dataset.state === 'ACTIVE'",
        f'tr[data-pid="{newcomer}"]'), "the spawned process ACTIVE")
    assert await in_thread(browser.execute_script, "return window.__sameDocument === true")

    # Kill without the token: 403 on the page, the process lives, the refusal is audited.
    await in_thread(click, browser, f'button.kill[data-pid="{newcomer}"]')
    await in_thread(wait_until, browser, lambda d: "403" in d.find_element(By.ID, "message").text, "the refusal")
    assert c2.proc_manager.get(newcomer) is not None
    await c1.audit.flush()
    assert [(r["action"], r["target"], r["result"]) for r in records(tmp_path / "c1-audit.jsonl")] == [
        ("process.terminate", newcomer, "refused")]

    # With the token: the process ends, its row goes, the target's audit file has it.
    token = c1.http.console.token
    await in_thread(lambda: browser.find_element(By.ID, "token").send_keys(token))
    await in_thread(click, browser, f'button.kill[data-pid="{newcomer}"]')
    await in_thread(wait_until, browser, no_row(newcomer), "the killed process gone")
    assert c2.proc_manager.get(newcomer) is None
    assert "done" in await in_thread(lambda: browser.find_element(By.ID, "message").text)
    await c2.audit.flush()
    (entry,) = [r for r in records(tmp_path / "c2-audit.jsonl") if r["action"] == "process.terminate"]
    assert (entry["result"], entry["claimed_user"], entry["user"]) == ("ok", "web 127.0.0.1", c1.transport.user)
    assert await in_thread(browser.execute_script, "return window.__sameDocument === true")
    # The audit tab shows both.
    await in_thread(click, browser, 'button[data-tab="audit"]')
    await in_thread(wait_until, browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#audittable tbody tr")) >= 2
                    and "refused" in d.find_element(By.ID, "audittable").text, "the audit tab")
    shot = os.environ.get("ION_CONSOLE_SCREENSHOT")
    if shot:
        await in_thread(click, browser, 'button[data-tab="processes"]')
        await in_thread(wait_until, browser, row(parent), "the processes again")
        await in_thread(browser.save_screenshot, shot)


@pytest_twisted.ensureDeferred
async def test_the_first_page_of_2000_processes_renders_in_a_browser(browser: Any, container_factory: Any,
                                                                     tmp_path: Path) -> None:
    """2,000 processes: the page shows the first page of 100 and pages on; the time from navigation to
    the first page shown is printed (measured, not asserted)."""
    from selenium.webdriver.common.by import By

    c1 = await container_factory(config=http_config(tmp_path))
    await add_fake_node(c1, 2000)
    started = time.perf_counter()
    await in_thread(browser.get, c1.http.url + "/")
    await in_thread(wait_until, browser, row("fake-node.0"), "the first page")
    elapsed = time.perf_counter() - started
    timing = await in_thread(browser.execute_script,
                             "const n = performance.getEntriesByType('navigation')[0];"
                             "return [n.domContentLoadedEventEnd, performance.now()]")
    print(f"\nconsole: first page of {2000 + len(c1.proc_manager.processes)} processes shown "
          f"{elapsed * 1000:.0f} ms after navigation (DOMContentLoaded at {timing[0]:.0f} ms)")
    count = await in_thread(lambda: browser.find_element(By.CSS_SELECTOR, '.pager[data-for="processes"] .count').text)
    assert count.endswith(f"of {2000 + len(c1.proc_manager.processes)}")
    await in_thread(click, browser, '.pager[data-for="processes"] .next')
    await in_thread(wait_until, browser, row("fake-node.150"), "the second page")


@pytest_twisted.ensureDeferred
async def test_every_tab_in_a_browser(browser: Any, container_factory: Any, tmp_path: Path) -> None:
    """Each tab shows its view (queues, conversations, jobs with their progress, 10,000 cache entries
    paged, the observer, the audit trail) without a script error; cancel and verify work from the page."""
    from selenium.webdriver.common.by import By

    c1, c2 = await two_containers(container_factory, tmp_path)
    await c2.app_manager.start_app("observer")
    await c2.spawn(FakeCache)
    await c2.spawn(FakeDeploy)
    FakeCache.rounds, FakeDeploy.cancelled = 0, []
    await in_thread(browser.get, c1.http.url + "/")
    await in_thread(wait_until, browser, row(c2.agent_pid), "the processes")
    await in_thread(lambda: browser.find_element(By.ID, "token").send_keys(c1.http.console.token))

    def text(selector: str) -> Callable[[Any], str]:
        return lambda d: d.find_element(By.CSS_SELECTOR, selector).text

    async def show(tab: str, selector: str, expected: str) -> None:
        await in_thread(click, browser, f'button[data-tab="{tab}"]')
        await in_thread(wait_until, browser, lambda d: expected in text(selector)(d), f"{expected!r} in {tab}")

    await show("queues", "#queuetable", c2.agent_pid)
    assert "embedded broker" in await in_thread(text("#queuenote"), browser)
    await show("convs", "#convs", "in flight")
    await show("jobs", "#jobtable", "2/4 · 1 failed")
    await in_thread(click, browser, 'button.cancel[data-job="j1"]')
    await in_thread(wait_until, browser, lambda d: "done" in text("#message")(d), "the cancel done")
    assert FakeDeploy.cancelled == ["j1"]
    await show("cache", '.pager[data-for="cache"]', "1–100 of 10000")
    assert "dep00007" in await in_thread(text("#quarantine"), browser)
    await in_thread(click, browser, ".pager[data-for=\"cache\"] .next")
    await in_thread(wait_until, browser, lambda d: "dep00100" in text("#cachetable")(d), "the second page")
    await in_thread(click, browser, "button.verify")
    await in_thread(wait_until, browser, lambda d: "cache verify: done" in text("#message")(d), "the verify done")
    assert FakeCache.rounds == 1
    await show("observer", "#observerlines", "jobs [rpc/request]")
    await show("audit", "#audittable", "job.cancel")
    assert "cache.verify" in await in_thread(text("#audittable"), browser)
    errors = await in_thread(lambda: [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"])
    assert not errors, errors


# -- hardening --------------------------------------------------------------------------------------------------------
XSS = "<img src=x onerror=\"window.__pwned=sessionStorage.getItem('ion-console-token')||'yes'\">"


class HostileDeploy(FakeDeploy):
    """A ``deploy`` that answers ``jobs`` with markup where numbers and names belong."""

    def op_jobs(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return [{"job": f"j2{XSS}", "kind": XSS, "state": "RUNNING", "total": XSS, "error": XSS,
                 "results": {"1 a": {"ok": True}}, "created": XSS, "ended": None}]


class HostileCache(FakeCache):
    """A ``cache`` whose entries have sizes that are not integers, and markup in its report."""

    def op_list(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        sizes: list[Any] = [XSS, None, 5, 2.5, True, "7", 11]
        return {"root": XSS, "entries": [
            {"key": {"name": f"dep{i}", "version": "1.0", "platform": XSS}, "size": size, "files": XSS,
             "last_used": XSS, "fetched_at": None, "url": None} for i, size in enumerate(sizes)] + ["junk", None]}

    def op_verify_report(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return {"started": 1.0e9, "finished": XSS, "trigger": XSS, "counts": {XSS: XSS, "good": 3}, "outcomes": []}


@pytest_twisted.ensureDeferred
async def test_hostile_service_answers_render_as_text_in_a_browser(browser: Any, container_factory: Any,
                                                                   tmp_path: Path) -> None:
    """Markup in a service's answer (Deploy's jobs, Cache's entries and report, another agent's process
    table) is shown as text, and no script of it runs: the token in sessionStorage stays on the page."""
    from selenium.webdriver.common.by import By

    c1 = await container_factory(config=http_config(tmp_path))
    FakeNode.rows = [{"pid": "fake-node.0", "name": XSS, "class": XSS, "module": XSS, "state": XSS,
                      "parent": None, "convs": XSS, "queues": [XSS]}]
    await c1.spawn(FakeNode, name="fake-agent")
    c1.publish_event("container.heartbeat", {"container": "fake-node", "sysname": c1.sysname, "pids": 1,
                                             "started_at": XSS, "interval": 60.0,
                                             "agent": agent_queue(c1.sysname, "fake-node")})
    await c1.proc_manager.get(c1.agent_pid).wait_for_node("fake-node", timeout=10)
    await c1.spawn(HostileDeploy)
    await c1.spawn(HostileCache)
    code, jobs = await get_json(c1.http.url + "/api/jobs")
    assert jobs["items"][0]["total"] is None and jobs["items"][0]["created"] is None  # numbers are numbers
    await in_thread(browser.get, c1.http.url + "/")
    await in_thread(browser.execute_script, "sessionStorage.setItem('ion-console-token', 'secret')")
    await in_thread(wait_until, browser, row("fake-node.0"), "the hostile process row")

    def text(selector: str) -> Callable[[Any], str]:
        return lambda d: d.find_element(By.CSS_SELECTOR, selector).text

    assert "<img src=x" in await in_thread(text('tr[data-pid="fake-node.0"]'), browser)
    await in_thread(click, browser, 'button[data-tab="jobs"]')
    await in_thread(wait_until, browser, lambda d: "j2<img" in text("#jobtable")(d), "the hostile job as text")
    assert "1/?" in await in_thread(text("#jobtable"), browser)
    await in_thread(click, browser, 'button[data-tab="cache"]')
    await in_thread(wait_until, browser, lambda d: "dep6" in text("#cachetable")(d), "the hostile cache")
    assert "<img src=x" in await in_thread(text("#cachesummary"), browser)
    for tab in ("processes", "jobs", "cache"):
        await in_thread(click, browser, f'button[data-tab="{tab}"]')
        await in_thread(wait_until, browser, lambda d, tab=tab: d.execute_script("return document.body.dataset.loaded")
                        == tab, f"the {tab} tab drawn")
        assert await in_thread(browser.execute_script, "return document.querySelectorAll('main img').length") == 0
    assert await in_thread(browser.execute_script, "return window.__pwned === undefined")


@pytest_twisted.ensureDeferred
async def test_one_bad_size_does_not_break_the_cache_view(container_factory: Any, tmp_path: Path) -> None:
    """Sizes that are not integers are null on their row; the total counts the others."""
    c1 = await container_factory(config=http_config(tmp_path))
    await c1.spawn(HostileCache)
    code, data = await wait_for(lambda: _available(c1.http.url + "/api/cache"), "the cache view")
    assert code == 200 and data["bytes"] == 5 + 11
    assert [e["size"] for e in data["items"]] == [None, None, 5, None, None, None, 11]
    assert all(e["files"] is None and e["last_used"] is None for e in data["items"])
    assert data["verify"]["counts"] == {"good": 3} and data["verify"]["finished"] is None


async def post_raw(url: str, data: bytes, headers: dict[str, list[str]]) -> tuple[int, Any]:
    response = await treq.post(url, data=data, headers=headers, persistent=False)
    body = await response.content()
    try:
        return response.code, json.loads(body)
    except ValueError:
        return response.code, body


@pytest_twisted.ensureDeferred
async def test_cross_site_posts_are_refused_before_anything_and_recorded_bounded(
        container_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An action not sent as application/json (415), or from another origin (403), is refused even with
    the token, and recorded without its body; a body over 8 KiB is 413; a flood of refusals from one client
    records only REFUSALS_RECORDED of them."""
    import ion.core.console

    monkeypatch.setattr(ion.core.console, "REFUSALS_RECORDED", 5)
    c1 = await container_factory(config=http_config(tmp_path))
    await c1.spawn(FakeCache)
    FakeCache.rounds = 0
    url, token, port = c1.http.url + "/api/verify", c1.http.console.token, c1.http.port
    auth = {"authorization": [f"Bearer {token}"]}
    secret = b'{"pid": "body-secret"}'
    for kind in ("text/plain", "application/x-www-form-urlencoded", "text/plain; x=application/json"):
        code, answer = await post_raw(url, secret, {**auth, "content-type": [kind]})
        assert code == 415 and "application/json" in answer["error"]
    code, answer = await post_raw(url, secret, {**auth, "content-type": ["application/json"],
                                                "origin": ["http://evil.example"]})
    assert code == 403 and "cross-origin" in answer["error"]
    code, answer = await post_raw(url, secret, {**auth, "content-type": ["application/json"],
                                                "sec-fetch-site": ["cross-site"]})
    assert code == 403
    assert FakeCache.rounds == 0
    code, answer = await post_raw(url, b"{}", {**auth, "content-type": ["application/json; charset=utf-8"],
                                               "origin": [f"http://127.0.0.1:{port}"]})
    assert code == 200 and FakeCache.rounds == 1
    code, _ = await post_raw(c1.http.url + "/api/kill", b'{"pid": "' + b"x" * 9000 + b'"}',
                             {**auth, "content-type": ["application/json"]})
    assert code == 413
    await c1.audit.flush()
    refused = [r for r in records(tmp_path / "c1-audit.jsonl") if r["result"] == "refused"]
    assert len(refused) == 5  # 5 refusals, each recorded: then the flood
    assert {(r["action"], r["target"], r["claimed_user"]) for r in refused} == {("cache.verify", "?", "web 127.0.0.1")}
    assert b"body-secret" not in (tmp_path / "c1-audit.jsonl").read_bytes()
    for _ in range(20):
        assert (await post(url, {"pid": "body-secret"}))[0] == 403
    await c1.audit.flush()
    assert len([r for r in records(tmp_path / "c1-audit.jsonl") if r["result"] == "refused"]) == 5
    assert b"body-secret" not in (tmp_path / "c1-audit.jsonl").read_bytes()


@pytest_twisted.ensureDeferred
async def test_forged_control_events_are_left_out_of_the_audit_view(container_factory: Any, tmp_path: Path) -> None:
    """A ``control.*`` event published by a login that is not an operator is not shown; an operator's is,
    with the broker user that sent it, each field cut."""
    c1 = await container_factory(config=http_config(tmp_path))
    mallory = await container_factory(config={"ion.core.messaging": {"memory_user": "mallory"},
                                              "ion.core.container": {"agent": False}})
    forged = {"time": "now", "user": c1.transport.user, "action": "process.terminate", "target": "forged-entry",
              "result": "ok", "code": 200}
    mallory.publish_event("control.process.terminate", forged)
    c1.publish_event("control.process.terminate", {**forged, "target": "real-entry", "error": "e" * 5000})

    async def seen() -> Any:
        code, data = await get_json(c1.http.url + "/api/audit")
        return data["items"] if any(a["target"] == "real-entry" for a in data["items"]) else None

    items = await wait_for(seen, "the operator's event in the audit view")
    assert [a["target"] for a in items] == ["real-entry"]
    (entry,) = items
    assert entry["broker_user"] == c1.transport.user and len(entry["error"]) <= 300
    assert len(json.dumps(entry)) < 2000


@pytest_twisted.ensureDeferred
async def test_the_token_file_is_never_written_through_a_placed_link(container_factory: Any,
                                                                     tmp_path: Path) -> None:
    """A hard link (or a symlink) placed at the token file's path beforehand is replaced, not written
    through: the file it points to keeps its content."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.link(victim, tmp_path / "c1.token")
    os.symlink(victim, tmp_path / "c2.token")
    c1 = await container_factory(config=http_config(tmp_path, "c1"))
    c2 = await container_factory(config=http_config(tmp_path, "c2"))
    assert victim.read_text() == "precious\n"
    for c, name in ((c1, "c1.token"), (c2, "c2.token")):
        path = tmp_path / name
        assert not path.is_symlink() and path.stat().st_ino != victim.stat().st_ino
        assert path.read_text().strip() == c.http.console.token
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest_twisted.ensureDeferred
async def test_event_streams_are_capped_and_a_slow_reader_is_dropped(
        container_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond MAX_STREAMS streams: 503. A reader that does not read: once its connection's send buffer is
    full, what is pushed is held back, and past STREAM_BACKLOG bytes the stream is dropped."""
    import socket

    import ion.core.console

    monkeypatch.setattr(ion.core.console, "MAX_STREAMS", 2)
    c1 = await container_factory(config=http_config(tmp_path))
    console = c1.http.console
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        slow.connect(("127.0.0.1", c1.http.port))
        slow.sendall(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{c1.http.port}\r\n\r\n".encode())
        await wait_for(lambda: True if len(console.streams) == 1 else None, "the slow stream")
        fine = await treq.get(c1.http.url + "/api/events", unbuffered=True, persistent=False)
        assert fine.code == 200 and len(console.streams) == 2
        code, answer = await get_json(c1.http.url + "/api/events")
        assert code == 503 and "too many" in answer["error"]
        chunks: list[bytes] = []
        ended = treq.collect(fine, chunks.append)
        # 40 KB of events a reactor turn (at most 16 MB): the slow reader's kernel buffers fill, then its
        # connection's, then the held-back bytes pass the limit; the other stream reads on.
        for turn in range(400):
            for i in range(5):
                console.push("process", {"pid": f"p{turn}.{i}", "pad": "x" * 8000})
            await task.deferLater(reactor, 0, lambda: None)
            if console.streams_dropped:
                break
        assert console.streams_dropped == 1 and len(console.streams) == 1
        assert list(console.streams)[0] is not None and not ended.called
        sent = (turn + 1) * 5 * 8000
        await wait_for(lambda: True if len(b"".join(chunks)) > sent else None, "the other stream's events")
        print(f"\nconsole: the slow reader dropped after {sent / 1e6:.1f} MB of events")
    finally:
        slow.close()


@pytest_twisted.ensureDeferred
async def test_one_client_cannot_take_every_stream(container_factory: Any, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Past STREAMS_PER_CLIENT streams of one address, its oldest stream is closed for the new one."""
    import ion.core.console

    monkeypatch.setattr(ion.core.console, "STREAMS_PER_CLIENT", 1)
    c1 = await container_factory(config=http_config(tmp_path))
    console = c1.http.console
    first = await treq.get(c1.http.url + "/api/events", unbuffered=True, persistent=False)
    first_ended = treq.collect(first, lambda _: None)
    await wait_for(lambda: True if len(console.streams) == 1 else None, "the first stream")
    second = await treq.get(c1.http.url + "/api/events", unbuffered=True, persistent=False)
    assert second.code == 200
    await first_ended  # closed by the console for the second one
    assert len(console.streams) == 1
