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

from twisted.logger import Logger

from ion.core.config import read_literal_file
from ion.core.exceptions import ConfigurationError

__all__ = ["AppDefinition", "ReleaseDefinition", "ReleaseEntry", "load_app_file", "load_rel_file",
           "parse_app", "PROCESSAPP"]

PROCESSAPP = "ion.core.apps.processapp"
# "registered" and "modules" are OTP keys ioncore-python's files carry; accepted and ignored.
_APP_KEYS = frozenset({"type", "name", "description", "version", "mod", "applications", "config", "registered",
                       "modules"})
_REL_KEYS = frozenset({"type", "name", "version", "description", "apps"})
_REL_ENTRY_KEYS = frozenset({"name", "version", "config", "args", "mult", "processapp"})
_log = Logger()


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

    def with_overrides(self, **changes: Any) -> AppDefinition:
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


def _warn_unknown(data: dict[Any, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        _log.warn("{where}: ignoring unknown key(s) {keys} (known: {known})", where=where,
                  keys=", ".join(repr(k) for k in unknown), known=", ".join(sorted(known)))


def _is_config(value: Any) -> bool:
    """A ``config`` value: a dict of module name -> dict."""
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items())


def parse_app(data: Any, where: str, path: Path | None = None) -> AppDefinition:
    """Validate a parsed app dict.

    :raises ConfigurationError: naming the file and the bad key.
    """
    _require(isinstance(data, dict), where, "an app file must hold one dict")
    _warn_unknown(data, _APP_KEYS, where)
    _require(data.get("type", "application") == "application", where,
             f"'type' must be 'application', not {data.get('type')!r}")
    name = data.get("name")
    _require(isinstance(name, str) and bool(name), where, "'name' must be a non-empty string")
    version = data.get("version", "0.1")
    _require(isinstance(version, str), where, "'version' must be a string")
    description = data.get("description", "")
    _require(isinstance(description, str), where, "'description' must be a string")
    mod = data.get("mod", (PROCESSAPP, [], {}))
    _require(isinstance(mod, (tuple, list)) and 1 <= len(mod) <= 3 and isinstance(mod[0], str), where,
             "'mod' must be (module, args, kwargs)")
    # Check the types before converting: tuple(5) or dict([1]) would raise something else.
    _require(len(mod) < 2 or isinstance(mod[1], (list, tuple)), where, "'mod' args must be a list")
    _require(len(mod) < 3 or (isinstance(mod[2], dict) and all(isinstance(k, str) for k in mod[2])), where,
             "'mod' kwargs must be a dict with string keys")
    args = tuple(mod[1]) if len(mod) > 1 else ()
    kwargs = dict(mod[2]) if len(mod) > 2 else {}
    apps = data.get("applications", [])
    _require(isinstance(apps, (list, tuple)) and all(isinstance(a, str) and a for a in apps), where,
             "'applications' must be a list of app names")
    config = data.get("config", {})
    _require(_is_config(config), where, "'config' must be a dict of module name -> dict")
    return AppDefinition(name=name, version=version, description=description,
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
    _warn_unknown(data, _REL_KEYS, where)
    _require(data.get("type", "release") == "release", where, "'type' must be 'release'")
    name = data.get("name", path.stem)
    _require(isinstance(name, str) and bool(name), where, "'name' must be a non-empty string")
    rel_version = data.get("version", "0.1")
    _require(isinstance(rel_version, str), where, "'version' must be a string")
    description = data.get("description", "")
    _require(isinstance(description, str), where, "'description' must be a string")
    apps = data.get("apps")
    _require(isinstance(apps, (list, tuple)) and bool(apps), where, "'apps' must be a non-empty list")
    entries = []
    for i, entry in enumerate(apps):
        at = f"{where}, app #{i + 1}"
        _require(isinstance(entry, dict) and isinstance(entry.get("name"), str) and bool(entry.get("name")), at,
                 "each app must be a dict with a 'name'")
        at = f"{where}, app {entry['name']!r}"
        _warn_unknown(entry, _REL_ENTRY_KEYS, at)
        version = entry.get("version")
        _require(version is None or isinstance(version, str), at, "'version' must be a string")
        config = entry.get("config", {})
        args = entry.get("args", {})
        mult = entry.get("mult", 1)
        _require(_is_config(config), at, "'config' must be a dict of module name -> dict")
        _require(isinstance(args, dict) and all(isinstance(k, str) for k in args), at,
                 "'args' must be a dict with string keys")
        _require(isinstance(mult, int) and not isinstance(mult, bool) and mult >= 1, at,
                 "'mult' must be an int >= 1")
        processapp = entry.get("processapp")
        _require(processapp is None or (isinstance(processapp, (list, tuple)) and 2 <= len(processapp) <= 3
                                        and all(isinstance(p, str) for p in processapp)), at,
                 "'processapp' must be (name, module, class)")
        entries.append(ReleaseEntry(name=entry["name"], version=version, config=config, args=args, mult=mult,
                                    processapp=tuple(processapp) if processapp else None))
    return ReleaseDefinition(name=name, version=rel_version, description=description, apps=tuple(entries),
                             path=path)
