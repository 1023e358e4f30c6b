"""Who may do what (ion.core.security): control operations for operators only, decided on the
broker-validated ``broker-user``; security bounds that apps and spawnargs can only narrow.

Two containers of one system share an embedded broker; the second connects as another broker
user (``memory_user``), as another RabbitMQ login would (the plain-pika versions of these cases,
against RabbitMQ, are in ``tests/hostile/test_control_amqp.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ion.core.agent import agent_queue
from ion.core.config import Config
from ion.core.exceptions import ConfigurationError, ReceivedApplicationError, ReceivedContainerError
from ion.core.lifecycle import State
from ion.core.process import Process
from ion.core.security import (
    UnauthorizedError,
    control,
    narrow_limit,
    narrow_networks,
    narrow_roots,
    narrow_subset,
    operators,
)
from ion.services.hello import HelloService
from ion.testing import ClockedCluster
from tests.core.support import failure_of, logged


class Controlled(Process):
    """A process with a control op of its own."""

    name = "controlled"

    @control("test.reset")
    def op_reset(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return {"reset": True}

    def op_read(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        return {"read": True}


def _system(config: dict[str, Any] | None = None) -> tuple[ClockedCluster, Any, Process, Process]:
    """A system "s": container "home" (broker user ``ion``) and "away" (broker user ``mallory``),
    with a caller process in each."""
    cluster = ClockedCluster()
    home = cluster.start_container("home", "s", config)
    away = cluster.start_container("away", "s", {**(config or {}),
                                                 "ion.core.messaging": {"memory_user": "mallory"}})
    return cluster, home, cluster.spawn_in(home, Process, name="insider"), cluster.spawn_in(away, Process,
                                                                                            name="outsider")


def test_terminate_by_another_broker_user_is_a_403_and_the_service_stays(log_events: list[Any]) -> None:
    """``op: terminate`` to a service from a login that is not an operator: 403, one log line naming
    the broker user; the service is still ACTIVE. A false ``user-id`` claim changes nothing."""
    cluster, home, insider, outsider = _system()
    hello = cluster.spawn_in(home, HelloService)
    d = outsider.rpc_send("hello", "terminate", None, headers={"user-id": "ion"})
    error = failure_of(cluster.pump() or d, ReceivedApplicationError)
    assert error.response_code == 403
    assert "broker user 'mallory' is not an operator of system s" in error.message
    assert hello.state is State.ACTIVE
    refusals = logged(log_events, "refused process.terminate")
    assert len(refusals) == 1 and "'mallory'" in refusals[0] and "claims user-id 'ion'" in refusals[0]
    assert not logged(log_events, "op 'terminate'")  # one line per refusal, not two
    # The container's own user is an operator: its terminate is taken, and logged.
    content = cluster.result(insider.rpc_send("hello", "terminate", None))[0]
    assert content == {"terminating": hello.id}
    cluster.pump()
    assert hello.state is State.TERMINATED
    assert logged(log_events, "terminating on request of broker user 'ion'")


def test_agent_spawn_is_for_operators_only() -> None:
    """``spawn`` at another container's agent: 403 for a non-operator (nothing spawned), done for
    the system's own user."""
    cluster, home, insider, outsider = _system()
    before = set(home.proc_manager.processes)
    d = outsider.rpc_send(agent_queue("s", "home"), "spawn", {"module": "ion.services.hello"})
    assert failure_of(cluster.pump() or d, ReceivedApplicationError).response_code == 403
    assert set(home.proc_manager.processes) == before
    pid = cluster.result(insider.rpc_send(agent_queue("s", "home"), "spawn", {"module": "ion.services.hello"}))[0]
    assert pid in home.proc_manager.processes
    # Each container trusts its own login: "away" runs as mallory, so "ion" is no operator there
    # unless its config says so.
    d = insider.rpc_send(agent_queue("s", "away"), "spawn", {"module": "ion.services.hello"})
    assert failure_of(cluster.pump() or d, ReceivedApplicationError).response_code == 403


def test_configured_operators_may_control_and_apps_cannot_add_one() -> None:
    """``ion.core.security: operators`` in the container's config makes a login an operator; the
    same list in an app's config does not."""
    cluster, home, insider, outsider = _system({"ion.core.security": {"operators": ["mallory"]}})
    content = cluster.result(outsider.rpc_send(home.agent_pid, "ps", None))[0]
    assert content  # an ordinary op
    cluster.spawn_in(home, Controlled)
    assert cluster.result(outsider.rpc_send("home.3", "reset", None))[0] == {"reset": True}

    config = Config({}, None)
    config.overlay_app("evil", {"ion.core.security": {"operators": ["mallory"]}})
    home.config = config
    assert "mallory" not in operators(home) and operators(home) == {"ion"}


def test_a_control_op_of_any_process_is_checked_before_it_runs() -> None:
    """A ``@control`` op is checked by the process before the op runs; other ops are not."""
    cluster, home, insider, outsider = _system()
    proc = cluster.spawn_in(home, Controlled)
    assert cluster.result(outsider.rpc_send(proc.id, "read", None))[0] == {"read": True}
    d = outsider.rpc_send(proc.id, "reset", None)
    error = failure_of(cluster.pump() or d, ReceivedApplicationError)
    assert error.response_code == 403 and error.content["error"] == "UnauthorizedError"
    assert cluster.result(insider.rpc_send(proc.id, "reset", None))[0] == {"reset": True}


def test_a_message_without_broker_user_is_no_operator() -> None:
    """A message that reached an op without a broker-validated user is refused a control op."""
    cluster, home, insider, _ = _system()
    from ion.core.security import authorize

    with pytest.raises(UnauthorizedError):
        authorize(home, {"user-id": "ion", "sender": insider.id}, "test.reset", "x")


def test_an_error_reply_over_the_size_limit_is_cut_to_fit(log_events: list[Any]) -> None:
    """An op failing with a message larger than max_message_size answers a short error (its class
    and the start of its text) instead of leaving the caller to its timeout; the log stays short."""
    limit = 64 * 1024
    cluster = ClockedCluster()
    home = cluster.start_container("home", "s", {"ion.core.messaging": {"max_message_size": limit}})

    class Echo(Process):
        name = "echo"

        def op_fail(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
            raise ValueError(f"bad value {content!r}; expected {content[:10]!r}... not {content!r}")

    echo = cluster.spawn_in(home, Echo)
    caller = cluster.spawn_in(home, Process, name="caller")
    d = caller.rpc_send(echo.id, "fail", "x" * (limit - 1024), timeout=5)
    cluster.pump()
    error = failure_of(d, ReceivedContainerError)
    assert error.response_code == 500 and error.content["error"] == "ValueError" and error.content["cut"]
    assert error.message.startswith("bad value 'xxx") and "more characters cut" in error.message
    assert len(error.message) < 3000
    from tests.core.support import lines

    assert sum(len(line) for line in lines(log_events)) < 20_000  # not the 130 kB of the error, nor twice


def test_bounds_narrow_and_never_widen(tmp_path: Path) -> None:
    """The narrowing rules of each kind of security bound."""
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert narrow_roots([str(tmp_path / "a")], [str(tmp_path / "a/b")], "k") == [str(tmp_path / "a/b")]
    assert narrow_roots([str(tmp_path / "a")], [str(tmp_path / "link/b")], "k") == [str(tmp_path / "link/b")]
    for wider in (["/"], [str(tmp_path)], [str(tmp_path / "a/../other")]):
        with pytest.raises(ConfigurationError, match="may only be narrowed"):
            narrow_roots([str(tmp_path / "a")], wider, "k")
    with pytest.raises(ConfigurationError, match="list of strings"):
        narrow_roots([str(tmp_path)], "/", "k")
    assert narrow_limit(100, 10, "k") == 10 and narrow_limit(None, 10, "k") == 10
    with pytest.raises(ConfigurationError, match="more than the container's 100"):
        narrow_limit(100, 101, "k")
    with pytest.raises(ConfigurationError):
        narrow_limit(100, True, "k")
    assert narrow_subset(["a", "b"], ["a"], "k") == ["a"]
    with pytest.raises(ConfigurationError):
        narrow_subset(["a"], ["a", "z"], "k")
    assert narrow_networks(["10.0.0.0/8"], ["10.1.0.0/16"], "k") == ["10.1.0.0/16"]
    for wider in (["0.0.0.0/0"], ["::1/128"], ["11.0.0.0/8"]):
        with pytest.raises(ConfigurationError):
            narrow_networks(["10.0.0.0/8"], wider, "k")


def test_bounded_config_reads_the_container_layers_and_narrows(tmp_path: Path) -> None:
    """Process.bounded_config: the container's value (else the default), narrowed by app config
    and spawnargs; a widening one names its source."""
    cluster = ClockedCluster()
    home = cluster.start_container("home", "s", {"tests.core.test_security": {"roots": [str(tmp_path)]}})
    (tmp_path / "x").mkdir()
    proc = cluster.spawn_in(home, Process)
    proc.__class__ = Controlled  # a class of this module, whose section holds "roots"
    assert proc.bounded_config("roots", narrow_roots) == [str(tmp_path)]
    assert proc.bounded_config("other", narrow_roots, ["/srv"]) == ["/srv"]
    home.config.overlay_app("app1", {"tests.core.test_security": {"roots": [str(tmp_path / "x")]}})
    assert proc.bounded_config("roots", narrow_roots) == [str(tmp_path / "x")]
    proc.spawnargs["roots"] = [str(tmp_path)]  # wider than the app's: refused
    with pytest.raises(ConfigurationError, match="spawnargs of"):
        proc.bounded_config("roots", narrow_roots)
    home.config.overlay_app("app1", {"tests.core.test_security": {"roots": ["/"]}})
    with pytest.raises(ConfigurationError, match="config of app 'app1'"):
        proc.bounded_config("roots", narrow_roots)


def test_a_trusted_call_takes_its_answer_from_operators_only(log_events: list[Any]) -> None:
    """A call made ``trusted`` (the deployer's clients of system services) drops an answer published by
    another login (a forged reply, or a consumer of the service's queue under another login) and takes
    the system's own; an ordinary call takes the first answer, whoever sent it."""
    from twisted.internet import defer

    from ion.core.messaging import message as wire
    from tests.core.support import no_result

    class Slow(Process):
        name = "slow"

        def slc_init(self) -> None:
            self.pending: list[defer.Deferred[Any]] = []

        def op_wait(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending.append(d)
            return d

    cluster, home, insider, outsider = _system()
    slow = cluster.spawn_in(home, Slow)

    def forge(conv_id: str) -> None:
        reply = wire.build(sender=slow.id, sender_name="slow", receiver=insider.backend_name, op="result",
                           content={"path": "/home/victim/.ssh"}, conv_id=conv_id, conv_seq=2,
                           performative=wire.Performative.INFORM_RESULT)
        outsider._publish(reply)

    trusted = insider.rpc_send(slow.id, "wait", None, trusted=True)
    cluster.pump()
    forge(f"{insider.id}#1")
    cluster.pump()
    no_result(trusted)
    assert logged(log_events, "dropped a inform_result", "broker user 'mallory'")
    slow.pending[0].callback({"path": "/cache/entry"})
    assert cluster.result(trusted)[0] == {"path": "/cache/entry"}

    ordinary = insider.rpc_send(slow.id, "wait", None)
    cluster.pump()
    forge(f"{insider.id}#2")
    assert cluster.result(ordinary)[0] == {"path": "/home/victim/.ssh"}


def test_the_containers_own_bound_is_checked_too(tmp_path: Path) -> None:
    """A string where a list of roots is meant is a configuration error at spawn, never read letter
    by letter (which would allow "/")."""
    from ion.services.deploy.service import DeployService

    cluster = ClockedCluster()
    home = cluster.start_container("home", "s", {"ion.services.deploy": {"allowed_destinations": str(tmp_path),
                                                                         "job_dir": False}})
    with pytest.raises(ConfigurationError, match="allowed_destinations must be a list of strings"):
        cluster.spawn_in(home, DeployService)


def test_an_app_cannot_move_the_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache root bounds what Cache deletes and Unpack writes: an app's config or spawnargs may
    name a folder inside the container's root, never another; Unpack's default roots follow the
    container's own setting, not an app's."""
    from ion.services.cache.service import CacheService
    from ion.services.unpack.service import UnpackService, default_allowed_roots

    monkeypatch.setenv("ION_CACHE_DIR", str(tmp_path / "cache"))
    cluster = ClockedCluster()
    home = cluster.start_container("home", "s")
    home.config.overlay_app("evil", {"ion.services.cache": {"root": "/"}})
    with pytest.raises(ConfigurationError, match="may only be narrowed"):
        cluster.spawn_in(home, CacheService)
    assert default_allowed_roots(home.config) == [tmp_path / "cache"]
    unpack = cluster.spawn_in(home, UnpackService)
    assert unpack.allowed_roots == [(tmp_path / "cache").resolve()]
    home.config.remove_app("evil")
    inner = cluster.spawn_in(home, CacheService, {"root": str(tmp_path / "cache/inner")})
    assert inner.cache.root == tmp_path / "cache/inner"
