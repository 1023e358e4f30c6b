"""Typed config sections (:class:`ion.core.config.Settings`): each default declared once, in its
dataclass; ``res/config/ion.config`` documents the same values, and this file keeps the two equal."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytest_twisted

from ion.core.config import Config, Settings, read_literal_file, setting
from ion.core.exceptions import ConfigurationError
from ion.core.http import HttpSettings
from ion.core.settings import AppsSettings, ContainerSettings, MessagingSettings, ProcessSettings, TraceSettings
from ion.services.cache.core import CacheSettings
from ion.services.cache.reaper import ReapPolicy
from ion.services.cache.verify import VerifyConfig
from ion.services.deploy.settings import DeploySettings
from ion.services.deploy.spec import DEFAULT_MAX_DEPLOYMENT_BYTES
from ion.services.fetch.repository import FetchConfig
from ion.services.unpack.core import Limits, UnpackSettings

SHIPPED = Path(__file__).resolve().parents[2] / "res" / "config" / "ion.config"

#: Every typed section; a section may be split over several classes (the cache's verify_* and reap_*).
SETTINGS: tuple[type[Settings], ...] = (
    ProcessSettings, MessagingSettings, ContainerSettings, AppsSettings, CacheSettings, VerifyConfig,
    ReapPolicy, DeploySettings, FetchConfig, Limits, UnpackSettings, HttpSettings, TraceSettings,
)

#: The keys of ion.config no Settings class holds, and the default the code gives each when the
#: key is missing. Security bounds are read with ``bounded_config``/``container_get`` (DESIGN §10).
#: The shell's helpers are the shipped list itself: without it the core knows none (it names no service).
OTHER_KEYS: dict[tuple[str, str], Any] = {
    ("ion.core.security", "operators"): [],
    ("ion.core.shell", "helpers"): ["ion.services.deploy.shellhelpers"],
    ("ion.services.unpack", "allowed_roots"): None,
    ("ion.services.deploy", "allowed_destinations"): None,
    ("ion.services.deploy", "allowed_file_repositories"): None,
    ("ion.services.deploy", "max_deployment_bytes"): DEFAULT_MAX_DEPLOYMENT_BYTES,
    ("ion.services.fetch", "allowed_file_repositories"): None,
    ("ion.services.fetch", "allowed_networks"): [],
}


def _declared() -> dict[tuple[str, str], Any]:
    """``(section, key) -> default`` of every Settings field."""
    out: dict[tuple[str, str], Any] = {}
    for cls in SETTINGS:
        for key, default in cls.defaults().items():
            assert (cls.SECTION, key) not in out, f"{cls.SECTION}: {key} is declared twice"
            out[cls.SECTION, key] = default
    return out


def test_shipped_config_documents_the_declared_defaults() -> None:
    """Every key of res/config/ion.config is declared once, in a Settings class (or is a bound
    listed above), with the value the file documents; every declared key is documented."""
    shipped = read_literal_file(SHIPPED, "config file")
    documented = {(section, key): value for section, keys in shipped.items() for key, value in keys.items()}
    declared = _declared()
    assert not set(declared) & set(OTHER_KEYS)
    for where, value in documented.items():
        assert where in declared or where in OTHER_KEYS, f"{where[0]}: {where[1]} is in ion.config but not declared"
        default = declared[where] if where in declared else OTHER_KEYS[where]
        assert value == default and type(value) in (type(default), int), \
            f"{where[0]}: {where[1]} is {value!r} in ion.config but {default!r} in the code"
    missing = sorted(f"{s}: {k}" for s, k in declared if (s, k) not in documented)
    assert not missing, f"not documented in ion.config: {missing}"


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_the_shipped_section_reads_as_the_defaults(cls: type[Settings]) -> None:
    """Read through the config, the shipped file gives each class's defaults (0 = off included)."""
    config = Config(read_literal_file(SHIPPED, "config file"))
    assert config.settings(cls) == cls()


def test_pre_existing_default_constants_are_the_declared_ones() -> None:
    """The module constants kept for callers are the dataclass defaults, not second copies."""
    from ion.core.agent import DEFAULT_HEARTBEAT_INTERVAL
    from ion.core.messaging.amqp import DEFAULT_RECONNECT_INITIAL, DEFAULT_RECONNECT_MAX
    from ion.core.messaging.message import DEFAULT_MAX_MESSAGE_SIZE
    from ion.core.process import DEFAULT_PREFETCH
    from ion.services.cache.core import DEFAULT_LOCK_TIMEOUT
    from ion.services.cache.service import CacheService
    from ion.services.deploy.service import DeployService
    from ion.services.fetch.service import DEFAULT_CLIENT_TIMEOUT as FETCH_TIMEOUT
    from ion.services.fetch.service import FetchService
    from ion.services.unpack.service import DEFAULT_CLIENT_TIMEOUT as UNPACK_TIMEOUT

    assert DEFAULT_HEARTBEAT_INTERVAL == ContainerSettings().heartbeat_interval
    assert (DEFAULT_RECONNECT_INITIAL, DEFAULT_RECONNECT_MAX, DEFAULT_MAX_MESSAGE_SIZE) == (
        MessagingSettings().reconnect_initial, MessagingSettings().reconnect_max, MessagingSettings().max_message_size)
    assert DEFAULT_PREFETCH == ProcessSettings().prefetch
    assert DEFAULT_LOCK_TIMEOUT == CacheSettings().lock_timeout
    assert (FETCH_TIMEOUT, UNPACK_TIMEOUT) == (FetchConfig().rpc_timeout, UnpackSettings().rpc_timeout)
    assert CacheService.max_concurrent == CacheSettings().max_concurrent
    assert FetchService.max_concurrent == FetchConfig().max_concurrent
    assert (DeployService.max_concurrent, DeployService.drain_timeout) == (
        DeploySettings().max_concurrent, DeploySettings().drain_timeout)


# -- the helper ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample(Settings):
    SECTION: ClassVar[str] = "tests.sample"

    count: int = 3
    seconds: float = setting(1.5, positive=True, unit="seconds")
    flag: bool = False
    name: str = "x"
    optional: float | None = None
    period: float | None = setting(10.0, key="sample_period", off=True, finite=True)
    mode: str = setting("a", choices=("a", "b"))
    folder: str | bool | None = None
    names: list[str] | None = None


def test_from_config_reads_each_key_with_its_default() -> None:
    """Missing keys keep their defaults; a field may have another key; numbers are coerced to the
    field's type (an integral float to an int, an int to a float); 0 means off where it may."""
    assert Sample.from_config({}) == Sample() == Sample.from_config(None)
    s = Sample.from_config({"count": 4.0, "seconds": 2, "sample_period": 0, "period": 5, "names": ("a",),
                            "folder": False})
    assert (s.count, type(s.count), s.seconds, type(s.seconds)) == (4, int, 2.0, float)
    assert s.period is None and s.names == ["a"] and s.folder is False
    assert Sample.from_config(lambda key, default: {"flag": True}.get(key, default)).flag is True
    assert Sample.from_config(s) is s
    assert Sample.keys()["sample_period"] == "period" and Sample.defaults()["sample_period"] == 10.0


@pytest.mark.parametrize(("key", "value", "message"), [
    ("count", 1.5, "tests.sample: count must be an integer >= 0, not 1.5"),
    ("count", True, "count must be an integer"),
    ("count", -1, "count must be an integer >= 0"),
    ("count", "3", "count must be an integer"),
    ("seconds", 0, "tests.sample: seconds must be a number of seconds > 0, not 0"),
    ("seconds", math.nan, "seconds must be a number of seconds > 0"),
    ("seconds", 10 ** 400, "seconds must be a number of seconds > 0"),
    ("count", math.inf, "count must be an integer >= 0"),
    ("flag", "no", "tests.sample: flag must be true or false, not 'no'"),
    ("name", 3, "name must be a string"),
    ("optional", "x", "optional must be a number"),
    ("sample_period", -1, "sample_period must be a number > 0 (or 0/None: off), not -1"),
    ("sample_period", math.inf, "sample_period must be a number > 0 (or 0/None: off)"),
    ("mode", "c", "mode must be one of a, b, not 'c'"),
    ("folder", 3, "folder must be str or bool, not 3"),
    ("names", "abc", "names must be a list of strings"),
])
def test_a_bad_value_names_section_and_key(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Sample.from_config({key: value})
    assert message in str(info.value)


def test_config_settings_are_read_once_per_state_of_the_layers() -> None:
    """Config.settings caches the object until a layer changes; precedence is that of the layers."""
    config = Config({"ion.core.process": {"rpc_timeout": 15}}, {"ion.core.process": {"terminate_timeout": 3}})
    first = config.settings(ProcessSettings)
    assert config.settings(ProcessSettings) is first
    assert (first.rpc_timeout, first.terminate_timeout, first.prefetch) == (15.0, 3.0, 16)
    config.overlay_app("app", {"ion.core.process": {"rpc_timeout": 5, "terminate_timeout": 4}})
    second = config.settings(ProcessSettings)
    assert (second.rpc_timeout, second.terminate_timeout) == (5.0, 3.0)
    config.remove_app("app")
    assert config.settings(ProcessSettings).rpc_timeout == 15.0
    config.set_command_line({"ion.core.process": {"rpc_timeout": "soon"}})
    with pytest.raises(ConfigurationError, match="ion.core.process: rpc_timeout must be a number"):
        config.settings(ProcessSettings)


# -- in a service ---------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_service_reads_its_section_once_spawnargs_over_config(container: Any, process_factory: Any,
                                                                       tmp_path: Path, monkeypatch: Any) -> None:
    """CacheService: its settings come from its section (app config over files), spawnargs over both;
    a bad value fails the spawn naming section and key."""
    from ion.services.cache.service import CacheService

    monkeypatch.setenv("ION_CACHE_DIR", str(tmp_path))
    container.config.overlay_app("tuning", {"ion.services.cache": {"lock_lease": 30, "fsync": True}})
    service = await process_factory(CacheService, root=str(tmp_path / "c"), host_id="h1", lock_lease=45)
    assert (service.settings.lock_lease, service.settings.fsync, service.settings.host_id) == (45.0, True, "h1")
    assert service.settings.lock_timeout == CacheSettings().lock_timeout and service.cache.fsync_content is True
    with pytest.raises(ConfigurationError, match="ion.services.cache: lock_timeout must be a number >= 0, not 'long'"):
        await process_factory(CacheService, root=str(tmp_path / "c"), host_id="h1", lock_timeout="long")
