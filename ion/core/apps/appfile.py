"""Reading ``.app`` and ``.rel`` files: data, parsed with ``ast.literal_eval``, never executed.

An app file::

    {
        "type": "application",
        "name": "hello",
        "description": "Hello service",
        "version": "0.1",
        "mod": ("ion.core.apps.processapp", ["hello", "ion.services.hello", "HelloService"], {}),
        "applications": [],
        "config": {"ion.services.hello": {"greeting": "Hello there"}},
    }

A rel file names apps to start, each ``{name, version, config, args, mult,
processapp}``; ``processapp: (name, module, class)`` defines an app inline.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ion.core.config import read_literal_file
from ion.core.exceptions import ConfigurationError

__all__ = ["AppDefinition", "ReleaseDefinition", "ReleaseEntry", "load_app_file", "load_rel_file",
           "parse_app", "PROCESSAPP"]

PROCESSAPP = "ion.core.apps.processapp"
_APP_KEYS = {"type", "name", "description", "version", "mod", "applications", "config", "registered",
             "modules"}


@dataclass(frozen=True)
class AppDefinition:
    """One app, as its file says."""

    name: str
    version: str = "0.1"
    description: str = ""
    module: str = PROCESSAPP
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    applications: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    #: Instances to start (a rel entry's ``mult``).
    mult: int = 1

    def with_overrides(self, **changes: Any) -> "AppDefinition":
        return replace(self, **changes)


@dataclass(frozen=True)
class ReleaseEntry:
    """One app of a release."""

    name: str
    version: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    mult: int = 1
    processapp: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ReleaseDefinition:
    """A ``.rel`` file: a named, versioned list of apps."""

    name: str
    version: str
    description: str
    apps: tuple[ReleaseEntry, ...]
    path: Path | None = None


def _require(cond: bool, where: str, problem: str) -> None:
    if not cond:
        raise ConfigurationError(f"{where}: {problem}")


def parse_app(data: Any, where: str, path: Path | None = None) -> AppDefinition:
    """Validate a parsed app dict.

    :raises ConfigurationError: naming the file and the bad key.
    """
    _require(isinstance(data, dict), where, "an app file must hold one dict")
    _require(data.get("type", "application") == "application", where,
             f"'type' must be 'application', not {data.get('type')!r}")
    name = data.get("name")
    _require(isinstance(name, str) and bool(name), where, "'name' must be a non-empty string")
    version = data.get("version", "0.1")
    _require(isinstance(version, str), where, "'version' must be a string")
    mod = data.get("mod", (PROCESSAPP, [], {}))
    _require(isinstance(mod, (tuple, list)) and 1 <= len(mod) <= 3 and isinstance(mod[0], str), where,
             "'mod' must be (module, args, kwargs)")
    args = tuple(mod[1]) if len(mod) > 1 else ()
    kwargs = dict(mod[2]) if len(mod) > 2 else {}
    _require(len(mod) < 2 or isinstance(mod[1], (list, tuple)), where, "'mod' args must be a list")
    _require(len(mod) < 3 or isinstance(mod[2], dict), where, "'mod' kwargs must be a dict")
    apps = data.get("applications", [])
    _require(isinstance(apps, (list, tuple)) and all(isinstance(a, str) for a in apps), where,
             "'applications' must be a list of app names")
    config = data.get("config", {})
    _require(isinstance(config, dict), where, "'config' must be a dict keyed by module name")
    return AppDefinition(name=name, version=version, description=str(data.get("description", "")),
                         module=mod[0], args=args, kwargs=kwargs, applications=tuple(apps),
                         config=config, path=path)


def load_app_file(path: str | Path) -> AppDefinition:
    """Read and validate an ``.app`` file.

    :raises ConfigurationError: if it cannot be read, is not a literal, or is not a valid app.
    """
    path = Path(path)
    data = read_literal_file(path, "app file")
    return parse_app(data, f"app file {path}", path)


def load_rel_file(path: str | Path) -> ReleaseDefinition:
    """Read and validate a ``.rel`` file.

    :raises ConfigurationError: naming the file and the bad entry.
    """
    path = Path(path)
    where = f"rel file {path}"
    data = read_literal_file(path, "rel file")
    _require(isinstance(data, dict), where, "a rel file must hold one dict")
    _require(data.get("type", "release") == "release", where, "'type' must be 'release'")
    apps = data.get("apps")
    _require(isinstance(apps, (list, tuple)) and bool(apps), where, "'apps' must be a non-empty list")
    entries = []
    for i, entry in enumerate(apps):
        at = f"{where}, app #{i + 1}"
        _require(isinstance(entry, dict) and isinstance(entry.get("name"), str), at,
                 "each app must be a dict with a 'name'")
        version = entry.get("version")
        _require(version is None or isinstance(version, str), at, "'version' must be a string")
        config = entry.get("config", {})
        args = entry.get("args", {})
        mult = entry.get("mult", 1)
        _require(isinstance(config, dict), at, "'config' must be a dict")
        _require(isinstance(args, dict), at, "'args' must be a dict")
        _require(isinstance(mult, int) and mult >= 1, at, "'mult' must be an int >= 1")
        processapp = entry.get("processapp")
        _require(processapp is None or (isinstance(processapp, (list, tuple)) and 2 <= len(processapp) <= 3
                                        and all(isinstance(p, str) for p in processapp)), at,
                 "'processapp' must be (name, module, class)")
        entries.append(ReleaseEntry(name=entry["name"], version=version, config=config, args=args, mult=mult,
                                    processapp=tuple(processapp) if processapp else None))
    return ReleaseDefinition(name=str(data.get("name", path.stem)), version=str(data.get("version", "0.1")),
                             description=str(data.get("description", "")), apps=tuple(entries), path=path)
