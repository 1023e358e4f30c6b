"""The ``.entry`` file: what render() writes, parse() reads back; the fast INI reader agrees with configparser."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ion.services.cache.entry import EntryInfo, EntryKey, FileMeta, _read_ini
from ion.services.cache.errors import CorruptEntryError

KEY = EntryKey("repo~abc.file", "linux", "tool", "1.0", True)


def _configparser_sections(text: str) -> dict[str, dict[str, str]] | str:
    cp = configparser.RawConfigParser(interpolation=None, strict=True)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        cp.read_string(text)
    except configparser.Error as exc:
        return type(exc).__name__
    return {name: dict(cp[name]) for name in cp.sections()}


def _entry(**files: FileMeta) -> EntryInfo:
    return EntryInfo(key=KEY, path=Path("/c/e"), files=dict(files), links={"odd name/ä=b:c": "../x y"},
                     fetched_at=1_700_000_000.5, url="file:///r/linux/tool/1.0/", content_mtime_ns=123)


def test_render_then_parse_round_trips_through_the_fast_reader() -> None:
    info = _entry(**{"a b/c=d:e;#.txt": FileMeta(3, "md5:x marker:etag%3Ay", "0" * 64), "z": FileMeta(0, None, "1" * 64)})
    text = info.render()
    assert _read_ini(text) == _configparser_sections(text)
    back = EntryInfo.parse(text, KEY, Path("/c/e"))
    assert (back.files, back.links, back.url, back.content_mtime_ns) == (
        info.files, info.links, info.url, info.content_mtime_ns)


def test_a_hand_edited_entry_still_parses_through_configparser() -> None:
    text = _entry(f=FileMeta(1, None, "2" * 64)).render().replace("url = ", "url : ")
    text = text.replace("[file f]\n", "[file f]\n  ; an indented comment\nsize = 1\n", 1).replace(
        "size = 1\nsize = 1\n", "size = 1\n")
    text += "\n[link extra]\ntarget = a\n    continued\n"
    assert _read_ini(text) is None  # the continuation line: configparser decides
    info = EntryInfo.parse(text.replace("links = 1", "links = 2"), KEY, Path("/c/e"))
    assert info.links["extra"] == "a\ncontinued"
    assert info.url == "file:///r/linux/tool/1.0/"


@pytest.mark.parametrize("text, why", [
    ("[entry]\nname = a\nname = b\n", "not an INI file"),
    ("name = a\n[entry]\n", "not an INI file"),
    ("[other]\nx = 1\n", "no [entry] section"),
])
def test_a_broken_entry_names_its_problem(text: str, why: str) -> None:
    with pytest.raises(CorruptEntryError, match=re.escape(why)):
        EntryInfo.parse(text, KEY, Path("/c/e"))


_LINE = st.one_of(
    st.text(alphabet="ab =:[];#\t \r", max_size=12),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(["size", "sha256", "x y", "k:v"]),
              st.text(alphabet="ab =:[]#;", max_size=8)),
    st.builds(lambda n: f"[{n}]", st.sampled_from(["entry", "file a", "DEFAULT", "x]y", ""])),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINE, max_size=10))
def test_the_fast_reader_never_disagrees_with_configparser(lines: list[str]) -> None:
    """Where the fast reader answers, configparser gives the same sections; else it says None."""
    text = "\n".join(lines)
    fast = _read_ini(text)
    if fast is not None:
        assert fast == _configparser_sections(text)


def _configparser_render(info: EntryInfo) -> str:
    """The ``.entry`` text as ``RawConfigParser`` writes it: what ``render`` must give, byte for byte."""
    import io

    from ion.services.cache.entry import _iso, _q

    cp = configparser.RawConfigParser(interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp["entry"] = {
        "repo_id": info.key.repo_id, "platform": info.key.platform, "name": info.key.name,
        "version": info.key.version, "unpack": "true" if info.key.unpack else "false",
        "fetched_at": _iso(info.fetched_at), "config_version": str(info.config_version),
        "files": str(len(info.files)), "links": str(len(info.links)), "url": info.url or "",
    }
    if info.content_mtime_ns is not None:
        cp["entry"]["content_mtime_ns"] = str(info.content_mtime_ns)
    for rel in sorted(info.files):
        meta = info.files[rel]
        cp["file " + _q(rel)] = {"size": str(meta.size), "sha256": meta.sha256,
                                 "remote_checksum": meta.remote_checksum or ""}
    for rel in sorted(info.links):
        cp["link " + _q(rel)] = {"target": _q(info.links[rel])}
    out = io.StringIO()
    out.write("# ion cache entry: written last, by atomic rename; an entry without it is incomplete.\n")
    cp.write(out)
    return out.getvalue()


_NAME = st.text(alphabet="ab /=:;#[]%\t\nä", min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(files=st.dictionaries(_NAME, st.tuples(st.integers(0, 2**40), st.one_of(st.none(), _NAME)), max_size=4),
       links=st.dictionaries(_NAME, _NAME, max_size=3),
       url=st.one_of(st.none(), st.text(alphabet="ab:/\n\t =", max_size=12)),
       mtime=st.one_of(st.none(), st.integers(0, 2**62)))
def test_render_writes_what_configparser_writes(files: dict[str, tuple[int, str | None]], links: dict[str, str],
                                                 url: str | None, mtime: int | None) -> None:
    info = EntryInfo(key=KEY, path=Path("/c/e"), links=links, fetched_at=1_700_000_000.25, url=url,
                     files={rel: FileMeta(size, remote, "3" * 64) for rel, (size, remote) in files.items()},
                     content_mtime_ns=mtime)
    assert info.render() == _configparser_render(info)
