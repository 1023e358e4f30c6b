"""Container configuration (DESIGN §9).

Layers, lowest first: ``res/config/ion.config`` (defaults), then
``res/config/ionlocal.config`` (the user's, git-ignored), then the ``config``
of each started app, then the command line. Every file is a dict keyed by
module name, written as a Python literal (parsed with ``ast.literal_eval``;
JSON's ``true``, ``false`` and ``null`` are accepted too, so a JSON document
is one) or YAML (safe loader). The files are read once, when the container
starts: a change needs a restart. A module sees the merge of its own section and those
of its parent packages (``ion`` < ``ion.services`` < ``ion.services.deploy``).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import math
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ion.core.exceptions import ConfigurationError

__all__ = ["Config", "Settings", "setting", "resource_root", "read_literal_file", "deep_merge", "parse_value",
           "literal"]

S = TypeVar("S", bound="Settings")

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


def _parse_expression(text: str) -> ast.Expression:
    """``text`` parsed as one Python expression, without the tokenizer's warnings.

    Those ("invalid decimal literal" for the ``1if`` in a path such as ``/tmp/x-1if2``, "invalid
    escape sequence") are about code, not data: a value is a literal or it is not, and a
    command-line string or a config file must not print a Python warning.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(text.lstrip(" \t"), mode="eval")


def _is_python_expression(text: str) -> bool:
    try:
        _parse_expression(text)
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


#: JSON's words for the Python constants, accepted wherever a literal is read.
_JSON_WORDS: dict[str, Any] = {"true": True, "false": False, "null": None}

#: The nodes ``ast.literal_eval`` takes (with their operators); anything else is named in the error.
_LITERAL_NODES = (ast.Expression, ast.Constant, ast.Dict, ast.Set, ast.List, ast.Tuple, ast.UnaryOp, ast.BinOp,
                  ast.UAdd, ast.USub, ast.Add, ast.Sub, ast.Load)


class _JSONWords(ast.NodeTransformer):
    """Turns the names ``true``, ``false`` and ``null`` into their constants (nothing else)."""

    def visit_Name(self, node: ast.Name) -> ast.AST:  # noqa: N802 - ast's name
        if node.id in _JSON_WORDS:
            return ast.copy_location(ast.Constant(_JSON_WORDS[node.id]), node)
        return node


def literal(text: str) -> Any:
    """``text`` as a Python literal, JSON's ``true``/``false``/``null`` accepted: never run.

    :raises SyntaxError: text that does not parse (with its line).
    :raises ValueError: a name, call or expression, naming the first such token and its line
        (``line 3: 'evil' is not a literal``).
    """
    tree = _parse_expression(text)
    tree = _JSONWords().visit(tree)
    try:
        return ast.literal_eval(tree)
    except ValueError:
        bad = next((node for node in ast.walk(tree) if not isinstance(node, _LITERAL_NODES)), None)
        if bad is None or not hasattr(bad, "lineno"):
            raise
        token = ast.get_source_segment(text.lstrip(" \t"), bad) or type(bad).__name__
        if len(token) > 60:
            token = token[:57] + "..."
        raise ValueError(f"line {bad.lineno}: {token!r} is not a literal") from None


def read_literal_file(path: Path, what: str = "file") -> Any:
    """Parse a data file written as a Python literal (JSON's ``true``/``false``/``null``
    accepted) or YAML, never executing it.

    A ``.config``/``.yaml`` file may be YAML, but only if it is not a Python
    expression at all: a Python dict holding a name or a call is refused,
    never read by YAML as a string.

    :raises ConfigurationError: naming the file and the line of a syntax error, or the
        line and the token that is not a literal.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigurationError(f"cannot read {what} {path}: {reason}") from exc
    try:
        return literal(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        literal_error = exc
    yaml_allowed = path.suffix in (".yaml", ".yml") or path.name.endswith(".config")
    if yaml_allowed and not _is_python_expression(text):
        data = _read_yaml(text)
        if isinstance(data, dict):
            return data
    if isinstance(literal_error, SyntaxError) and literal_error.lineno:
        raise ConfigurationError(f"{what} {path} is not a valid literal (line {literal_error.lineno}): "
                                 f"{literal_error.msg}")
    if isinstance(literal_error, ValueError):
        raise ConfigurationError(f"{what} {path}: {literal_error} (only literals are allowed: no names, calls "
                                 "or expressions; true, false and null are)")
    raise ConfigurationError(f"{what} {path} is not a valid literal: {literal_error}")


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
    """A command-line value: a literal if it parses as one (JSON's ``true``/``false``/``null``
    too), else the string."""
    try:
        return literal(text)
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
        #: The container's own layers merged, per module (see :meth:`container_get`).
        self._container_module: dict[str, dict[str, Any]] = {}
        self._settings: dict[type[Settings], Settings] = {}

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
        self._container_module.clear()
        self._settings.clear()

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

    def settings(self, cls: type[S]) -> S:
        """The typed settings of ``cls.SECTION`` (every layer applied), read once per state of
        the layers (a started or stopped app, a command-line change reads them again).

        :raises ConfigurationError: naming ``section: key`` of a value that is not usable.
        """
        cached: Any = self._settings.get(cls)  # (an instance of cls: it is stored by its class)
        if cached is None:
            cached = self._settings[cls] = cls.from_config(self.for_module(cls.SECTION))
        return cached

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
        section = self._container_module.get(module)
        if section is None:  # merged once per state of the layers (operators are read per control message)
            section = self._container_module[module] = self._section(deep_merge(self._base, self._command_line),
                                                                     module)
        return section.get(key, default)

    def app_values(self, module: str, key: str) -> list[tuple[str, Any]]:
        """``(app name, value)`` for every started app whose ``config`` sets ``key`` for ``module``."""
        return [(app, section[key]) for app, layer in self._apps.items()
                if key in (section := self._section(layer, module))]


# -- typed sections ------------------------------------------------------------------------------------
def setting(default: Any, *, key: str | None = None, minimum: float | None = 0, positive: bool = False,
            choices: tuple[Any, ...] | None = None, unit: str | None = None, off: bool = False,
            finite: bool = False) -> Any:
    """A field of a :class:`Settings` class: its ``default`` (the one place it is declared) and
    the checks of its value.

    :param key: the config key, if it is not the field's name.
    :param minimum: the least number accepted (numbers only; None: any).
    :param positive: the number must be more than 0.
    :param choices: the values accepted.
    :param unit: what the number counts, for messages ("a number of seconds > 0").
    :param off: ``0`` means off, as ``None`` does (the field is ``X | None``): read as ``None``.
    :param finite: infinity is refused.
    """
    return dataclasses.field(default=default, metadata={"key": key, "minimum": minimum, "positive": positive,
                                                        "choices": choices, "unit": unit, "off": off,
                                                        "finite": finite})


@dataclasses.dataclass(frozen=True)
class Settings:
    """One config section as a frozen dataclass: each field is a key, its default declared
    once, here, its value checked by the field's type (``int``, ``float``, ``bool``, ``str``,
    ``list[str]``, ``X | None``; an integral float is taken for an ``int``, an ``int`` for a
    ``float``) and :func:`setting`'s bounds, at construction.

    Subclasses set ``SECTION`` (the module name of the section, used in messages and by
    :meth:`Config.settings`) and declare their fields with plain defaults or :func:`setting`.
    """

    SECTION: ClassVar[str] = ""

    @classmethod
    def keys(cls) -> dict[str, str]:
        """``{config key: field name}`` of every field."""
        return {f.metadata.get("key") or f.name: f.name for f in dataclasses.fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{config key: default}`` of every field."""
        return {key: _default(cls, name) for key, name in cls.keys().items()}

    @classmethod
    def from_config(cls: type[S], config: Mapping[str, Any] | Callable[[str, Any], Any] | None = None) -> S:
        """From a config section (a mapping, or ``get(key, default)`` such as
        ``Process.get_config``); missing keys keep their defaults.

        :raises ConfigurationError: naming ``section: key`` of a value that is not usable.
        """
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        get = config if callable(config) else config.get
        return cls(**{name: get(key, _default(cls, name)) for key, name in cls.keys().items()})

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key = f.metadata.get("key") or f.name
            value = _checked(f"{self.SECTION}: {key}", hints[f.name], getattr(self, f.name), f.metadata)
            object.__setattr__(self, f.name, value)


def _default(cls: type[Settings], name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


_HINTS: dict[type, dict[str, Any]] = {}
_LARGEST_FLOAT = int(sys.float_info.max)


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _checked(where: str, hint: Any, value: Any, meta: Mapping[str, Any]) -> Any:
    """``value`` as the type ``hint`` names, or ConfigurationError naming ``where``."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) > 1:  # str | bool: a value of one of the (plain) types
            if not any(type(value) is a for a in options):
                raise ConfigurationError(f"{where} must be {' or '.join(a.__name__ for a in options)}, "
                                         f"not {value!r}")
            return value
        (hint,) = options
        args = typing.get_args(hint)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigurationError(f"{where} must be one of {', '.join(map(str, choices))}, not {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigurationError(f"{where} must be true or false, not {value!r}")
        return value
    if hint in (int, float):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and isinstance(value, float) and (math.isnan(value) or (hint is int and not value.is_integer())
                                                    or (meta.get("finite") and math.isinf(value))):
            number = False
        if number and hint is float and isinstance(value, int) and abs(value) > _LARGEST_FLOAT:
            number = False
        minimum = meta.get("minimum", 0)
        what = "an integer" if hint is int else "a number"
        if meta.get("unit"):
            what = f"{what} of {meta['unit']}"
        if meta.get("off"):
            if not number or value < 0:
                raise ConfigurationError(f"{where} must be {what} > 0 (or 0/None: off), not {value!r}")
            if value == 0:
                return None
        if meta.get("positive"):
            if not number or value <= 0:
                raise ConfigurationError(f"{where} must be {what} > 0, not {value!r}")
        elif not number or (minimum is not None and value < minimum):
            raise ConfigurationError(f"{where} must be {what}{'' if minimum is None else f' >= {minimum}'}, "
                                     f"not {value!r}")
        return int(value) if hint is int else float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigurationError(f"{where} must be a string, not {value!r}")
        return value
    if typing.get_origin(hint) is list and args == (str,):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigurationError(f"{where} must be a list of strings, not {value!r}")
        return list(value)
    return value
