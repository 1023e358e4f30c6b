"""``twistd cc``: options, the plugin, the container service, log levels, and real twistd runs."""

from __future__ import annotations

import atexit
import io
import itertools
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import IServiceMaker
from twisted.internet import defer, task
from twisted.logger import FilteringLogObserver, LogLevel
from twisted.python import usage

from ion.core import tap
from ion.core.exceptions import ConfigurationError
from ion.core.lifecycle import State
from ion.core.log import file_observer, filtered_observer, level_predicate, read_levels, stdout_observer
from ion.core.tap import ContainerService, Options, parse_container_args
from ion.testing import rpc, test_config
from ion.testing.processes import WatchedProcess

REPO = Path(__file__).resolve().parents[2]
HELLO_APP = REPO / "res" / "apps" / "hello.app"


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


@pytest.fixture(autouse=True)
def _no_broker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tap.ENV_BROKER_USERNAME, raising=False)
    monkeypatch.delenv(tap.ENV_BROKER_PASSWORD, raising=False)
    monkeypatch.delenv("ION_LOGLEVELS", raising=False)


# -- options ---------------------------------------------------------------------------------------------
def test_defaults_use_the_embedded_broker() -> None:
    """Without broker options the container uses memory://, no files, the shell allowed."""
    options = parse()
    assert options["broker_url"] == "memory://"
    assert options["files"] == [] and options["no_shell"] is False
    assert options["container_args"] == {} and options["config_overrides"] == {}


def test_short_h_is_the_broker_host_and_help_stays_long() -> None:
    """-h HOST selects the AMQP transport (DESIGN §7); --help still prints the usage."""
    options = parse("-h", "rabbit.example", "-p", "5673", "-v", "ion", "--broker_username", "u",
                    "--broker_password", "p w")
    assert options["broker_url"] == "amqp://u:p%20w@rabbit.example:5673/ion"
    assert options["broker_display"] == "amqp://u@rabbit.example:5673/ion"
    assert (options["broker_host"], options["broker_port"], options["broker_vhost"]) == ("rabbit.example", 5673, "ion")
    with pytest.raises(SystemExit):
        parse("--help")
    with pytest.raises(usage.UsageError):
        parse("-h")  # needs a value


def test_long_broker_host_options_and_defaults() -> None:
    """--broker_host alone means port 5672, vhost '/', guest/guest."""
    options = parse("--broker_host", "localhost")
    assert options["broker_url"] == "amqp://guest:guest@localhost:5672/"
    assert options["broker_display"] == "amqp://guest@localhost:5672/"


def test_vhost_with_a_slash_is_quoted() -> None:
    """A vhost like '/ion' survives the URL round trip."""
    from ion.core.messaging.transport import parse_broker_url

    options = parse("-h", "h", "-v", "/ion")
    assert parse_broker_url(options["broker_url"]).vhost == "/ion"


def test_credfile_holds_user_and_password(tmp_path: Path) -> None:
    """--broker_credfile reads 'user password' from a file."""
    cred = tmp_path / "cred"
    cred.write_text("alice s3cret\n")
    options = parse("-h", "h", "--broker_credfile", str(cred))
    assert options["broker_username"] == "alice"
    assert options["broker_url"] == "amqp://alice:s3cret@h:5672/"
    assert "s3cret" not in options["broker_display"]


@pytest.mark.parametrize("text", ["alice\n", "alice s3cret extra\n", ""])
def test_malformed_credfile_is_refused_without_echoing_it(tmp_path: Path, text: str) -> None:
    """A credfile that is not exactly two words is a usage error that does not show its content."""
    cred = tmp_path / "cred"
    cred.write_text(text)
    with pytest.raises(usage.UsageError, match="user password") as info:
        parse("-h", "h", "--broker_credfile", str(cred))
    assert "s3cret" not in str(info.value)


def test_missing_credfile_and_credfile_plus_login_are_refused(tmp_path: Path) -> None:
    """An unreadable credfile, or a credfile given with --broker_username, is a usage error."""
    with pytest.raises(usage.UsageError, match="cannot read"):
        parse("-h", "h", "--broker_credfile", str(tmp_path / "nope"))
    cred = tmp_path / "cred"
    cred.write_text("a b")
    with pytest.raises(usage.UsageError, match="not both"):
        parse("-h", "h", "--broker_credfile", str(cred), "--broker_username", "x")


def test_credentials_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """$ION_BROKER_USERNAME/$ION_BROKER_PASSWORD fill in a login the command line does not give."""
    monkeypatch.setenv(tap.ENV_BROKER_USERNAME, "envuser")
    monkeypatch.setenv(tap.ENV_BROKER_PASSWORD, "envpass")
    assert parse("-h", "h")["broker_url"] == "amqp://envuser:envpass@h:5672/"
    assert parse("-h", "h", "--broker_username", "cli")["broker_url"] == "amqp://cli:envpass@h:5672/"
    assert parse("--broker", "amqp://rabbit:5999/v")["broker_url"] == "amqp://envuser:envpass@rabbit:5999/v"
    # The embedded broker ignores them.
    assert parse()["broker_url"] == "memory://"


def test_broker_url_option() -> None:
    """--broker gives the whole URL; its own login wins over the environment."""
    options = parse("--broker", "amqp://bob:pw@rabbit:5673/vh")
    assert options["broker_url"] == "amqp://bob:pw@rabbit:5673/vh"
    assert options["broker_display"] == "amqp://bob@rabbit:5673/vh"
    assert parse("--broker", "memory://")["broker_url"] == "memory://"


def test_broker_given_more_than_once_is_a_list_tried_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """--broker URL --broker URL2: the nodes of one cluster, in order (each with its own login, else
    the command line's or the environment's); one --broker or -h stays a one-address list."""
    monkeypatch.setenv(tap.ENV_BROKER_PASSWORD, "envpass")
    options = parse("--broker", "amqp://bob:pw@rabbit1:5673/vh", "--broker", "amqp://rabbit2/vh")
    assert options["broker_urls"] == ["amqp://bob:pw@rabbit1:5673/vh", "amqp://guest:envpass@rabbit2:5672/vh"]
    assert options["broker_url"] == "amqp://bob:pw@rabbit1:5673/vh"
    assert options["broker_display"] == "amqp://bob@rabbit1:5673/vh, amqp://guest@rabbit2:5672/vh"
    assert (options["broker_host"], options["broker_port"], options["broker_username"]) == ("rabbit1", 5673, "bob")
    assert "pw" not in options["broker_display"] and "envpass" not in options["broker_display"]
    assert parse("--broker", "amqp://bob:pw@rabbit1:5673/vh")["broker_urls"] == ["amqp://bob:pw@rabbit1:5673/vh"]
    assert parse("-h", "h")["broker_urls"] == ["amqp://guest:envpass@h:5672/"]
    assert parse()["broker_urls"] == []  # none given: the config's brokers, else memory://
    with pytest.raises(usage.UsageError, match="cannot be one of several"):
        parse("--broker", "amqp://h1/", "--broker", "memory://")


def test_broker_comma_list_is_several_addresses() -> None:
    """--broker URL1,URL2 is --broker URL1 --broker URL2; a comma inside a password is no separator."""
    options = parse("--broker", "amqp://u:p@n1:5999/v, amqp://u:p@n2:5999/v", "--broker", "amqp://u:p@n3:5999/v")
    assert options["broker_urls"] == ["amqp://u:p@n1:5999/v", "amqp://u:p@n2:5999/v", "amqp://u:p@n3:5999/v"]
    assert parse("--broker", "amqp://u:a,b@n1:5999/v")["broker_urls"] == ["amqp://u:a%2Cb@n1:5999/v"]


def test_service_queue_type_quorum_by_default_with_several_brokers() -> None:
    """Shared queues are quorum queues (durable, a delivery limit, their own arguments kept) when the
    container has several broker addresses or the config says quorum; classic otherwise, and always
    on the embedded broker."""
    from ion.core.container import Container

    two = ["amqp://u:p@n1:5999/v", "amqp://u:p@n2:5999/v"]
    cluster = Container(config=test_config(), broker_url=two)
    assert cluster.service_queue_type == "quorum"
    durable, args = cluster.shared_queue_options({"x-single-active-consumer": True})
    assert durable and args == {"x-queue-type": "quorum", "x-delivery-limit": 20, "x-single-active-consumer": True}
    single = Container(config=test_config(), broker_url=two[0])
    assert single.service_queue_type == "classic" and single.shared_queue_options() == (False, None)
    chosen = test_config({"ion.core.messaging": {"service_queue_type": "quorum", "quorum_delivery_limit": 5}})
    assert Container(config=chosen, broker_url=two[0]).shared_queue_options()[1] == {
        "x-queue-type": "quorum", "x-delivery-limit": 5}
    classic = test_config({"ion.core.messaging": {"service_queue_type": "classic"}})
    assert Container(config=classic, broker_url=two).service_queue_type == "classic"
    assert Container(config=chosen, broker_url="memory://").service_queue_type == "classic"
    with pytest.raises(ConfigurationError, match="service_queue_type must be one of"):
        Container(config=test_config({"ion.core.messaging": {"service_queue_type": "stream"}}),
                  broker_url=two).shared_queue_options()


def test_container_takes_the_configs_brokers_when_the_command_line_names_none() -> None:
    """Without a broker option the container uses ``brokers`` of ion.core.messaging (a list, tried
    in turn), else the embedded broker; a broker option wins over the config."""
    from ion.core.container import Container
    from ion.core.messaging.amqp import AmqpTransport

    config = test_config({"ion.core.messaging": {"brokers": ["amqp://u:p@n1:5999/v", "amqp://u:p@n2:5999/v"]}})
    listed = Container(config=config, broker_url=None)
    assert isinstance(listed.transport, AmqpTransport)
    assert [(u.host, u.port) for u in listed.transport.urls] == [("n1", 5999), ("n2", 5999)]
    assert listed.broker_urls == ["amqp://u:p@n1:5999/v", "amqp://u:p@n2:5999/v"]
    assert Container(config=test_config(), broker_url=None).broker_url == "memory://"
    assert Container(config=config, broker_url="memory://").broker_url == "memory://"
    with pytest.raises(ConfigurationError, match="brokers must be"):
        Container(config=test_config({"ion.core.messaging": {"brokers": "amqp://n1/"}}))


@pytest.mark.parametrize("argv, match", [
    (["--broker", "memory://", "--broker_host", "h"], "names the host"),
    (["--broker", "amqp://h/", "--broker_port", "5"], "names the host"),
    (["--broker", "amqp://u:p@h/", "--broker_username", "x"], "not both"),
    (["--broker", "memory://", "--broker_username", "x"], "only for an AMQP broker"),
    (["--broker", "ftp://h"], "No such transport"),
    (["--broker_port", "5673"], "only with an AMQP broker"),
    (["--broker_password", "x"], "only with an AMQP broker"),
    (["-h", "h", "-p", "http"], "must be a number"),
    (["-h", "h", "-p", "70000"], "out of range"),
    (["-h", "a/b"], "not a host name"),
])
def test_broker_option_errors(argv: list[str], match: str) -> None:
    """Inconsistent broker options are usage errors that say what is wrong."""
    with pytest.raises(usage.UsageError, match=match):
        parse(*argv)


def test_sysname_option_and_args() -> None:
    """-s NAME is -a sysname=NAME; both given must agree."""
    assert parse("-s", "sys1")["container_args"] == {"sysname": "sys1"}
    assert parse("--sysname", "sys1", "-a", "sysname=sys1")["sysname"] == "sys1"
    assert parse("-a", "sysname=sys2")["sysname"] == "sys2"
    with pytest.raises(usage.UsageError, match="disagree"):
        parse("-s", "one", "-a", "sysname=two")
    with pytest.raises(usage.UsageError, match="system name"):
        parse("-s", "a#b")


def test_args_key_value_form() -> None:
    """-a k=v,...: literals parsed, nested commas kept, dotted keys become config overrides."""
    options = parse("-a", "sysname=s1, contid=c1, apparg_hello={'greeting': 'Hi', 'n': [1, 2]},"
                          "ion.core.process.rpc_timeout=5,flag=on")
    assert options["container_args"] == {
        "sysname": "s1", "contid": "c1", "apparg_hello": {"greeting": "Hi", "n": [1, 2]}, "flag": "on"}
    assert options["config_overrides"] == {"ion.core.process": {"rpc_timeout": 5}}


def test_args_dict_literal_form_and_repetition() -> None:
    """-a takes a dict literal too, and several -a merge."""
    options = parse("-a", "{'sysname': 'd', 'ion.core.process.rpc_timeout': 2.5}",
                    "--args", "ion.core.process.terminate_timeout=1,ion.services.hello.greeting='Yo, there'")
    assert options["container_args"] == {"sysname": "d"}
    assert options["config_overrides"] == {
        "ion.core.process": {"rpc_timeout": 2.5, "terminate_timeout": 1},
        "ion.services.hello": {"greeting": "Yo, there"}}


@pytest.mark.parametrize("value, match", [
    ("novalue", "not key=value"),
    ("=3", "not key=value"),
    ("{'a': 1", "not a valid dict literal"),
    ("{1, 2}", "must be a dict"),
    ("a=[1,2", "unbalanced"),
    ("bad key=1", "not a valid argument name"),
    (".x=1", "not <module>.<key>"),
])
def test_args_errors(value: str, match: str) -> None:
    """Malformed -a values are usage errors."""
    with pytest.raises(usage.UsageError, match=match):
        parse("-a", value)


def test_parse_container_args_directly() -> None:
    """parse_container_args splits args from config overrides at the last dot."""
    args, overrides = parse_container_args("a.b.c.key=x,plain=1")
    assert args == {"plain": 1} and overrides == {"a.b.c": {"key": "x"}}


def test_positional_files_and_app_names(tmp_path: Path) -> None:
    """Positional arguments are .app/.rel files (which must exist) or app names."""
    rel = tmp_path / "r.rel"
    rel.write_text("{}")
    options = parse("--no-shell", str(HELLO_APP), str(rel), "hello")
    assert options["files"] == [str(HELLO_APP), str(rel), "hello"]
    assert options["no_shell"] is True
    with pytest.raises(usage.UsageError, match="no such file"):
        parse(str(tmp_path / "missing.app"))
    with pytest.raises(usage.UsageError, match="expected an .app or .rel"):
        parse(str(tmp_path / "notes.txt"))
    with pytest.raises(usage.UsageError, match="neither"):
        parse("hello.txt")


def test_bad_loglevels_file_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log-levels file with an unknown level stops the command line."""
    bad = tmp_path / "levels.config"
    bad.write_text("{'ion': 'loud'}")
    monkeypatch.setenv("ION_LOGLEVELS", str(bad))
    with pytest.raises(usage.UsageError, match="unknown log level 'loud'"):
        parse()


# -- the plugin ---------------------------------------------------------------------------------------------
def test_plugin_is_found() -> None:
    """getPlugins(IServiceMaker) finds 'cc', pointing at ion.core.tap."""
    from twisted import plugins
    from twisted.plugin import getPlugins

    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker, plugins)}
    assert "cc" in makers
    cc = makers["cc"]
    assert cc.module == "ion.core.tap"
    assert cc.options is Options
    assert cc.makeService is tap.makeService


def test_twistd_command_line_installs_the_filtered_stdout_logger() -> None:
    """`twistd -n cc` parses through the plugin and logs to stdout through the level filter."""
    from twisted.scripts.twistd import ServerOptions

    config = ServerOptions()
    config.parseOptions(["-n", "cc", "--no-shell", "-s", "x"])
    assert config.subCommand == "cc"
    assert isinstance(config.subOptions, Options) and config.subOptions["sysname"] == "x"
    assert config["logger"] is stdout_observer

    with_file = ServerOptions()
    with_file.parseOptions(["-n", "--logfile", "cc.log", "cc"])
    assert with_file["logger"] is file_observer  # the same lines, in twistd's rotating file


def test_make_service_returns_a_container_service() -> None:
    """makeService gives a not-yet-started ContainerService for the options, which remembers a
    SIGTERM that comes before it starts (twistd sets the reactor up in between)."""
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    try:
        svc = tap.makeService(parse("--no-shell"))
        assert isinstance(svc, ContainerService) and not svc.running
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the service's early handler
        assert svc._early_term
    finally:
        signal.signal(signal.SIGTERM, before)


def test_run_cc_runs_twistd_cc(monkeypatch: pytest.MonkeyPatch) -> None:
    """ion-cc runs `twistd -n cc` in process, without a pid file, passing its arguments on."""
    import twisted.scripts.twistd as twistd

    seen: list[list[str]] = []
    monkeypatch.setattr(twistd, "run", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["ion-cc"])
    tap.run_cc(["--no-shell", "res/apps/hello.app"])
    assert seen == [["twistd", "-n", "--pidfile=", "cc", "--no-shell", "res/apps/hello.app"]]


# -- log levels -------------------------------------------------------------------------------------------------
def test_read_levels_and_predicate(tmp_path: Path) -> None:
    """A levels file maps namespaces (and everything below them) to levels."""
    path = tmp_path / "levels.config"
    path.write_text("# comment\n{'': 'warn', 'ion': 'info', 'ion.core.messaging': 'error', 'x': 'WARNING'}")
    levels = read_levels(path)
    assert levels == {"": LogLevel.warn, "ion": LogLevel.info, "ion.core.messaging": LogLevel.error,
                      "x": LogLevel.warn}
    predicate = level_predicate(levels)
    assert predicate.logLevelForNamespace("ion.core.messaging.memory.MemoryBroker") == LogLevel.error
    assert predicate.logLevelForNamespace("ion.core.container") == LogLevel.info
    assert predicate.logLevelForNamespace("twisted.internet") == LogLevel.warn


def test_filtered_observer_drops_events_below_their_level() -> None:
    """filtered_observer lets through only events at or above their namespace's level."""
    seen: list[dict[str, Any]] = []
    observer = filtered_observer(seen.append, {"": LogLevel.info, "noisy": LogLevel.error})
    assert isinstance(observer, FilteringLogObserver)
    for ns, level in [("noisy.a", LogLevel.warn), ("noisy.a", LogLevel.error), ("ion.x", LogLevel.debug),
                      ("ion.x", LogLevel.info)]:
        observer({"log_namespace": ns, "log_level": level, "log_format": "m"})
    assert [(e["log_namespace"], e["log_level"]) for e in seen] == [("noisy.a", LogLevel.error),
                                                                    ("ion.x", LogLevel.info)]


def test_loglevels_env_names_another_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$ION_LOGLEVELS replaces res/logging/loglevels.config; a missing named file is an error."""
    path = tmp_path / "mine.config"
    path.write_text("{'ion': 'debug'}")
    monkeypatch.setenv("ION_LOGLEVELS", str(path))
    assert read_levels() == {"ion": LogLevel.debug}
    monkeypatch.setenv("ION_LOGLEVELS", str(tmp_path / "none.config"))
    with pytest.raises(ConfigurationError, match="cannot read"):
        read_levels()


def test_shipped_loglevels_file_parses() -> None:
    """res/logging/loglevels.config is valid and quiets the messaging layer."""
    levels = read_levels(REPO / "res" / "logging" / "loglevels.config")
    assert levels["ion.core.messaging"] == LogLevel.warn


def test_stdout_observer_writes_filtered_text() -> None:
    """The twistd logger factory writes text lines, filtered by level."""
    stream = io.StringIO()
    observer = stdout_observer(stream)
    observer({"log_namespace": "ion.core.messaging.memory", "log_level": LogLevel.info,
              "log_format": "hidden", "log_time": 0})
    observer({"log_namespace": "ion.core.container", "log_level": LogLevel.info,
              "log_format": "shown {x}", "x": 1, "log_time": 0})
    assert "shown 1" in stream.getvalue() and "hidden" not in stream.getvalue()


# -- the service, in process ------------------------------------------------------------------------------------
class ClockReactor(task.Clock):
    """A Clock with just enough reactor for ContainerService (stop, callWhenRunning)."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = 0

    def stop(self) -> None:
        self.stopped += 1

    def callWhenRunning(self, f: Any, *a: Any, **kw: Any) -> None:
        f(*a, **kw)

    def pump(self) -> None:
        for _ in range(1000):
            if not [c for c in self.getDelayedCalls() if c.getTime() <= self.seconds()]:
                return
            self.advance(0)


class FakeShell:
    """Records what the service hands the shell."""

    def __init__(self, namespace: dict[str, Any], **kwargs: Any) -> None:
        self.namespace = namespace
        self.kwargs = kwargs
        self.started = self.closed = False

    def start(self) -> None:
        self.started = True

    def close(self) -> None:
        self.closed = True


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def service_for(*argv: str, **kwargs: Any) -> ContainerService:
    kwargs.setdefault("exit_on_error", False)
    kwargs.setdefault("install_signal_handlers", False)
    # No audit file in the working folder (twistd's default): the audit has tests of its own.
    kwargs.setdefault("config", test_config({"ion.core.audit": {"path": None}}))
    kwargs.setdefault("stderr", io.StringIO())
    return ContainerService(parse(*argv), **kwargs)


@pytest_twisted.ensureDeferred
async def test_service_starts_container_and_apps_then_stops_in_reverse(broker: Any) -> None:
    """startService: container + apps, with the command-line config on top; stopService: reverse order."""
    svc = service_for("--no-shell", "-s", "tapsys", "-a", "contid=tap1,ion.services.hello.greeting=Howdy",
                      str(HELLO_APP), broker=broker)
    svc.startService()
    container = await svc.started
    assert container is svc.container and container.state is State.ACTIVE
    assert (container.id, container.sysname) == ("tap1", "tapsys")
    assert list(container.app_manager.running) == ["hello"]
    assert await rpc(container, "hello", "hello", "you") == {"value": "Howdy, you"}
    assert svc.shell is None and svc.error is None

    order: list[str] = []
    container.proc_manager.add_exit_listener(lambda proc, state: order.append(proc.proc_name))
    await svc.stopService()
    assert container.state is State.TERMINATED
    assert order == ["hello", "agent"]
    assert not svc.running


@pytest_twisted.ensureDeferred
async def test_systemd_is_told_ready_then_stopping(broker: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With $NOTIFY_SOCKET (a systemd Type=notify unit): READY=1 once the apps run, STOPPING=1 at stop."""
    import socket

    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        systemd.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        svc = service_for("--no-shell", "-a", "contid=sd1", str(HELLO_APP), broker=broker)
        svc.startService()
        await svc.started
        assert systemd.recv(200).split(b"\n")[0] == b"READY=1"
        await svc.stopService()
        assert systemd.recv(200) == b"STOPPING=1"


@pytest_twisted.ensureDeferred
async def test_failed_start_prints_one_error_line(broker: Any, tmp_path: Path) -> None:
    """A bad app ends the start with one 'Error:' line and a sysexits code; the container is stopped."""
    bad = tmp_path / "bad.app"
    bad.write_text('{"type": "application", "name": "bad", "version": "0.1",'
                   ' "mod": ("ion.core.apps.processapp", ["bad", "no_such_module_x", "X"], {})}')
    stderr = io.StringIO()
    svc = service_for("--no-shell", str(bad), broker=broker, stderr=stderr)
    svc.startService()
    await svc.started
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: app bad: cannot import")
    assert svc.exit_code == tap.EX_CONFIG
    await svc.stopService()
    assert svc.container.state is State.TERMINATED


@pytest_twisted.ensureDeferred
async def test_dependency_cycle_is_one_error_line(broker: Any, tmp_path: Path) -> None:
    """An app dependency cycle is reported as one line naming the cycle."""
    for name, dep in (("a", "b"), ("b", "a")):
        (tmp_path / f"{name}.app").write_text(
            f'{{"type": "application", "name": "{name}", "applications": ["{dep}"],'
            f' "mod": ("ion.core.apps.processapp", ["{name}", "ion.services.hello", "HelloService"], {{}})}}')
    stderr = io.StringIO()
    svc = service_for("--no-shell", str(tmp_path / "a.app"), broker=broker, stderr=stderr)
    svc.startService()
    await svc.started
    assert stderr.getvalue() == "Error: dependency cycle between apps: a -> b -> a\n"
    await svc.stopService()


def test_failed_start_under_twistd_stops_the_reactor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With exit_on_error the service stops the reactor and arranges a non-zero exit code."""
    import atexit

    registered: list[tuple[Any, ...]] = []
    monkeypatch.setattr(atexit, "register", lambda *a: registered.append(a))
    reactor = ClockReactor()
    svc = service_for("--no-shell", "no_such_app_here", reactor=reactor, exit_on_error=True)
    svc.startService()
    reactor.pump()
    assert svc.error is not None and "no app named 'no_such_app_here'" in svc.error
    assert reactor.stopped == 1
    assert registered == [(tap._exit_now, tap.EX_CONFIG)]
    svc.stopService()
    reactor.pump()


def test_shell_opens_on_a_terminal_and_leaving_it_stops_the_reactor() -> None:
    """On a tty the shell opens with the helpers; its on_exit stops the reactor; stopService closes it."""
    reactor = ClockReactor()
    svc = service_for(reactor=reactor, stdin=TTY(), shell_factory=FakeShell)
    svc.startService()
    reactor.pump()
    shell = svc.shell
    assert isinstance(shell, FakeShell) and shell.started
    assert {"ps", "rpc_send", "info", "container"} <= set(shell.namespace)
    assert [p["name"] for p in shell.namespace["ps"]()] == ["agent", "shell"]
    shell.kwargs["on_exit"]()
    assert reactor.stopped == 1
    d = svc.stopService()
    reactor.pump()
    assert shell.closed and d.called
    assert svc.container.state is State.TERMINATED


def test_no_shell_without_a_terminal_or_with_no_shell() -> None:
    """No tty, or --no-shell, means no shell."""
    for argv, stdin in (((), io.StringIO()), (("--no-shell",), TTY())):
        reactor = ClockReactor()
        svc = service_for(*argv, reactor=reactor, stdin=stdin, shell_factory=FakeShell)
        svc.startService()
        reactor.pump()
        assert svc.container.state is State.ACTIVE and svc.shell is None
        svc.stopService()
        reactor.pump()


def test_sigterm_caught_by_the_reactor_handler_still_exits_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM that the reactor's own handler took (a start-up race) is not re-raised by twistd at exit."""
    import signal

    installed: list[Any] = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.append((signum, handler)))
    reactor = ClockReactor()
    svc = service_for("--no-shell", reactor=reactor, install_signal_handlers=True)
    svc.startService()
    reactor.pump()
    assert [s for s, _ in installed] == [signal.SIGTERM, signal.SIGTERM]
    reactor._exitSignal = signal.SIGTERM  # what the reactor's sigTerm records before it stops
    installed.clear()
    d = svc.stopService()
    reactor.pump()
    assert d.called and reactor._exitSignal is None
    assert installed == [(signal.SIGTERM, svc._on_sigterm)]  # a second SIGTERM still kills


def test_other_exit_signals_are_left_to_twistd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only SIGTERM is a requested stop; a SIGINT stays recorded for twistd to re-raise."""
    import signal

    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)
    reactor = ClockReactor()
    svc = service_for("--no-shell", reactor=reactor, install_signal_handlers=True)
    svc.startService()
    reactor.pump()
    reactor._exitSignal = signal.SIGINT
    svc.stopService()
    reactor.pump()
    assert reactor._exitSignal == signal.SIGINT


# -- real twistd runs ---------------------------------------------------------------------------------------------
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

#: Where the twistd children of these tests keep their audit files (removed at exit).
_AUDIT_DIR = Path(tempfile.mkdtemp(prefix="ion-test-audit-"))
atexit.register(shutil.rmtree, _AUDIT_DIR, True)
_AUDITS = itertools.count(1)


def spawn_twistd(*args: str, env: dict[str, str] | None = None, use_pty: bool = False,
                 twistd_args: tuple[str, ...] = ("-n", "--pidfile="), tee: Path | None = None,
                 cwd: Path = REPO) -> WatchedProcess:
    """Run `twistd TWISTD_ARGS cc ARGS` (default `-n --pidfile=`) from ``cwd`` (the repo root),
    collecting its output; on a pty with ``use_pty``; with ``tee``, as `twistd ... | tee TEE`
    (stdout a pipe, stdin and stderr still the terminal)."""
    from twisted.internet import reactor

    proto = WatchedProcess("twistd")
    child_env = dict(os.environ)
    child_env.pop("ION_LOGLEVELS", None)
    child_env.setdefault("PYTHONPATH", str(REPO))
    child_env.update(env or {})
    # Its audit file out of the repository (twistd's default: its working folder).
    audit = ["-a", f"ion.core.audit.path={_AUDIT_DIR / f'audit-{next(_AUDITS)}.jsonl'}"]
    argv = [sys.executable, "-c", TWISTD, *twistd_args, "cc", *audit, *args]
    if tee is not None:
        argv = ["/bin/sh", "-c", '"$@" | tee "$ION_TEST_TEE"', "sh", *argv]
        child_env["ION_TEST_TEE"] = str(tee)
    reactor.spawnProcess(proto, argv[0], argv, env=child_env, path=str(cwd), usePTY=use_pty)
    return proto


def ended_in(proto: WatchedProcess, timeout: float = 30) -> defer.Deferred[int]:
    from twisted.internet import reactor

    return proto.ended.addTimeout(timeout, reactor)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_twistd_cc_runs_hello_and_sigterm_exits_zero() -> None:
    """`twistd -n cc --no-shell res/apps/hello.app` starts hello; SIGTERM stops it cleanly, exit 0."""
    code, out = await sigterm_hello_after(b"started app hello")
    assert code == 0, out
    assert "Traceback" not in out
    assert "stopped app hello" in out and "container" in out and "stopped" in out


async def sigterm_hello_after(line: bytes) -> tuple[int, str]:
    """Run hello.app under twistd, SIGTERM it once it printed ``line``; its exit code and output."""
    proto = spawn_twistd("--no-shell", "res/apps/hello.app")
    try:
        await proto.wait_for(line)  # fails with the child's output
    except RuntimeError:
        if proto.exit_code is None:
            proto.transport.signalProcess("KILL")
        raise
    proto.transport.signalProcess("TERM")
    code = await ended_in(proto)
    return code, proto.output.decode(errors="replace")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_twistd_cc_with_a_log_file_logs_there(tmp_path: Path) -> None:
    """`twistd -n --logfile FILE cc ...`: the container's lines go to FILE (through ion's observer, with its
    levels and trace ids), not to the terminal."""
    from twisted.internet import reactor
    from twisted.scripts._twistd_unix import ServerOptions

    from ion.core.log import file_observer, stdout_observer

    parsed = ServerOptions()
    parsed.parseOptions(["-n", "--logfile", str(tmp_path / "x.log"), "cc", "--no-shell"])
    assert parsed["logger"] is file_observer  # (twistd's own file observer would drop the trace ids)
    parsed = ServerOptions()
    parsed.parseOptions(["-n", "cc", "--no-shell"])
    assert parsed["logger"] is stdout_observer

    log = tmp_path / "cc.log"
    proto = spawn_twistd("--no-shell", "res/apps/hello.app", twistd_args=("-n", "--pidfile=", "--logfile", str(log)))
    try:
        for _ in range(400):  # bounded: the container writes its start lines to the file
            if log.exists() and "started app hello" in log.read_text():
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        assert "started app hello" in log.read_text()
    finally:
        if proto.exit_code is None:
            proto.transport.signalProcess("TERM")
        await ended_in(proto)
    assert "started app hello" not in proto.output.decode(errors="replace")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_twistd_cc_sigterm_while_the_reactor_starts_exits_zero() -> None:
    """A SIGTERM sent as the reactor starts (its handlers and ours race) still stops cleanly with 0."""
    code, out = await sigterm_hello_after(b"reactor class")
    assert code == 0, out
    assert "Traceback" not in out


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_twistd_cc_with_a_broken_app_file_exits_non_zero(tmp_path: Path) -> None:
    """A broken app file: one 'Error:' line, no traceback, non-zero exit."""
    bad = tmp_path / "x" / "bad.app"
    bad.parent.mkdir()
    bad.write_text('{"type": "application", "name": "bad",\n  "mod": ("ion.core.apps.processapp", [\n')
    proto = spawn_twistd("--no-shell", str(bad))
    code = await ended_in(proto)
    out = proto.output.decode(errors="replace")
    assert code != 0, out
    assert [line for line in out.splitlines() if line.startswith("Error:")] == [
        line for line in out.splitlines() if "Error:" in line]
    assert len([line for line in out.splitlines() if line.startswith("Error:")]) == 1, out
    assert "bad.app" in out and "Traceback" not in out



# -- issue #15: README's commands verbatim ---------------------------------------------------------------
def test_foreground_twistd_cc_writes_no_pid_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """`twistd -n cc` writes no ./twistd.pid (two containers may run in one folder) unless
    --pidfile is given; a daemon keeps twistd's default."""
    from twisted.scripts.twistd import ServerOptions

    def parsed(*argv: str) -> ServerOptions:
        monkeypatch.setattr(sys, "argv", ["twistd", *argv])
        config = ServerOptions()
        config.parseOptions(list(argv))
        return config

    assert parsed("-n", "cc", "--no-shell")["pidfile"] == ""
    assert parsed("-n", "--pidfile", "twistd.pid", "cc")["pidfile"] == os.path.abspath("twistd.pid")
    assert parsed("-n", "--pidf=mine.pid", "cc")["pidfile"] == os.path.abspath("mine.pid")
    assert parsed("cc", "--no-shell")["pidfile"] == os.path.abspath("twistd.pid")
    assert not tap._pidfile_given(["-n", "cc", "--pidfile", "x"])  # after cc: not twistd's option


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_missing_app_file_is_one_line_without_the_usage() -> None:
    """`twistd [-n] cc res/apps/nosuch.app` prints one line (no `twistd [options]` usage) and exits 64."""
    proto = spawn_twistd("res/apps/nosuch.app", twistd_args=("-n",))
    code = await ended_in(proto)
    out = proto.output.decode(errors="replace")
    assert code == 64, out
    assert out.strip().splitlines() == ["Error: res/apps/nosuch.app: no such file"], out
    proto = spawn_twistd("res/apps/nosuch.app", twistd_args=())  # as a daemon: refused before it forks
    assert await ended_in(proto) == 64
    assert proto.output.decode(errors="replace").strip() == "Error: res/apps/nosuch.app: no such file"
    proto = spawn_twistd("--no-such-option", twistd_args=("-n",))
    assert await ended_in(proto) == 64
    assert proto.output.decode(errors="replace").strip() == (
        "Error: option --no-such-option not recognized (twistd cc --help lists the options)")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_readme_two_terminals_in_one_folder(amqp_url: str) -> None:
    """README's "Many containers" commands in two terminals of one folder, as written (the
    broker's port and vhost are the test's): the second no longer stops with "Another twistd
    server is running"; its shell calls hello in the first."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(amqp_url)
    broker = ["-p", str(parts.port), "-v", unquote(parts.path.lstrip("/")) or "/"]
    env = {"ION_SHELL_HISTORY": ""}
    first = spawn_twistd("-h", "127.0.0.1", *broker, "-s", "mysys", "res/apps/hello.app", env=env,
                         twistd_args=("-n",), use_pty=True)
    second = None
    try:
        await first.wait_for(b"><> ")
        second = spawn_twistd("-h", "127.0.0.1", *broker, "-s", "mysys", env=env, twistd_args=("-n",),
                              use_pty=True)
        await second.wait_for(b"><> ")
        second.transport.write(b"rpc_send('hello', 'hello', 'x')\r")
        await second.wait_for(b"{'value': 'Hello there, x'}")
        for proto in (second, first):
            proto.transport.write(b"\x04")
            assert await ended_in(proto) == 0, proto.tail()
    finally:
        for proto in (first, second):
            if proto is not None and proto.exit_code is None:
                proto.transport.signalProcess("KILL")
    for proto in (first, second):
        assert b"Another twistd server" not in proto.output and b"Traceback" not in proto.output, proto.tail()
    assert not (REPO / "twistd.pid").exists()
