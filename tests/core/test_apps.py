"""App and rel files, and the app manager: dependencies, cycles, releases, kwargs, spawn by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.logger import capturedLogs, formatEvent

from ion.core.apps.appfile import PROCESSAPP, load_app_file, load_rel_file, parse_app
from ion.core.config import resource_root
from ion.core.exceptions import AppError, ConfigurationError
from ion.core.lifecycle import State
from ion.services.hello import HelloClient, HelloService
from ion.testing import client_process, rpc
from tests.core import apps_fixtures as fx
from tests.core.apps_fixtures import write_app, write_rel


@pytest.fixture(autouse=True)
def _clean_fixture_state():
    fx.reset()
    yield
    fx.reset()


@pytest.fixture
def apps_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "apps"
    folder.mkdir()
    return folder


def use_apps(container, folder: Path) -> None:
    """Let ``container`` find the app files in ``folder`` by name."""
    container.app_manager.search_path.insert(0, folder)


def recorders(container):
    """The live test processes of ``container`` (it also runs its own, e.g. the agent)."""
    return [p for p in container.proc_manager.processes.values() if isinstance(p, fx.Recorder)]


def app_procs(container, name: str):
    """The live processes of a running processapp, in start order."""
    supervisor = container.app_manager.running[name].state
    return [container.proc_manager.get(pid) for pid in supervisor.pids]


# ---------------------------------------------------------------------------------------------------
# .app files
# ---------------------------------------------------------------------------------------------------
def test_shipped_hello_app_loads():
    """res/apps/hello.app parses into the hello processapp with its config."""
    app = load_app_file(resource_root() / "apps" / "hello.app")
    assert app.name == "hello"
    assert app.module == PROCESSAPP
    assert app.args == ("hello", "ion.services.hello", "HelloService")
    assert app.kwargs == {}
    assert app.applications == ()
    assert app.config == {"ion.services.hello": {"greeting": "Hello there"}}


def test_app_file_round_trip(apps_dir):
    """Every key written to an app file comes back in the AppDefinition."""
    path = write_app(apps_dir, "a", applications=["b", "c"], kwargs={"x": 1}, version="2.5",
                     config={"tests.core": {"k": "v"}})
    app = load_app_file(path)
    assert (app.name, app.version, app.description) == ("a", "2.5", "test app a")
    assert app.args == ("a", "tests.core.apps_fixtures", "Recorder")
    assert app.kwargs == {"label": "a", "x": 1}
    assert app.applications == ("b", "c")
    assert app.config == {"tests.core": {"k": "v"}}
    assert app.path == path


@pytest.mark.parametrize("expression", [
    "__import__('os').makedirs({marker!r})",
    "open({marker!r}, 'w').close()",
    "[open({marker!r}, 'w') for _ in 'x']",
    "(lambda: open({marker!r}, 'w'))()",
])
def test_app_file_with_code_is_refused_and_never_run(tmp_path, expression):
    """An app file with a call in it is refused with ConfigurationError, and the call never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.app"
    path.write_text('{"type": "application", "name": "evil", "version": '
                    + expression.format(marker=str(marker)) + "}\n")
    with pytest.raises(ConfigurationError) as info:
        load_app_file(path)
    assert str(path) in str(info.value)
    assert "only literals" in str(info.value)
    assert not marker.exists()


def test_app_file_with_a_bare_name_is_refused(tmp_path):
    """A name (not a string) in an app file is refused: files are data, not code."""
    path = tmp_path / "named.app"
    path.write_text('{"type": "application", "name": hello}\n')
    with pytest.raises(ConfigurationError, match="only literals"):
        load_app_file(path)


def test_malformed_app_file_names_the_file_and_line(tmp_path):
    """A syntax error is reported with the file and the line it is on."""
    path = tmp_path / "broken.app"
    path.write_text('{\n  "type": "application",\n  "name": "broken"\n  "version": "0.1",\n}\n')
    with pytest.raises(ConfigurationError) as info:
        load_app_file(path)
    assert str(path) in str(info.value)
    assert "line 3" in str(info.value) or "line 4" in str(info.value)


def test_missing_app_file_is_a_configuration_error(tmp_path):
    """An app file that cannot be read gives a ConfigurationError naming it."""
    path = tmp_path / "nothere.app"
    with pytest.raises(ConfigurationError, match="cannot read app file .*nothere.app"):
        load_app_file(path)


@pytest.mark.parametrize("data, key", [
    ({"type": "application"}, "'name'"),
    ({"name": ""}, "'name'"),
    ({"name": 5}, "'name'"),
    ({"name": "x", "type": "library"}, "'type'"),
    ({"name": "x", "version": 1.0}, "'version'"),
    ({"name": "x", "description": ["a"]}, "'description'"),
    ({"name": "x", "mod": "ion.core.apps.processapp"}, "'mod'"),
    ({"name": "x", "mod": ()}, "'mod'"),
    ({"name": "x", "mod": (5, [], {})}, "'mod'"),
    ({"name": "x", "mod": ("m", [], {}, "extra")}, "'mod'"),
    ({"name": "x", "mod": ("m", 5, {})}, "'mod'"),
    ({"name": "x", "mod": ("m", "abc", {})}, "'mod'"),
    ({"name": "x", "mod": ("m", [], 5)}, "'mod'"),
    ({"name": "x", "mod": ("m", [], [1, 2])}, "'mod'"),
    ({"name": "x", "mod": ("m", [], [("k", 1)])}, "'mod'"),
    ({"name": "x", "mod": ("m", [], {1: "a"})}, "'mod'"),
    ({"name": "x", "applications": "b"}, "'applications'"),
    ({"name": "x", "applications": [1]}, "'applications'"),
    ({"name": "x", "config": []}, "'config'"),
    ({"name": "x", "config": {"ion.services.x": 5}}, "'config'"),
    ({"name": "x", "config": {5: {}}}, "'config'"),
])
def test_bad_app_file_names_file_and_key(tmp_path, data, key):
    """A missing key or a value of the wrong type is a ConfigurationError naming the file and key."""
    path = tmp_path / "bad.app"
    path.write_text(repr(data))
    with pytest.raises(ConfigurationError) as info:
        load_app_file(path)
    assert str(path) in str(info.value)
    assert key in str(info.value)


@pytest.mark.parametrize("text", ["[1, 2]", "'app'", "None"])
def test_app_file_must_hold_a_dict(tmp_path, text):
    """An app file whose literal is not a dict is refused."""
    path = tmp_path / "notadict.app"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match="one dict"):
        load_app_file(path)


def test_unknown_app_key_is_warned_about(tmp_path):
    """A key the format does not know (a typo) is logged as a warning naming it, not silently dropped."""
    path = tmp_path / "typo.app"
    path.write_text(repr({"name": "typo", "applicatons": ["b"]}))
    with capturedLogs() as events:
        app = load_app_file(path)
    assert app.applications == ()
    warnings = [formatEvent(e) for e in events if e.get("log_level") is not None
                and e["log_level"].name == "warn"]
    assert any("applicatons" in w and str(path) in w for w in warnings), warnings


def test_parse_app_defaults():
    """A minimal app dict gets the documented defaults: processapp, version 0.1, no deps."""
    app = parse_app({"name": "tiny"}, "test")
    assert (app.module, app.version, app.args, app.kwargs, app.applications, app.config) == (
        PROCESSAPP, "0.1", (), {}, (), {})


# ---------------------------------------------------------------------------------------------------
# .rel files
# ---------------------------------------------------------------------------------------------------
def test_rel_file_round_trip(tmp_path):
    """A rel file's entries keep name, version, config, args, mult and processapp."""
    path = write_rel(tmp_path, "r", [
        {"name": "a", "version": "0.2", "config": {"m": {"k": 1}}, "args": {"x": 1}, "mult": 2},
        {"name": "i", "processapp": ("i", "tests.core.apps_fixtures", "Recorder")},
    ])
    rel = load_rel_file(path)
    assert (rel.name, rel.version, rel.path) == ("r", "1.0", path)
    a, i = rel.apps
    assert (a.name, a.version, a.config, a.args, a.mult, a.processapp) == (
        "a", "0.2", {"m": {"k": 1}}, {"x": 1}, 2, None)
    assert i.processapp == ("i", "tests.core.apps_fixtures", "Recorder")
    assert (i.version, i.mult, i.args) == (None, 1, {})


@pytest.mark.parametrize("data, problem", [
    ([{"name": "a"}], "one dict"),
    ({"type": "application", "apps": [{"name": "a"}]}, "'type'"),
    ({"name": "r"}, "'apps'"),
    ({"apps": []}, "'apps'"),
    ({"apps": ["a"]}, "'name'"),
    ({"apps": [{"version": "1"}]}, "'name'"),
    ({"apps": [{"name": "a", "version": 1}]}, "'version'"),
    ({"apps": [{"name": "a", "mult": 0}]}, "'mult'"),
    ({"apps": [{"name": "a", "mult": "2"}]}, "'mult'"),
    ({"apps": [{"name": "a", "mult": True}]}, "'mult'"),
    ({"apps": [{"name": "a", "args": ["x"]}]}, "'args'"),
    ({"apps": [{"name": "a", "config": "x"}]}, "'config'"),
    ({"apps": [{"name": "a", "processapp": "mod"}]}, "'processapp'"),
    ({"apps": [{"name": "a", "processapp": ("a",)}]}, "'processapp'"),
    ({"apps": [{"name": "a", "processapp": ("a", 5)}]}, "'processapp'"),
    ({"name": 5, "apps": [{"name": "a"}]}, "'name'"),
    ({"version": 1.0, "apps": [{"name": "a"}]}, "'version'"),
])
def test_bad_rel_file_names_file_and_key(tmp_path, data, problem):
    """A bad rel file is a ConfigurationError naming the file and the bad key."""
    path = tmp_path / "bad.rel"
    path.write_text(repr(data))
    with pytest.raises(ConfigurationError) as info:
        load_rel_file(path)
    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_rel_file_with_code_is_refused(tmp_path):
    """A rel file is parsed as data too: a call in it is refused and not run."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.rel"
    path.write_text('{"apps": [{"name": open(' + repr(str(marker)) + ', "w").name}]}')
    with pytest.raises(ConfigurationError, match="evil.rel"):
        load_rel_file(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# the app manager: dependencies
# ---------------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_dependencies_start_first_once_and_stop_in_reverse(container, apps_dir):
    """a needs b and c, b needs c: start order c, b, a, each once; stop_all stops a, b, c."""
    write_app(apps_dir, "a", applications=["b", "c", "c"])
    write_app(apps_dir, "b", applications=["c"])
    write_app(apps_dir, "c")
    use_apps(container, apps_dir)
    assert await container.app_manager.start_app("a") == "a"
    assert await container.app_manager.start_app("a") == "a"
    assert await container.app_manager.start_app("b") == "b"
    assert fx.events("activate") == ["c", "b", "a"]
    assert list(container.app_manager.running) == ["c", "b", "a"]
    await container.app_manager.stop_all()
    assert fx.events("terminate") == ["a", "b", "c"]
    assert container.app_manager.running == {}


@pytest_twisted.ensureDeferred
async def test_start_app_by_path_finds_dependencies_beside_it(container, apps_dir):
    """Starting an app by its file path finds its dependencies in the same folder."""
    path = write_app(apps_dir, "top", applications=["dep"])
    write_app(apps_dir, "dep")
    await container.app_manager.start_app(str(path))
    assert fx.events("activate") == ["dep", "top"]


@pytest.mark.parametrize("deps, cycle", [
    ({"a": ["b"], "b": ["a"]}, "a -> b -> a"),
    ({"a": ["a"]}, "a -> a"),
    ({"a": ["ok", "b"], "ok": [], "b": ["c"], "c": ["b"]}, "b -> c -> b"),
])
@pytest_twisted.ensureDeferred
async def test_dependency_cycle_is_refused_before_anything_starts(container, apps_dir, deps, cycle):
    """A dependency cycle raises AppError naming the cycle, and no app of it is started."""
    for name, needs in deps.items():
        write_app(apps_dir, name, applications=needs)
    use_apps(container, apps_dir)
    with pytest.raises(AppError, match=f"cycle.*{cycle}"):
        await container.app_manager.start_app("a")
    assert fx.EVENTS == []
    assert container.app_manager.running == {}
    assert not recorders(container)


@pytest_twisted.ensureDeferred
async def test_missing_dependency_is_refused_before_anything_starts(container, apps_dir):
    """A dependency with no app file raises AppError naming it; its siblings are not started."""
    write_app(apps_dir, "a", applications=["b", "ghost"])
    write_app(apps_dir, "b")
    use_apps(container, apps_dir)
    with pytest.raises(AppError, match="no app named 'ghost'"):
        await container.app_manager.start_app("a")
    assert fx.EVENTS == []


@pytest_twisted.ensureDeferred
async def test_failed_dependency_leaves_the_started_ones_running(container, apps_dir):
    """If a dependency fails to start, the app is not started and the error names the app."""
    write_app(apps_dir, "a", applications=["b"])
    write_app(apps_dir, "b", procclass="NoSuchClass")
    use_apps(container, apps_dir)
    with pytest.raises(AppError, match="app b: .*NoSuchClass"):
        await container.app_manager.start_app("a")
    assert "a" not in container.app_manager.running
    assert fx.events("activate") == []


# ---------------------------------------------------------------------------------------------------
# the app manager: modules
# ---------------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_unknown_app_module_is_an_app_error(container, apps_dir):
    """An app whose module cannot be imported raises AppError naming the app and the module."""
    write_app(apps_dir, "x", mod=("no.such.appmodule", [], {}))
    use_apps(container, apps_dir)
    with pytest.raises(AppError, match="app x: cannot import app module 'no.such.appmodule'"):
        await container.app_manager.start_app("x")
    assert container.app_manager.running == {}


@pytest_twisted.ensureDeferred
async def test_unknown_process_module_is_an_app_error(container, apps_dir):
    """A processapp naming a process module that does not exist raises AppError naming both."""
    write_app(apps_dir, "x", mod=(PROCESSAPP, ["x", "no.such.procmodule", "P"], {}),
              config={"tests.core": {"seen": True}})
    use_apps(container, apps_dir)
    listeners = len(container.proc_manager._exit_listeners)
    with pytest.raises(AppError) as info:
        await container.app_manager.start_app("x")
    assert "app x" in str(info.value) and "no.such.procmodule" in str(info.value)
    assert container.config.get("tests.core", "seen") is None  # the app's config layer is gone
    assert len(container.proc_manager._exit_listeners) == listeners  # no supervisor left behind


@pytest_twisted.ensureDeferred
async def test_app_module_without_start_is_an_app_error(container, apps_dir):
    """An app module without start() is refused with a message saying so."""
    write_app(apps_dir, "x", mod=("ion.core.config", [], {}))
    use_apps(container, apps_dir)
    with pytest.raises(AppError, match="has no start"):
        await container.app_manager.start_app("x")


@pytest_twisted.ensureDeferred
async def test_custom_app_module_gets_args_and_kwargs(container, apps_dir):
    """A non-processapp module's start() gets the file's args and kwargs; stop() gets its state."""
    write_app(apps_dir, "own", mod=("tests.core.apps_fixtures", ["p", 2], {"k": "v"}))
    use_apps(container, apps_dir)
    await container.app_manager.start_app("own")
    assert fx.APP_STARTS == [("own", ("p", 2), {"k": "v"})]
    await container.app_manager.stop_app("own")
    assert fx.APP_STOPS == ["own"]


@pytest_twisted.ensureDeferred
async def test_stop_app_terminates_its_processes_in_reverse(container, apps_dir):
    """Stopping an app terminates its processes, the last started first, and drops its config."""
    write_app(apps_dir, "m", config={"tests.core": {"from_m": 1}})
    use_apps(container, apps_dir)
    await container.app_manager.start_app("m", mult=3)
    started = fx.event_pids("activate")
    assert len(set(started)) == 3
    assert container.config.get("tests.core", "from_m") == 1
    await container.app_manager.stop_app("m")
    assert fx.event_pids("terminate") == started[::-1]
    assert container.config.get("tests.core", "from_m") is None
    assert not recorders(container)


@pytest_twisted.ensureDeferred
async def test_stop_app_that_is_not_running(container):
    """Stopping an app that is not running is an AppError naming it."""
    with pytest.raises(AppError, match="'nope' is not running"):
        await container.app_manager.stop_app("nope")


# ---------------------------------------------------------------------------------------------------
# kwargs and config reach the processes
# ---------------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_app_config_is_seen_by_its_running_process(container, apps_dir):
    """A process of an app reads the app's config value through self.get_config()."""
    write_app(apps_dir, "cfg", config={"tests.core.apps_fixtures": {"colour": "blue"},
                                       "tests": {"size": 3}})
    use_apps(container, apps_dir)
    await container.app_manager.start_app("cfg")
    (proc,) = app_procs(container, "cfg")
    assert await rpc(container, proc.id, "config", "colour") == "blue"
    assert await rpc(container, proc.id, "config", "size") == 3


@pytest_twisted.ensureDeferred
async def test_hello_app_uses_config_overlay(container):
    """The shipped hello app answers with the greeting of the config it was started with."""
    await container.app_manager.start_app("hello", config={"ion.services.hello": {"greeting": "Howdy"}})
    proc = await client_process(container)
    assert await HelloClient(proc).hello("you") == "Howdy, you"


@pytest.mark.parametrize("apparg", ["{'z': 'apparg', 'w': 1}", {"z": "apparg", "w": 1}])
@pytest_twisted.ensureDeferred
async def test_app_kwargs_layering(container_factory, tmp_path, apparg):
    """Process spawnargs: app-file kwargs, overridden by rel args, overridden by apparg_<name>."""
    write_app(tmp_path / "apps", "k", kwargs={"x": "file", "y": "file", "z": "file"})
    rel = write_rel(tmp_path / "deploy", "r", [{"name": "k", "args": {"y": "rel", "z": "rel"}}])
    container = await container_factory(args={"apparg_k": apparg})
    await container.app_manager.start_rel(rel)
    (proc,) = app_procs(container, "k")
    assert await rpc(container, proc.id, "spawnargs") == {
        "label": "k", "x": "file", "y": "rel", "z": "apparg", "w": 1}


@pytest_twisted.ensureDeferred
async def test_apparg_must_be_a_dict(container_factory, apps_dir):
    """apparg_<name> that is not a dict is an AppError naming it; nothing starts."""
    write_app(apps_dir, "k")
    container = await container_factory(args={"apparg_k": "[1, 2]"})
    use_apps(container, apps_dir)
    with pytest.raises(AppError, match="apparg_k must be a dict"):
        await container.app_manager.start_app("k")
    assert fx.EVENTS == []


# ---------------------------------------------------------------------------------------------------
# releases
# ---------------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_rel_starts_apps_inline_processapp_mult_config_and_args(container, tmp_path):
    """A rel starts its apps in order: versions checked, inline processapp, mult 2, config and args."""
    apps = tmp_path / "apps"
    write_app(apps, "base", version="0.3")
    write_app(apps, "svc", applications=["base"], version="1.2")
    rel = write_rel(tmp_path / "deploy", "sys", [
        {"name": "svc", "version": "1.2", "mult": 2,
         "config": {"tests.core.apps_fixtures": {"colour": "green"}}, "args": {"extra": "yes"}},
        {"name": "inline", "processapp": ("inline", "tests.core.apps_fixtures", "Recorder"),
         "args": {"label": "inline"}},
    ])
    assert await container.app_manager.start_rel(rel) == ["svc", "inline"]
    assert fx.events("activate") == ["base", "svc", "svc", "inline"]
    svc1, svc2 = app_procs(container, "svc")
    assert svc1.id != svc2.id
    assert await rpc(container, svc2.id, "config", "colour") == "green"
    assert await rpc(container, svc1.id, "config", "extra") == "yes"
    (inline,) = app_procs(container, "inline")
    assert inline.proc_name == "inline" and type(inline) is fx.Recorder
    assert container.app_manager.running["inline"].definition.version == "0.1"


@pytest_twisted.ensureDeferred
async def test_rel_version_mismatch_names_app_and_versions(container, tmp_path):
    """A rel wanting another version than the app file has raises AppError with both; nothing starts."""
    apps = tmp_path / "apps"
    write_app(apps, "first")
    write_app(apps, "second", version="0.4")
    rel = write_rel(tmp_path / "deploy", "r", [{"name": "first"}, {"name": "second", "version": "0.5"}])
    with pytest.raises(AppError) as info:
        await container.app_manager.start_rel(rel)
    message = str(info.value)
    assert "second" in message and "0.4" in message and "0.5" in message and str(rel) in message
    assert fx.EVENTS == []
    assert container.app_manager.running == {}


@pytest.mark.parametrize("second, error", [("loop", "loop -> loop"), ("ghost", "no app named 'ghost'")])
@pytest_twisted.ensureDeferred
async def test_bad_second_rel_app_starts_nothing(container, tmp_path, second, error):
    """A rel whose second app has a cycle or no app file raises AppError before its first app starts."""
    apps = tmp_path / "apps"
    write_app(apps, "fine")
    write_app(apps, "loop", applications=["loop"])
    rel = write_rel(tmp_path / "deploy", "r", [{"name": "fine"}, {"name": second}])
    with pytest.raises(AppError, match=error):
        await container.app_manager.start_rel(rel)
    assert fx.EVENTS == []
    assert container.app_manager.running == {}


@pytest_twisted.ensureDeferred
async def test_rel_entry_for_an_already_running_app_is_warned_about(container, tmp_path):
    """A rel entry whose app already runs (as an earlier dependency) has its args ignored, with a warning."""
    apps = tmp_path / "apps"
    write_app(apps, "top", applications=["dep"])
    write_app(apps, "dep")
    rel = write_rel(tmp_path / "deploy", "r", [{"name": "top"}, {"name": "dep", "args": {"x": 1}}])
    with capturedLogs() as events:
        await container.app_manager.start_rel(rel)
    assert fx.events("activate") == ["dep", "top"]
    text = [formatEvent(e) for e in events]
    assert any("dep" in t and "already running" in t for t in text), text


@pytest_twisted.ensureDeferred
async def test_start_file_dispatches_on_suffix(container, tmp_path):
    """start_file starts a .app file as an app and a .rel file as a release."""
    app = write_app(tmp_path / "apps", "solo")
    rel = write_rel(tmp_path / "deploy", "r", [
        {"name": "duo", "processapp": ("duo", "tests.core.apps_fixtures", "Recorder"), "args": {"label": "duo"}}])
    assert await container.app_manager.start_file(app) == "solo"
    assert await container.app_manager.start_file(rel) == ["duo"]
    assert fx.events("activate") == ["solo", "duo"]


# ---------------------------------------------------------------------------------------------------
# spawn by app name or module
# ---------------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_spawn_by_app_name(container):
    """spawn('hello') starts the process the hello app file names."""
    pid = await container.spawn("hello")
    proc = container.proc_manager.get(pid)
    assert type(proc) is HelloService and proc.proc_name == "hello"
    assert proc.state is State.ACTIVE


@pytest_twisted.ensureDeferred
async def test_spawn_by_app_file_path(container, apps_dir):
    """spawn('<folder>/x.app') starts the process that app file names."""
    path = write_app(apps_dir, "pathy")
    pid = await container.spawn(str(path))
    assert type(container.proc_manager.get(pid)) is fx.Recorder
    assert fx.events("activate") == ["pathy"]


@pytest_twisted.ensureDeferred
async def test_spawn_by_module_with_factory(container):
    """spawn('tests.core.apps_fixtures') starts the class the module's 'factory' names."""
    pid = await container.spawn("tests.core.apps_fixtures", {"label": "by-module"})
    assert type(container.proc_manager.get(pid)) is fx.Recorder
    assert fx.events("activate") == ["by-module"]


def make_package(tmp_path: Path, monkeypatch, modules: dict[str, str]) -> str:
    """An importable package in ``tmp_path`` holding ``modules``; returns its name."""
    pkg = tmp_path / f"spawnpkg_{tmp_path.name}"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, source in modules.items():
        (pkg / f"{name}.py").write_text("from ion.core.process import Process\n\n" + source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return pkg.name


@pytest_twisted.ensureDeferred
async def test_spawn_by_module_with_one_process_class(container, tmp_path, monkeypatch):
    """spawn('pkg.mod') starts the one Process class a module defines."""
    pkg = make_package(tmp_path, monkeypatch, {"single": "class Only(Process):\n    pass\n"})
    pid = await container.spawn(f"{pkg}.single")
    proc = container.proc_manager.get(pid)
    assert type(proc).__name__ == "Only" and proc.proc_name == "single"
    assert proc.state is State.ACTIVE


@pytest_twisted.ensureDeferred
async def test_spawn_module_with_several_classes_and_no_factory(container, tmp_path, monkeypatch):
    """A module with several Process classes and no 'factory' is refused with a clear message."""
    pkg = make_package(tmp_path, monkeypatch, {"double": "class One(Process):\n    pass\n\n"
                                                         "class Two(Process):\n    pass\n"})
    with pytest.raises(ConfigurationError, match="defines 2 Process classes"):
        await container.spawn(f"{pkg}.double")
    assert not recorders(container)


@pytest_twisted.ensureDeferred
async def test_spawn_unknown_name(container):
    """spawn of an unknown app name raises AppError; of an unknown module, ConfigurationError."""
    with pytest.raises(AppError, match="no app named 'nosuchapp'"):
        await container.spawn("nosuchapp")
    with pytest.raises(ConfigurationError, match="cannot import process module 'no.such.module'"):
        await container.spawn("no.such.module")


@pytest_twisted.ensureDeferred
async def test_spawn_of_a_multi_process_app_is_refused(container, apps_dir):
    """spawn() of an app that is not a processapp says to use start_app()."""
    write_app(apps_dir, "custom", mod=("tests.core.apps_fixtures", [], {}))
    use_apps(container, apps_dir)
    with pytest.raises(AppError, match="start_app"):
        await container.spawn("custom")


@pytest_twisted.ensureDeferred
async def test_shipped_hello_rel_starts_two_hello_services(container):
    """res/deploy/hello.rel matches hello.app's version and starts two hello processes that answer."""
    rel = load_rel_file(resource_root() / "deploy" / "hello.rel")
    assert [(e.name, e.mult) for e in rel.apps] == [("hello", 2)]
    assert await container.app_manager.start_rel(rel.path) == ["hello"]
    procs = app_procs(container, "hello")
    assert len(procs) == 2 and all(type(p) is HelloService for p in procs)
    client = await client_process(container)
    assert await HelloClient(client).hello("rel") == "Hello there, rel"


@pytest_twisted.ensureDeferred
async def test_start_app_again_with_other_settings_is_warned_about(container, apps_dir):
    """start_app of a running app with config/args/mult starts nothing new and warns that they were ignored."""
    write_app(apps_dir, "once")
    use_apps(container, apps_dir)
    await container.app_manager.start_app("once")
    with capturedLogs() as events:
        await container.app_manager.start_app("once", mult=2)
    assert fx.events("activate") == ["once"]
    assert any("once" in formatEvent(e) and "already running" in formatEvent(e) for e in events)
