"""The app manager: starts apps with their dependencies, once each, and stops them in reverse
(:func:`~ion.core.lifecycle.stop_in_reverse`)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from ion.core.apps.appfile import (
    PROCESSAPP,
    AppDefinition,
    ReleaseDefinition,
    load_app_file,
    load_rel_file,
)
from ion.core.config import deep_merge, parse_value, resource_root
from ion.core.exceptions import AppError, ConfigurationError
from ion.core.lifecycle import stop_in_reverse
from ion.core.process import ProcessDesc

if TYPE_CHECKING:
    from ion.core.container import Container

__all__ = ["AppManager", "RunningApp"]


@dataclass
class RunningApp:
    """A started app: its definition, module and the state its ``start`` returned."""

    definition: AppDefinition
    module: Any
    state: Any


class AppManager:
    """Starts and stops the apps of one container."""

    _log = Logger()

    def __init__(self, container: Container) -> None:
        self.container = container
        self.running: dict[str, RunningApp] = {}
        #: Apps whose supervisor gave up, with the reason.
        self.failed: dict[str, str] = {}
        self.search_path: list[Path] = []

    # -- finding apps -------------------------------------------------------------------
    def app_dirs(self) -> list[Path]:
        return [*self.search_path, resource_root() / "apps"]

    def find_app_file(self, name: str) -> Path:
        """The ``.app`` file of an app name.

        :raises AppError: listing where it looked.
        """
        tried = []
        for folder in self.app_dirs():
            path = folder / f"{name}.app"
            if path.is_file():
                return path
            tried.append(str(path))
        raise AppError(f"no app named {name!r} (looked for {', '.join(tried)})")

    def load(self, name_or_path: str | Path) -> AppDefinition:
        """An app definition from a path (``*.app``) or an app name."""
        text = str(name_or_path)
        if text.endswith(".app") or "/" in text:
            path = Path(text)
            if path.parent not in self.search_path:
                self.search_path.append(path.parent)
            return load_app_file(path)
        return load_app_file(self.find_app_file(text))

    def process_desc_for(self, name: str) -> ProcessDesc:
        """What ``spawn(name)`` starts: a processapp's process, or a module's process class."""
        from ion.core.apps.processapp import process_desc

        if "." not in name or name.endswith(".app"):
            app = self.load(name)
            if app.module != PROCESSAPP:
                raise AppError(f"app {name!r} is not a one-process app; start it with start_app()")
            return process_desc(app)
        return ProcessDesc(name=name.rsplit(".", 1)[-1], module=name)

    def resolve_order(self, root: AppDefinition) -> list[AppDefinition]:
        """``root`` and its dependencies, dependencies first, each once.

        :raises AppError: naming the cycle, e.g. ``a -> b -> a``.
        """
        order: list[AppDefinition] = []
        done: set[str] = set()

        def visit(app: AppDefinition, stack: list[str]) -> None:
            if app.name in stack:
                cycle = " -> ".join([*stack[stack.index(app.name):], app.name])
                raise AppError(f"dependency cycle between apps: {cycle}")
            if app.name in done:
                return
            for dep in app.applications:
                visit(self.load(dep), [*stack, app.name])
            done.add(app.name)
            order.append(app)

        visit(root, [])
        return order

    # -- starting and stopping --------------------------------------------------------------
    def _app_kwargs(self, app: AppDefinition, rel_args: Mapping[str, Any] | None) -> dict[str, Any]:
        kwargs = dict(app.kwargs)
        kwargs.update(rel_args or {})
        extra = self.container.args.get(f"apparg_{app.name}")
        if isinstance(extra, str):
            extra = parse_value(extra)
        if extra is not None:
            if not isinstance(extra, Mapping):
                raise AppError(f"apparg_{app.name} must be a dict, not {extra!r}")
            kwargs.update(extra)
        return kwargs

    @defer.inlineCallbacks
    def start_app(self, name_or_path: str | Path | AppDefinition, *,
                  config: Mapping[str, Any] | None = None, args: Mapping[str, Any] | None = None,
                  mult: int = 1) -> Any:
        """Start an app after its dependencies; fires with the app's name.

        :raises AppError: for a missing app, a cycle or a module that cannot start.
        """
        root = name_or_path if isinstance(name_or_path, AppDefinition) else self.load(name_or_path)
        if root.name in self.running and (config or args or mult != 1):
            self._log.warn("app {name} is already running (started as a dependency?); the config, args "
                           "and mult given now are not applied", name=root.name)
        if config or mult != 1:
            root = root.with_overrides(config=deep_merge(root.config, config or {}), mult=mult)
        for app in self.resolve_order(root):
            if app.name in self.running:
                continue
            yield self._start_one(app, args if app is root else None)
        return root.name

    @defer.inlineCallbacks
    def _start_one(self, app: AppDefinition, rel_args: Mapping[str, Any] | None) -> Any:
        try:
            module = importlib.import_module(app.module)
        except Exception as exc:  # ImportError, or the module failed while importing
            raise AppError(f"app {app.name}: cannot import app module {app.module!r}: {exc}") from exc
        if not callable(getattr(module, "start", None)):
            raise AppError(f"app {app.name}: module {app.module!r} has no start(container, app, ...)")
        kwargs = self._app_kwargs(app, rel_args)
        # The app's config is visible to its processes from their first hook on.
        self.container.config.overlay_app(app.name, app.config)
        try:
            state = yield defer.maybeDeferred(module.start, self.container, app, *app.args, **kwargs)
        except ConfigurationError as exc:
            self.container.config.remove_app(app.name)
            raise AppError(f"app {app.name}: {exc}") from exc
        except Exception:
            self.container.config.remove_app(app.name)
            raise
        self.running[app.name] = RunningApp(app, module, state)
        self.failed.pop(app.name, None)
        self._log.info("started app {name} {version}", name=app.name, version=app.version)
        return app.name

    @defer.inlineCallbacks
    def stop_app(self, name: str) -> Any:
        """Stop one app (its processes in reverse order).

        :raises AppError: if it is not running.
        """
        running = self.running.pop(name, None)
        if running is None:
            raise AppError(f"app {name!r} is not running")
        stop = getattr(running.module, "stop", None)
        try:
            if callable(stop):
                yield defer.maybeDeferred(stop, self.container, running.state)
        finally:
            self.container.config.remove_app(name)
        self._log.info("stopped app {name}", name=name)

    def app_failed(self, name: str, reason: str) -> None:
        """An app gave up (its supervisor stopped its processes): forget it and drop its config.

        Called by the app's supervisor; the app can be started again.
        """
        self.running.pop(name, None)
        self.container.config.remove_app(name)
        self.failed[name] = reason
        self._log.error("app {name} failed and is stopped: {reason}", name=name, reason=reason)

    def stop_all(self) -> defer.Deferred[None]:
        """Stop every app, the last started first."""
        return stop_in_reverse(self.running, self.stop_app, lambda name, exc: self._log.warn(
            "app {name} did not stop cleanly: {exc}", name=name, exc=exc))

    @defer.inlineCallbacks
    def start_rel(self, path: str | Path) -> Any:
        """Start every app of a ``.rel`` file; fires with the app names.

        The whole release is checked first (every app file found, versions
        as the release says, no dependency cycle), so a bad release starts
        nothing.

        :raises AppError: naming the app, for a missing app, a version mismatch or a cycle.
        """
        rel: ReleaseDefinition = load_rel_file(path)
        if rel.path is not None:
            for folder in (rel.path.parent.parent / "apps", rel.path.parent):
                if folder.is_dir() and folder not in self.search_path:
                    self.search_path.append(folder)
        planned: list[tuple[AppDefinition, Any]] = []
        for entry in rel.apps:
            if entry.processapp:
                app = AppDefinition(name=entry.name, version=entry.version or "0.1", module=PROCESSAPP,
                                    args=entry.processapp, path=rel.path)
            else:
                app = self.load(entry.name)
                if entry.version is not None and entry.version != app.version:
                    raise AppError(f"rel file {path}: app {entry.name} is version {app.version}, "
                                   f"the release wants {entry.version}")
            self.resolve_order(app)  # refuse a cycle before anything starts
            planned.append((app, entry))
        started = []
        for app, entry in planned:
            name = yield self.start_app(app, config=entry.config, args=entry.args, mult=entry.mult)
            started.append(name)
        return started

    def start_file(self, path: str | Path) -> defer.Deferred[Any]:
        """Start an ``.app`` or ``.rel`` file given on the command line."""
        if str(path).endswith(".rel"):
            return self.start_rel(path)
        return self.start_app(path)
