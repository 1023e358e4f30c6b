"""The ``ion`` command (ion/command.py) as a real subprocess against a real system on RabbitMQ.

The system is two containers of this test process on the test's vhost (``ContainerFactory``), one
running the hello service; the command joins it with ``--broker URL -s NAME`` and is run with
``getProcessOutputAndValue`` (or ``spawnProcess``, to follow its output), so the test's reactor
keeps serving the system meanwhile. Covered: nodes, ps (all and one node), ping, call, kill (and
its ``control.process.terminate`` audit event), a refused kill from a login that is no operator,
``audit`` of a file and ``audit --follow`` until SIGTERM, an unreachable broker (69), usage
errors (2) and ``--json``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, utils

from ion.core.agent import ContainerAgent
from ion.core.container import Container
from ion.core.control import SystemControl
from ion.services.hello import HelloService
from ion.testing import ContainerFactory, client_process
from tests.core.test_multicontainer import ContainerProcess

REPO = Path(__file__).resolve().parents[1]
SYSNAME = "cmdsys"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ION_BROKER_URL", "ION_SYSNAME", "ION_LOGLEVELS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


async def ion(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """``python -m ion.command ARGS`` in a subprocess: (exit code, stdout, stderr)."""
    d = utils.getProcessOutputAndValue(sys.executable, ["-m", "ion.command", *args], env=_env(), path=str(REPO),
                                       reactor=reactor)
    out, err, code = await d.addTimeout(timeout, reactor)
    return code, out.decode(), err.decode()


def _sync_ion(*args: str) -> tuple[int, str, str]:
    """The command before it needs a broker (usage, unreachable broker): run and waited for at once."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "ion.command", *args], env=_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


class System:
    """Two containers of system ``cmdsys`` on the test's vhost; ``hello`` runs in the second."""

    def __init__(self, factory: ContainerFactory, url: str, first: Container, second: Container,
                 hello: HelloService) -> None:
        self.factory, self.url, self.first, self.second, self.hello = factory, url, first, second, hello

    def args(self, *more: str, url: str | None = None) -> list[str]:
        return ["--broker", url or self.url, "-s", SYSNAME, *more]


@pytest_twisted.async_yield_fixture
async def system(amqp_url: str, tmp_path: Path) -> AsyncIterator[System]:
    factory = ContainerFactory(broker_url=amqp_url)
    try:
        audit = {"ion.core.audit": {"path": str(tmp_path / "audit.jsonl")}}
        # The first serves the web console (its address goes out in its agent's announcements).
        first = await factory(sysname=SYSNAME, config={**audit, "ion.core.http": {
            "port": 0, "token_file": str(tmp_path / "console.token")}})
        second = await factory(sysname=SYSNAME, config=audit)
        agent = first.proc_manager.get(first.agent_pid)
        assert isinstance(agent, ContainerAgent)
        await agent.wait_for_node(second.id).addTimeout(10, reactor)
        pid = await second.spawn(HelloService)
        hello = second.proc_manager.get(pid)
        assert isinstance(hello, HelloService)
        yield System(factory, amqp_url, first, second, hello)
    finally:
        await factory.teardown()


class Records(list[dict[str, Any]]):
    """Audit records as they come; :meth:`wait` fires once there are ``n``."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: list[tuple[int, defer.Deferred[None]]] = []

    def __call__(self, record: dict[str, Any]) -> None:
        self.append(record)
        for n, d in list(self._waiting):
            if len(self) >= n:
                self._waiting.remove((n, d))
                d.callback(None)

    def wait(self, n: int, timeout: float = 30) -> defer.Deferred[None]:
        if len(self) >= n:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((n, d))
        return d.addTimeout(timeout, reactor)


# -- without a broker ----------------------------------------------------------------------------------
def test_usage_errors_are_exit_2() -> None:
    """No command, an unknown one, a missing --broker or -s, bad JSON: one Error line each, exit 2."""
    code, _, err = _sync_ion()
    assert code == 2 and "give a command" in err
    code, _, err = _sync_ion("frobnicate")
    assert code == 2 and "invalid choice" in err
    code, _, err = _sync_ion("nodes")
    assert code == 2 and "nodes needs --broker URL" in err
    code, _, err = _sync_ion("ps", "--broker", "amqp://127.0.0.1:1/")
    assert code == 2 and "needs -s/--sysname" in err
    code, out, err = _sync_ion("call", "hello", "hello", "{oops", "--broker", "amqp://127.0.0.1:1/", "-s", "x",
                               "--json")
    assert code == 2 and "not valid JSON" in err
    assert json.loads(out)["ok"] is False and "not valid JSON" in json.loads(out)["errors"][0]
    assert "Traceback" not in err


def test_an_unreachable_broker_is_exit_69() -> None:
    code, out, err = _sync_ion("--broker", "amqp://guest:secret@127.0.0.1:1/", "-s", "x", "ping", "hello", "--json")
    assert code == 69, err
    assert err.strip() == "Error: cannot connect to broker at 127.0.0.1:1: connection refused (is RabbitMQ running?)"
    result = json.loads(out)
    assert result["ok"] is False and result["broker"] == "amqp://guest:***@127.0.0.1:1/" and "secret" not in out


def test_audit_prints_a_file_and_console_gives_an_address(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    record = {"time": "2026-12-06T04:00:00.000Z", "user": "guest", "action": "process.terminate",
              "target": "hello (c.2)", "container": "c", "result": "ok", "code": 200, "error": None}
    path.write_text(json.dumps(record) + "\nnot json\n")
    code, out, err = _sync_ion("audit", "--file", str(path))
    assert code == 0 and "process.terminate" in out and "hello (c.2)" in out.splitlines()[1]
    assert "1 lines that are not audit records were skipped" in err
    code, out, _ = _sync_ion("audit", "--file", str(path), "--json")
    assert json.loads(out)["records"] == [record]
    code, _, err = _sync_ion("audit", "--file", str(tmp_path / "none.jsonl"))
    assert code == 1 and "no audit file" in err
    code, out, _ = _sync_ion("console", "--http-url", "http://127.0.0.1:8080/", "--json")
    assert code == 0 and json.loads(out)["consoles"] == [{"container": None, "console": "http://127.0.0.1:8080/"}]


# -- against a running system ------------------------------------------------------------------------------
@pytest.mark.amqp
@pytest_twisted.ensureDeferred
async def test_nodes_ps_ping_and_call(system: System) -> None:
    """nodes lists both containers (not the command's own); ps lists their processes; ping and call
    reach hello; --json parses."""
    ids = sorted([system.first.id, system.second.id])
    code, out, err = await ion(*system.args("nodes", "--wait", "1"))
    assert code == 0, err
    assert sorted(line.split()[0] for line in out.splitlines()[1:]) == ids
    code, out, err = await ion(*system.args("nodes", "--json"))
    assert code == 0, err
    assert sorted(n["container"] for n in json.loads(out)["nodes"]) == ids

    code, out, err = await ion(*system.args("ps", "--json"))
    assert code == 0, err
    rows = json.loads(out)["processes"]
    assert {r["container"] for r in rows} == set(ids)
    assert {(r["pid"], r["name"]) for r in rows} >= {(system.hello.id, "hello"), (system.first.agent_pid, "agent")}
    code, out, err = await ion(*system.args("ps", "--node", system.second.id))
    assert code == 0, err
    assert out.splitlines()[0].split()[:3] == ["container", "pid", "name"]
    assert {line.split()[1] for line in out.splitlines()[1:]} == set(system.second.proc_manager.processes)

    code, out, err = await ion(*system.args("console", "--json"))
    assert code == 0, err
    assert json.loads(out)["consoles"] == [{"container": system.first.id, "console": system.first.http.url + "/"}]

    code, out, err = await ion(*system.args("ping", "hello"))
    assert code == 0, err
    assert out.startswith(f"hello {system.hello.id}: ACTIVE (")
    code, out, err = await ion(*system.args("ping", "--json"))
    assert code == 0, err
    assert sorted(p["container"] for p in json.loads(out)["pongs"]) == ids
    code, out, err = await ion(*system.args("call", "hello", "hello", '"operator"'))
    assert code == 0, err
    assert json.loads(out) == {"value": "Hello there, operator"}
    code, out, err = await ion(*system.args("call", "no_such_service", "x", "--json", "--timeout", "5"))
    assert code == 1 and "404" in err
    assert json.loads(out)["code"] == 404
    code, out, err = await ion(*system.args("jobs", "--wait", "0.5"))
    assert code == 1 and err.strip() == f"Error: no Deploy service runs in system {SYSNAME}"


@pytest.mark.amqp
@pytest_twisted.ensureDeferred
async def test_kill_is_audited_and_refused_to_a_login_that_is_no_operator(system: System, amqp_user: Any,
                                                                           tmp_path: Path) -> None:
    """kill PID terminates the process (the control.process.terminate event and the audit file say who);
    another broker login that is not an operator gets exit 1 with the 403, and the process stays."""
    watcher = SystemControl(await client_process(system.first, "watcher"))
    records = Records()
    await watcher.follow_audit(records)

    victim = await system.second.spawn(HelloService, name="victim")
    code, out, err = await ion(*system.args("kill", victim, url=amqp_user.url))
    assert code == 1, err
    assert "403" in err and "not an operator" in err
    assert system.second.proc_manager.get(victim) is not None

    gone: defer.Deferred[None] = defer.Deferred()
    system.second.proc_manager.add_exit_listener(
        lambda proc, state: gone.callback(None) if proc.id == victim and not gone.called else None)
    code, out, err = await ion(*system.args("kill", victim, "--json"))
    assert code == 0, err
    assert json.loads(out)["killed"]["pid"] == victim
    await records.wait(2)
    await gone.addTimeout(30, reactor)
    await system.second.audit.flush()
    assert [(r["action"], r["user"], r["result"], r["code"]) for r in records] == [
        ("process.terminate", amqp_user.name, "refused", 403), ("process.terminate", "guest", "ok", 200)]
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(r["action"], r["result"], victim in r["target"]) for r in lines] == [
        ("process.terminate", "refused", True), ("process.terminate", "ok", True)]


@pytest.mark.amqp
@pytest_twisted.ensureDeferred
async def test_audit_follow_streams_control_events_until_sigterm(system: System) -> None:
    """audit --follow prints each control.* event of the system as it comes; SIGTERM ends it, exit 0."""
    follower = ContainerProcess("ion audit --follow")
    reactor.spawnProcess(follower, sys.executable, [sys.executable, "-m", "ion.command", *system.args("audit",
                                                                                                       "--follow")],
                         env=_env(), path=str(REPO))
    try:
        await follower.wait_for("Following the audit trail of system", 60)
        victim = await system.second.spawn(HelloService, name="victim")
        code, _, err = await ion(*system.args("kill", victim))
        assert code == 0, err
        line = await follower.wait_for(r"process\.terminate on victim", 30)
        assert "guest" in line.string and ": ok 200" in line.string
    finally:
        follower.signal("TERM")
    assert await follower.exited(30) == 0, follower.output



@pytest.mark.amqp
@pytest_twisted.ensureDeferred
async def test_jobs_and_job_follow(amqp_url: str, tmp_path: Path) -> None:
    """jobs lists the deploy jobs of every Deploy instance; job ID --follow prints each part as it ends and
    the job's state until it is over (exit 0: all deployed); an unknown job is exit 1."""
    from ion.services.deploy.service import DeployClient
    from ion.services.deploy.spec import load_deployment
    from tests.services.deploy.test_cli import SAMPLE, write_deployment

    factory = ContainerFactory(broker_url=amqp_url)
    try:
        container = await factory(sysname=SYSNAME, config={
            "ion.core.audit": {"path": str(tmp_path / "audit.jsonl")},
            "ion.services.cache": {"root": str(tmp_path / "service-cache"), "host_id": "test-host"},
            "ion.services.unpack": {"allowed_roots": [str(tmp_path / "service-cache")]},
            "ion.services.deploy": {"allowed_destinations": [str(tmp_path)],
                                    "allowed_file_repositories": [str(tmp_path)]},
        })
        await container.app_manager.start_app("deploy")
        items = [{**item, "destination": str(tmp_path / item["destination"])} for item in SAMPLE]
        path = write_deployment(tmp_path, items)
        path.write_text(path.read_text().replace('"file:repo"', json.dumps(f"file:{tmp_path / 'repo'}")))
        deployment = load_deployment(path)
        job = await DeployClient(await client_process(container)).deploy_async(deployment)
        args = ["--broker", amqp_url, "-s", SYSNAME]

        code, out, err = await ion(*args, "job", job, "--follow")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[-1] == f"job {job}: FINISHED, 3 of 3 parts done", out
        assert sum(1 for line in lines if line.endswith(": downloaded")) == 3, out

        code, out, err = await ion(*args, "jobs", "--json")
        assert code == 0, err
        (listed,) = json.loads(out)["jobs"]
        assert listed["job"] == job and listed["state"] == "FINISHED"
        code, out, err = await ion(*args, "jobs")
        assert code == 0 and job in out and "FINISHED" in out

        code, out, err = await ion(*args, "job", job, "--json")
        assert code == 0 and json.loads(out)["job"]["state"] == "FINISHED"
        code, out, err = await ion(*args, "job", "no-such-job")
        assert code == 1 and "LOST_IN_SPACE" in out

        # The cache of that system: verified (three good entries), reaped, pruned; a finished job
        # is not running any more (cancel: exit 1).
        code, out, err = await ion(*args, "cache", "verify")
        assert code == 0 and out.strip() == "verified 3 entries: 3 good, 0 bad", err
        code, out, err = await ion(*args, "cache", "reap", "--json")
        assert code == 0 and json.loads(out)["cache"]["entries"] == 3, err
        code, out, err = await ion(*args, "cache", "prune", "--keep", "0")
        assert code == 0 and out.strip().startswith("pruned: "), err
        code, out, err = await ion(*args, "cancel", job)
        assert code == 1 and out.strip() == f"job {job}: not running", err
        code, _, err = await ion(*args, "cache", "prune")
        assert code == 2 and "give --older-than D or --keep N" in err
        # An app, stopped and started again in the system's one container.
        code, out, err = await ion(*args, "app", "stop", "fetch")
        assert code == 0 and out.strip() == f"app fetch in {container.id}: stopped", err
        assert "fetch" not in container.app_manager.running
        code, out, err = await ion(*args, "app", "start", "fetch")
        assert code == 0 and out.strip() == f"app fetch in {container.id}: started", err
        assert "fetch" in container.app_manager.running
        await container.audit.flush()
        audit = [json.loads(line)["action"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        assert {"cache.verify", "cache.reap", "cache.prune", "job.cancel", "app.stop", "app.start"} <= set(audit)
    finally:
        await factory.teardown()


def test_shell_completion_with_argcomplete(tmp_path: Path) -> None:
    """Under argcomplete (as `register-python-argcomplete ion` runs it), the command completes its
    subcommands and options and exits without doing anything."""
    import subprocess

    out = tmp_path / "completions"
    env = {**_env(), "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": "ion p", "COMP_POINT": "5",
           "_ARGCOMPLETE_STDOUT_FILENAME": str(out)}
    done = subprocess.run([sys.executable, "-m", "ion.command"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(out.read_text().split()) == ["ping", "ps"]
    env.update(COMP_LINE="ion ps --n", COMP_POINT="10")
    subprocess.run([sys.executable, "-m", "ion.command"], env=env, cwd=REPO, timeout=60, check=True)
    assert out.read_text().split() == ["--node"]


def test_a_taken_over_jobs_line_names_the_takeovers() -> None:
    """``ion job ID``: a job another container took over says how often, from which container, by which."""
    from ion.command import _job_line

    record = {"job": "c1.3/ab", "state": "PARTIAL", "total": 3, "results": {"a": {}}, "error": None,
              "takeovers": [{"from": {"container": "c1"}, "by": {"container": "c2"}, "at": 1.0}]}
    assert _job_line(record) == ("job c1.3/ab: PARTIAL, 1 of 3 parts done, taken over 1 time(s), "
                                 "last from container c1 by c2")
    assert _job_line(dict(record, takeovers=[])) == "job c1.3/ab: PARTIAL, 1 of 3 parts done"


def test_a_comma_list_of_brokers_is_walked_and_shown_without_passwords() -> None:
    """--broker URL1,URL2 (a cluster's nodes): every address is tried, each shown without its password."""
    code, out, err = _sync_ion("--broker", "amqp://guest:secret@127.0.0.1:1/,amqp://guest:hush@127.0.0.1:2/",
                               "-s", "x", "ping", "hello", "--json")
    assert code == 69, err
    result = json.loads(out)
    assert result["broker"] == "amqp://guest:***@127.0.0.1:1/,amqp://guest:***@127.0.0.1:2/"
    assert "secret" not in out and "hush" not in out


@pytest.mark.parametrize(("keep", "problem"), [("x", "--keep takes a whole number, not 'x'"),
                                               ("-1", "--keep must be at least 0, not -1")])
def test_cache_prune_keep_is_checked_as_ion_deploy_checks_it(keep: str, problem: str) -> None:
    """``ion cache prune --keep`` reads its number with ion-deploy's own check: the same words."""
    code, _out, err = _sync_ion("--broker", "amqp://guest:secret@127.0.0.1:1/", "-s", "x", "cache", "prune",
                                "--keep", keep)
    assert code == 2 and problem in err, err
