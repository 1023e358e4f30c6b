"""Configuration layers (DESIGN §9): ion.config < ionlocal.config < app config < command line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from ion.core.apps.supervisor import STRATEGIES
from ion.core.config import Config, deep_merge, parse_value, read_literal_file, resource_root
from ion.core.exceptions import ConfigurationError

REPO_RES = Path(__file__).resolve().parents[2] / "res"


def write_config_dir(folder: Path, base: str, local: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ion.config").write_text(base)
    if local is not None:
        (folder / "ionlocal.config").write_text(local)
    return folder


BASE = repr({
    "ion": {"level": "base", "shared": "base"},
    "ion.core.process": {"rpc_timeout": 15, "terminate_timeout": 10},
    "ion.services": {"level": "services-base"},
    "ion.services.x": {"a": "base", "b": "base", "c": "base", "d": "base"},
})
LOCAL = repr({"ion.services.x": {"b": "local", "c": "local", "d": "local"}, "ion.core.process": {"rpc_timeout": 5}})


# ---------------------------------------------------------------------------------------------------
# layering
# ---------------------------------------------------------------------------------------------------
def test_overlay_order_file_local_app_command_line(tmp_path):
    """Each layer overrides the ones below: ion.config < ionlocal.config < app config < command line."""
    config = Config.load(write_config_dir(tmp_path, BASE, LOCAL))
    config.overlay_app("app", {"ion.services.x": {"c": "app", "d": "app"}})
    config.set_command_line({"ion.services.x": {"d": "cli"}})
    assert config.for_module("ion.services.x") == {
        "level": "services-base", "shared": "base", "a": "base", "b": "local", "c": "app", "d": "cli"}


def test_command_line_given_at_load_overrides_apps(tmp_path):
    """A command-line layer passed to Config.load still wins over an app layer added later."""
    config = Config.load(write_config_dir(tmp_path, BASE), command_line={"ion.services.x": {"a": "cli"}})
    config.overlay_app("app", {"ion.services.x": {"a": "app"}})
    assert config.get("ion.services.x", "a") == "cli"


def test_ionlocal_merges_nested_sections_without_dropping_siblings(tmp_path):
    """ionlocal.config overrides one key of a section; the section's other keys stay."""
    config = Config.load(write_config_dir(tmp_path, BASE, LOCAL))
    assert config.get("ion.core.process", "rpc_timeout") == 5
    assert config.get("ion.core.process", "terminate_timeout") == 10


def test_missing_ionlocal_is_fine(tmp_path):
    """Without ionlocal.config the defaults apply as they are."""
    config = Config.load(write_config_dir(tmp_path, BASE))
    assert config.get("ion.services.x", "b") == "base"


def test_later_app_layer_wins_and_removal_restores(tmp_path):
    """Two apps' layers apply in start order; removing one brings back what it covered."""
    config = Config.load(write_config_dir(tmp_path, BASE))
    config.overlay_app("one", {"ion.services.x": {"a": "one", "b": "one"}})
    config.overlay_app("two", {"ion.services.x": {"a": "two"}})
    assert (config.get("ion.services.x", "a"), config.get("ion.services.x", "b")) == ("two", "one")
    config.remove_app("two")
    assert config.get("ion.services.x", "a") == "one"
    config.remove_app("one")
    assert config.get("ion.services.x", "a") == "base"
    config.remove_app("never-added")  # harmless


def test_set_command_line_accumulates(tmp_path):
    """Two set_command_line calls merge: the second does not drop the first's keys."""
    config = Config.load(write_config_dir(tmp_path, BASE))
    config.set_command_line({"ion.services.x": {"a": 1}})
    config.set_command_line({"ion.services.x": {"b": 2}})
    assert (config.get("ion.services.x", "a"), config.get("ion.services.x", "b")) == (1, 2)


def test_reads_see_changes_after_caching(tmp_path):
    """A value read (and cached) before a new layer is added is re-read afterwards."""
    config = Config.load(write_config_dir(tmp_path, BASE))
    assert config.get("ion.services.x", "a") == "base"
    assert config.as_dict()["ion.services.x"]["a"] == "base"
    config.overlay_app("app", {"ion.services.x": {"a": "app"}})
    assert config.get("ion.services.x", "a") == "app"
    assert config.as_dict()["ion.services.x"]["a"] == "app"
    config.set_command_line({"ion.services.x": {"a": "cli"}})
    assert config.get("ion.services.x", "a") == "cli"


def test_layers_do_not_share_state_with_callers(tmp_path):
    """Merging never changes the dicts given as layers."""
    layer = {"ion.services.x": {"a": "app", "nested": {"k": 1}}}
    before = copy.deepcopy(layer)
    config = Config.load(write_config_dir(tmp_path, BASE))
    config.overlay_app("app", layer)
    config.set_command_line({"ion.services.x": {"nested": {"k": 2}}})
    assert config.get("ion.services.x", "nested") == {"k": 2}
    assert layer == before


# ---------------------------------------------------------------------------------------------------
# for_module
# ---------------------------------------------------------------------------------------------------
def test_for_module_merges_parent_package_sections(tmp_path):
    """A module sees ion < ion.services < ion.services.x, the most specific winning."""
    config = Config.load(write_config_dir(tmp_path, BASE))
    section = config.for_module("ion.services.x")
    assert section["level"] == "services-base"  # ion.services over ion
    assert section["shared"] == "base"           # from ion
    assert section["a"] == "base"
    assert config.for_module("ion.services.x.sub")["a"] == "base"  # a sub-module inherits


def test_for_module_ignores_name_prefixes_that_are_not_packages(tmp_path):
    """Only dotted parent packages count: ion.serv is not a parent of ion.services.deploy."""
    config = Config({"ion.serv": {"wrong": 1}, "ion.services": {"right": 1}})
    assert config.for_module("ion.services.deploy") == {"right": 1}


def test_get_default_for_missing_key_and_module():
    """get() returns the default for a key no layer sets, and for a module with no section."""
    config = Config({"ion.a": {"k": 1}})
    assert config.get("ion.a", "missing", "dflt") == "dflt"
    assert config.get("no.such.module", "k", 7) == 7


# ---------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------
def test_yaml_ionlocal_config(tmp_path):
    """ionlocal.config may be YAML (block style); it overlays ion.config like a literal would."""
    folder = write_config_dir(tmp_path, BASE, "# my overrides\nion.services.x:\n  b: yaml\n  e: [1, 2]\n")
    config = Config.load(folder)
    assert config.get("ion.services.x", "b") == "yaml"
    assert config.get("ion.services.x", "e") == [1, 2]


@pytest.mark.parametrize("body", [
    "{{'ion': {{'x': __import__('os').makedirs({marker!r})}}}}",
    "{{'ion': {{'x': open({marker!r}, 'w')}}}}",
    "{{'ion': {{'x': evil}}}}",
])
def test_config_file_with_code_is_refused_not_read_as_yaml(tmp_path, body):
    """A Python dict with a call or a name is refused, not run and not taken as YAML strings."""
    marker = tmp_path / "pwned"
    folder = write_config_dir(tmp_path / "cfg", BASE, body.format(marker=str(marker)))
    with pytest.raises(ConfigurationError) as info:
        Config.load(folder)
    assert "ionlocal.config" in str(info.value)
    assert "only literals" in str(info.value)
    assert not marker.exists()


def test_malformed_config_names_file_and_line(tmp_path):
    """A config file that is neither a literal nor YAML gives the file and the line."""
    folder = write_config_dir(tmp_path, "{\n  'ion': {'a': 1},\n  'ion.x': {'b': 2\n}\n")
    with pytest.raises(ConfigurationError) as info:
        Config.load(folder)
    assert str(folder / "ion.config") in str(info.value)
    assert "line" in str(info.value)


@pytest.mark.parametrize("text", ["[1, 2]", "'text'", "- a\n- b\n"])
def test_config_file_must_hold_a_dict(tmp_path, text):
    """A config file that parses to something other than a dict is refused, naming it."""
    folder = write_config_dir(tmp_path, BASE, text)
    with pytest.raises(ConfigurationError, match="ionlocal.config"):
        Config.load(folder)


def test_unreadable_config_is_a_configuration_error(tmp_path):
    """A config file that is not UTF-8 text gives a ConfigurationError naming it."""
    path = tmp_path / "ion.config"
    path.write_bytes(b"{'a': '\xff\xfe'}")
    with pytest.raises(ConfigurationError, match="cannot read config file .*ion.config"):
        read_literal_file(path, "config file")


def test_shipped_ion_config_is_valid():
    """res/config/ion.config is a literal with the sections and supervision keys the code reads."""
    data = read_literal_file(REPO_RES / "config" / "ion.config", "config file")
    assert data["ion.core.apps"]["restart_strategy"] in STRATEGIES
    assert int(data["ion.core.apps"]["max_restarts"]) >= 0
    assert float(data["ion.core.apps"]["restart_period"]) > 0
    assert data["ion.core.process"]["rpc_timeout"] > 0
    assert all(isinstance(k, str) and isinstance(v, dict) for k, v in data.items())


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [
    ("5", 5), ("1.5", 1.5), ("True", True), ("'x'", "x"), ("{'a': 1}", {"a": 1}), ("[1, 'b']", [1, "b"]),
    ("plain", "plain"), ("two words", "two words"), ("__import__('os')", "__import__('os')"),
    ("{[1]: 2}", "{[1]: 2}"), ("(", "("),
])
def test_parse_value(text, value):
    """A command-line value is a literal if it is one, else the text itself; it is never run."""
    assert parse_value(text) == value


def test_deep_merge_merges_nested_dicts_and_copies():
    """deep_merge merges nested dicts, replaces other values and leaves both inputs alone."""
    base = {"a": {"x": 1, "y": {"z": 1}}, "b": [1]}
    overlay = {"a": {"y": {"w": 2}}, "b": [2], "c": {"n": 1}}
    out = deep_merge(base, overlay)
    assert out == {"a": {"x": 1, "y": {"z": 1, "w": 2}}, "b": [2], "c": {"n": 1}}
    out["c"]["n"] = 99
    out["a"]["y"]["z"] = 99
    assert overlay["c"] == {"n": 1} and base["a"]["y"] == {"z": 1}


def test_resource_root_from_ion_home(tmp_path, monkeypatch):
    """$ION_HOME/res is the resource root when ION_HOME is set."""
    monkeypatch.setenv("ION_HOME", str(tmp_path))
    assert resource_root() == tmp_path / "res"


def test_resource_root_from_working_folder(tmp_path, monkeypatch):
    """Without ION_HOME, ./res is used when it has an apps folder, else the one beside the package."""
    monkeypatch.delenv("ION_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resource_root() == REPO_RES
    (tmp_path / "res" / "apps").mkdir(parents=True)
    assert resource_root() == tmp_path / "res"


def test_config_load_default_is_the_resource_root(tmp_path, monkeypatch):
    """Config.load() without a folder reads res/config under the resource root."""
    write_config_dir(tmp_path / "res" / "config", repr({"ion.t": {"k": "home"}}),
                     repr({"ion.t": {"k": "home-local"}}))
    monkeypatch.setenv("ION_HOME", str(tmp_path))
    assert Config.load().get("ion.t", "k") == "home-local"


# -- JSON's words (issue #15) -------------------------------------------------------------------------------
def test_readme_json_snippet_with_true_false_null_is_read(tmp_path):
    """The README's config snippet is JSON: true, false and null are read as True, False, None."""
    folder = write_config_dir(tmp_path, BASE, '{"ion.services.deploy": {"allowed_file_repositories": ["examples/repo"],\n'
                                              '  "flag": true, "off": false, "none": null}}\n')
    config = Config.load(folder)
    assert config.get("ion.services.deploy", "allowed_file_repositories") == ["examples/repo"]
    assert (config.get("ion.services.deploy", "flag"), config.get("ion.services.deploy", "off"),
            config.get("ion.services.deploy", "none")) == (True, False, None)


def test_a_bad_token_is_named_with_its_line(tmp_path):
    """A name that is no literal is named, with its line; no '<ast.Name object at 0x...>'."""
    folder = write_config_dir(tmp_path, BASE, '{"ion.x": {"a": true,\n  "b": yes}}\n')
    with pytest.raises(ConfigurationError) as info:
        Config.load(folder)
    message = str(info.value)
    assert "line 2: 'yes' is not a literal" in message and "ast." not in message and "0x" not in message


def test_json_words_on_the_command_line():
    """-a module.key=true gives True, as in a config file; other bare words stay strings."""
    assert parse_value("true") is True and parse_value("null") is None
    assert parse_value("[true, false]") == [True, False]
    assert parse_value("yes") == "yes"


@pytest.mark.parametrize("text", ["/tmp/ion-test-audit-1if2ab/audit-1.jsonl", "/tmp/x-1in2", "'\\d+'"])
def test_a_value_python_would_warn_about_prints_no_warning(text):
    """A path whose random part tokenizes as ``1if`` (Python: "invalid decimal literal") or a string with
    an escape Python warns about stays a value, and no SyntaxWarning reaches stderr (CI's `twistd`
    child printed one for its audit path's random folder name)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = parse_value(text)
    assert [str(w.message) for w in caught] == []
    assert value == (text if not text.startswith("'") else "\\d+")
