"""The audit trail (ion.core.audit): every control action and deploy, allowed, failed or refused, on the
broker-validated identity; as a JSON line in the audit file and as a ``control.*`` event."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from twisted.python import usage

from ion.core.audit import ARGS_LIMIT, audited
from ion.core.config import Config
from ion.core.exceptions import ApplicationError, ReceivedApplicationError
from ion.core.process import Process, Receiver
from ion.core.security import audit_action, control
from ion.core.tap import _default_audit_path
from ion.testing import ClockedCluster
from tests.core.support import failure_of, logged


class Controlled(Process):
    name = "controlled"

    @control("test.reset")
    def op_reset(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        if content == "fail":
            raise ApplicationError("cannot reset now", 409)
        return {"reset": True}

    @control("test.lock", audited=False)
    def op_lock(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return {"locked": True}

    @audited("test.run")
    async def op_run(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return {"ran": content}

    def op_read(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return {"read": True}


class ControlWatcher(Process):
    """Collects the ``control.*`` events of the system."""

    def receivers_to_create(self) -> list[Receiver]:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        return super().receivers_to_create() + [Receiver(
            self, f"{self.sysname}.audit-watch.{self.id}",
            lambda msg, _r: self.seen.append((msg["receiver"], msg["content"])),
            exchange=self.container.events_exchange, bindings=["control.#"])]


def _system(tmp_path: Path) -> tuple[ClockedCluster, Any, Process, Process, Any, Any]:
    cluster = ClockedCluster()
    audit = tmp_path / "audit.jsonl"
    home = cluster.start_container("home", "s", {"ion.core.audit": {"path": str(audit)}})
    away = cluster.start_container("away", "s", {"ion.core.messaging": {"memory_user": "mallory"}})
    target = cluster.spawn_in(home, Controlled, name="controlled")
    watcher = cluster.spawn_in(away, ControlWatcher, name="watcher")
    insider = cluster.spawn_in(home, Process, name="insider")
    outsider = cluster.spawn_in(away, Process, name="outsider")
    return cluster, home, insider, outsider, target, watcher


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_allowed_failed_and_refused_actions_are_recorded_and_published(tmp_path: Path,
                                                                     log_events: list[Any]) -> None:
    cluster, home, insider, outsider, target, watcher = _system(tmp_path)
    assert cluster.result(insider.rpc_send(target.id, "reset", {"why": "test"}))[0] == {"reset": True}
    d = insider.rpc_send(target.id, "reset", "fail")
    assert failure_of(cluster.pump() or d, ReceivedApplicationError).response_code == 409
    d = outsider.rpc_send(target.id, "reset", None, headers={"user-id": "ion"})
    assert failure_of(cluster.pump() or d, ReceivedApplicationError).response_code == 403
    cluster.pump()

    ok, failed, refused = records(tmp_path / "audit.jsonl")
    where = f"controlled ({target.id})"
    assert {k: ok[k] for k in ("container", "system", "user", "sender_name", "action", "target", "op", "result",
                               "code", "error")} == {
        "container": "home", "system": "s", "user": "ion", "sender_name": "insider", "action": "test.reset",
        "target": where, "op": "reset", "result": "ok", "code": 200, "error": None}
    assert json.loads(ok["args"]) == {"why": "test"} and ok["time"].endswith("Z")
    assert (failed["result"], failed["code"]) == ("error", 409) and "cannot reset now" in failed["error"]
    # The broker's word, not the claim: the caller wrote user-id "ion", the broker says mallory.
    assert (refused["result"], refused["code"], refused["user"], refused["claimed_user"]) == (
        "refused", 403, "mallory", "ion")
    # One event per record, on the events exchange, seen from the other container.
    assert [(key, event["result"]) for key, event in watcher.seen] == [
        ("control.test.reset", "ok"), ("control.test.reset", "error"), ("control.test.reset", "refused")]
    assert watcher.seen[0][1] == ok
    assert len(logged(log_events, "audit: 'ion' test.reset")) == 2


def test_only_control_actions_and_audited_ops_are_recorded(tmp_path: Path) -> None:
    """Reads and the per-fetch mechanics (``audited=False``) leave no record; an ``@audited`` op does."""
    cluster, home, insider, outsider, target, watcher = _system(tmp_path)
    cluster.result(insider.rpc_send(target.id, "read", None))
    cluster.result(insider.rpc_send(target.id, "lock", None))
    assert not (tmp_path / "audit.jsonl").exists()
    d = outsider.rpc_send(target.id, "lock", None)  # still a control operation: refused, not recorded
    assert failure_of(cluster.pump() or d, ReceivedApplicationError).response_code == 403
    assert cluster.result(outsider.rpc_send(target.id, "run", [1, 2]))[0] == {"ran": [1, 2]}
    (entry,) = records(tmp_path / "audit.jsonl")
    assert (entry["action"], entry["user"], entry["result"], entry["args"]) == ("test.run", "mallory", "ok", "[1, 2]")
    assert audit_action(Controlled, "read") is None and audit_action(Controlled, "reset") == "test.reset"


def test_the_agents_spawn_and_a_terminate_are_recorded(tmp_path: Path) -> None:
    from ion.core.agent import agent_queue

    cluster, home, insider, outsider, target, watcher = _system(tmp_path)
    pid = cluster.result(insider.rpc_send(agent_queue("s", "home"), "spawn", {"module": "ion.services.hello"}))[0]
    cluster.result(insider.rpc_send(pid, "terminate", None))
    cluster.pump()
    assert [(r["action"], r["result"]) for r in records(tmp_path / "audit.jsonl")] == [
        ("agent.spawn", "ok"), ("process.terminate", "ok")]


def test_long_arguments_are_cut(tmp_path: Path) -> None:
    cluster, home, insider, outsider, target, watcher = _system(tmp_path)
    cluster.result(insider.rpc_send(target.id, "reset", "x" * 5000))
    (entry,) = records(tmp_path / "audit.jsonl")
    assert len(entry["args"]) < ARGS_LIMIT + 40 and entry["args"].endswith("more)")


def test_the_file_is_private_and_a_symlink_is_not_followed(tmp_path: Path, log_events: list[Any]) -> None:
    cluster, home, insider, outsider, target, watcher = _system(tmp_path)
    cluster.result(insider.rpc_send(target.id, "reset", None))
    assert stat.S_IMODE(os.stat(tmp_path / "audit.jsonl").st_mode) == 0o600
    cluster.result(home.audit.stop())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    (tmp_path / "audit.jsonl").unlink()
    (tmp_path / "audit.jsonl").symlink_to(elsewhere)
    cluster.result(insider.rpc_send(target.id, "reset", None))
    cluster.pump()
    assert elsewhere.read_text() == ""
    assert logged(log_events, "audit record not written to")
    # The event still went out.
    assert [e["result"] for _, e in watcher.seen] == ["ok", "ok"]


def test_twistd_puts_the_file_beside_its_log(tmp_path: Path, monkeypatch: Any) -> None:
    class Twistd(usage.Options):
        optParameters = [["logfile", "l", None, ""]]

    class Sub(dict):  # type: ignore[type-arg]
        parent: Any = None

    monkeypatch.chdir(tmp_path)
    for logfile, expected in ((str(tmp_path / "logs" / "cc.log"), tmp_path / "logs" / "ion-audit.jsonl"),
                              (None, tmp_path / "ion-audit.jsonl"), ("-", tmp_path / "ion-audit.jsonl")):
        opts = Sub()
        opts.parent = Twistd()
        opts.parent["logfile"] = logfile
        config = Config({})
        _default_audit_path(config, opts)
        assert config.container_get("ion.core.audit", "path") == str(expected)
    config = Config({"ion.core.audit": {"path": None}})  # set (to none): kept
    _default_audit_path(config, Sub())
    assert config.container_get("ion.core.audit", "path") is None


def test_an_existing_file_is_made_private_and_a_fifo_never_blocks(tmp_path: Path, log_events: list[Any]) -> None:
    cluster, home, insider, outsider, target, watcher = _system(tmp_path)
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    path.chmod(0o644)
    cluster.result(insider.rpc_send(target.id, "reset", None))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(records(path)) == 1
    cluster.result(home.audit.stop())
    path.unlink()
    os.mkfifo(path)  # nobody reads it: an open for writing would wait for a reader for good
    cluster.result(insider.rpc_send(target.id, "reset", None))
    cluster.pump()
    assert logged(log_events, "audit record not written to")


def test_a_record_that_could_not_be_written_is_written_with_the_next(tmp_path: Path, log_events: list[Any]) -> None:
    cluster, home, insider, outsider, target, watcher = _system(tmp_path)
    path = tmp_path / "audit.jsonl"
    path.mkdir()  # cannot be opened as a file
    cluster.result(insider.rpc_send(target.id, "reset", "first"))
    cluster.pump()
    assert logged(log_events, "audit record not written to")
    path.rmdir()
    cluster.result(insider.rpc_send(target.id, "reset", "second"))
    cluster.pump()
    assert [json.loads(r["args"]) for r in records(path)] == ["first", "second"]


def test_a_line_cut_by_a_short_write_is_finished_not_repeated(tmp_path: Path, monkeypatch: Any) -> None:
    """A write that takes part of a line and then fails (a full disk): the next attempt writes the rest,
    so the file holds whole lines, each once."""
    import ion.core.audit as audit_module

    cluster, home, insider, outsider, target, watcher = _system(tmp_path)
    real_write = os.write
    script = ["short", "full"]  # a short write (10 bytes taken), then ENOSPC; then the disk has room

    def short_then_full(fd: int, data: Any) -> int:
        step = script.pop(0) if script else None
        if step == "short":
            return real_write(fd, bytes(data[:10]))
        if step == "full":
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(audit_module.os, "write", short_then_full)
    cluster.result(insider.rpc_send(target.id, "reset", "first"))
    cluster.pump()
    cluster.result(insider.rpc_send(target.id, "reset", "second"))
    cluster.pump()
    assert [json.loads(r["args"]) for r in records(tmp_path / "audit.jsonl")] == ["first", "second"]
