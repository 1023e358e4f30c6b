"""Container configuration (DESIGN §9).

Layers, lowest first: ``res/config/ion.config`` (defaults), then
``res/config/ionlocal.config`` (the user's, git-ignored), then the ``config``
of each started app, then the command line. Every file is a dict keyed by
module name, written as a Python literal (parsed with ``ast.literal_eval``)
or YAML (safe loader). A module sees the merge of its own section and those
of its parent packages (``ion`` < ``ion.services`` < ``ion.services.deploy``).
"""

from __future__ import annotations

import ast
import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ion.core.exceptions import ConfigurationError

__all__ = ["Config", "resource_root", "read_literal_file", "deep_merge", "parse_value"]

ION_CONFIG = "ion.config"
IONLOCAL_CONFIG = "ionlocal.config"


def resource_root() -> Path:
    """Where ``res/`` is: ``$ION_HOME/res``, else ``./res`` if present, else beside the package."""
    home = os.environ.get("ION_HOME")
    if home:
        return Path(home) / "res"
    cwd_res = Path.cwd() / "res"
    if (cwd_res / "apps").is_dir():
        return cwd_res
    return Path(__file__).resolve().parents[2] / "res"


def _is_python_expression(text: str) -> bool:
    try:
        ast.parse(text.lstrip(" \t"), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def _read_yaml(text: str) -> Any:
    """``text`` as YAML (safe loader), or None if it is not YAML or PyYAML is not installed."""
    try:
        import yaml
    except ImportError:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def read_literal_file(path: Path, what: str = "file") -> Any:
    """Parse a data file written as a Python literal (or YAML), never executing it.

    A ``.config``/``.yaml`` file may be YAML, but only if it is not a Python
    expression at all: a Python dict holding a name or a call is refused,
    never read by YAML as a string.

    :raises ConfigurationError: naming the file and the line of a syntax error.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigurationError(f"cannot read {what} {path}: {reason}") from exc
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        literal_error = exc
    yaml_allowed = path.suffix in (".yaml", ".yml") or path.name.endswith(".config")
    if yaml_allowed and not _is_python_expression(text):
        data = _read_yaml(text)
        if isinstance(data, dict):
            return data
    where = ""
    if isinstance(literal_error, SyntaxError) and literal_error.lineno:
        where = f" (line {literal_error.lineno})"
    elif isinstance(literal_error, ValueError):
        where = " (only literals are allowed: no names, calls or expressions)"
    raise ConfigurationError(f"{what} {path} is not a valid literal{where}: {literal_error}")


def deep_merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``overlay`` into a copy of ``base``; nested dicts merge, other values replace."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal if it parses as one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


class Config:
    """The effective configuration of one container, as layers.

    :param base: the defaults layer (already merged ion.config + ionlocal.config).
    :param command_line: the command-line layer, which overrides everything.
    """

    def __init__(self, base: Mapping[str, Any] | None = None,
                 command_line: Mapping[str, Any] | None = None) -> None:
        self._base = dict(base or {})
        self._apps: dict[str, dict[str, Any]] = {}
        self._command_line = dict(command_line or {})
        self._effective: dict[str, Any] | None = None
        self._per_module: dict[str, dict[str, Any]] = {}

    @classmethod
    def load(cls, config_dir: Path | None = None, command_line: Mapping[str, Any] | None = None) -> Config:
        """Read ``ion.config`` and ``ionlocal.config`` from ``config_dir`` (default ``res/config``)."""
        config_dir = config_dir or resource_root() / "config"
        base: dict[str, Any] = {}
        for name in (ION_CONFIG, IONLOCAL_CONFIG):
            path = config_dir / name
            if not path.exists():
                continue
            data = read_literal_file(path, "config file")
            if not isinstance(data, dict):
                raise ConfigurationError(f"config file {path} must hold a dict keyed by module name")
            base = deep_merge(base, data)
        return cls(base, command_line)

    # -- layers ------------------------------------------------------------------------
    def overlay_app(self, app_name: str, config: Mapping[str, Any]) -> None:
        """Add (or replace) the layer of a started app."""
        self._apps[app_name] = dict(config)
        self._invalidate()

    def remove_app(self, app_name: str) -> None:
        if self._apps.pop(app_name, None) is not None:
            self._invalidate()

    def set_command_line(self, overlay: Mapping[str, Any]) -> None:
        self._command_line = deep_merge(self._command_line, overlay)
        self._invalidate()

    def _invalidate(self) -> None:
        self._effective = None
        self._per_module.clear()

    # -- reading -------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        """The merged configuration, every layer applied."""
        if self._effective is None:
            merged = dict(self._base)
            for layer in self._apps.values():
                merged = deep_merge(merged, layer)
            self._effective = deep_merge(merged, self._command_line)
        return self._effective

    def for_module(self, module: str) -> dict[str, Any]:
        """The section of ``module`` merged over those of its parent packages."""
        cached = self._per_module.get(module)
        if cached is not None:
            return cached
        out = self._section(self.as_dict(), module)
        self._per_module[module] = out
        return out

    def get(self, module: str, key: str, default: Any = None) -> Any:
        """One value of a module's effective section."""
        return self.for_module(module).get(key, default)

    # -- the container's own layers (security bounds, see ion.core.security) ------------------
    @staticmethod
    def _section(layer: Mapping[str, Any], module: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            section = layer.get(".".join(parts[:i]))
            if isinstance(section, Mapping):
                out = deep_merge(out, section)
        return out

    def container_get(self, module: str, key: str, default: Any = None) -> Any:
        """A value from the container's own layers only (config files and command line),
        never from an app's ``config``: what a security bound starts from."""
        return self._section(deep_merge(self._base, self._command_line), module).get(key, default)

    def app_values(self, module: str, key: str) -> list[tuple[str, Any]]:
        """``(app name, value)`` for every started app whose ``config`` sets ``key`` for ``module``."""
        return [(app, section[key]) for app, layer in self._apps.items()
                if key in (section := self._section(layer, module))]
