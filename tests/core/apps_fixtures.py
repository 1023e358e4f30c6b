"""Process classes for the app, supervisor and container tests.

Every :class:`Recorder` appends ``(event, label, pid)`` to :data:`EVENTS` from its
hooks, so a test can assert the order in which processes of several apps
started and stopped. ``label`` is a spawnarg (the app file's kwargs), else the
process name. The tests reset the module state before each test
(:func:`reset`).
"""

from __future__ import annotations

import pprint
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ion.core.process import Process

#: ``(event, label, pid)`` in the order the hooks ran, e.g. ``("activate", "a", "c1.3")``.
EVENTS: list[tuple[str, str, str]] = []

#: How many more ``slc_init`` calls of :class:`Flaky` fail.
FAIL_INITS = {"count": 0}


def reset() -> None:
    """Forget every recorded event and failure."""
    EVENTS.clear()
    APP_STARTS.clear()
    APP_STOPS.clear()
    FAIL_INITS["count"] = 0


def events(kind: str) -> list[str]:
    """The labels of the recorded events of one kind, in order."""
    return [label for event, label, _pid in EVENTS if event == kind]


def event_pids(kind: str) -> list[str]:
    """The pids of the recorded events of one kind, in order."""
    return [pid for event, _label, pid in EVENTS if event == kind]


class Recorder(Process):
    """Records activate/terminate; answers ``config`` and ``spawnargs`` for config tests."""

    name = "recorder"

    @property
    def label(self) -> str:
        return str(self.spawnargs.get("label", self.proc_name))

    def slc_activate(self) -> None:
        EVENTS.append(("activate", self.label, self.id))

    def slc_terminate(self) -> None:
        EVENTS.append(("terminate", self.label, self.id))

    def op_config(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """The value of config key ``content`` as this process sees it."""
        return self.get_config(content)

    def op_spawnargs(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """The spawnargs this process got (without the ones that cannot travel)."""
        return {k: v for k, v in self.spawnargs.items() if isinstance(v, (str, int, float, bool, list, dict))}


class Flaky(Recorder):
    """A Recorder whose ``slc_init`` fails while :data:`FAIL_INITS` says so."""

    name = "flaky"

    def slc_init(self) -> None:
        if FAIL_INITS["count"] > 0:
            FAIL_INITS["count"] -= 1
            raise RuntimeError("flaky init")


class BadTerminate(Recorder):
    """A Recorder whose ``slc_terminate`` fails: it ends in ERROR even when asked to stop."""

    name = "badterm"

    def slc_terminate(self) -> None:
        super().slc_terminate()
        raise RuntimeError("cannot let go")


#: What ``spawn("tests.core.apps_fixtures")`` starts: this module has several Process classes.
factory = Recorder


# -- an app module of its own (not processapp): start/stop record their calls ---------------------
#: ``(app name, args, kwargs)`` of every start() call; the names of every stop() call.
APP_STARTS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
APP_STOPS: list[str] = []


def start(container: Any, app: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """App-module entry point: records the call; the returned dict is the app's state."""
    APP_STARTS.append((app.name, args, kwargs))
    return {"app": app.name}


def stop(container: Any, state: dict[str, Any]) -> None:
    """App-module exit point: records which app stopped."""
    APP_STOPS.append(state["app"])


# -- writing throwaway app and rel files ----------------------------------------------------------
def write_app(folder: Path, name: str, *, applications: Sequence[str] = (), kwargs: dict[str, Any] | None = None,
              config: dict[str, Any] | None = None, version: str = "0.1", procclass: str = "Recorder",
              mod: Any = None, **extra: Any) -> Path:
    """Write ``<folder>/<name>.app``: by default a processapp running a :class:`Recorder` labelled ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    if mod is None:
        mod = ("ion.core.apps.processapp", [name, __name__, procclass], {"label": name, **(kwargs or {})})
    data = {"type": "application", "name": name, "description": f"test app {name}", "version": version,
            "mod": mod, "applications": list(applications), "config": config or {}, **extra}
    path = folder / f"{name}.app"
    path.write_text(pprint.pformat(data, sort_dicts=False) + "\n", encoding="utf-8")
    return path


def write_rel(folder: Path, name: str, apps: list[dict[str, Any]], version: str = "1.0") -> Path:
    """Write ``<folder>/<name>.rel`` listing ``apps``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"type": "release", "name": name, "version": version, "description": f"test release {name}",
            "apps": apps}
    path = folder / f"{name}.rel"
    path.write_text(pprint.pformat(data, sort_dicts=False) + "\n", encoding="utf-8")
    return path
