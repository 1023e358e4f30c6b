"""Properties of the deployment parser (DESIGN §8): only DeploymentError, and items as written.

Generated documents: valid ones (every URL form, optional flags and digests, ``$VARS`` set
in the given environment, unknown keys), near-valid ones with one thing wrong (a key
missing, mistyped or extra, a variable unset), any JSON, any text and any bytes as a file,
and Deploy-request items of any shape. The parser returns items whose fields are the
document's, or raises DeploymentError listing exactly the one problem put in.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ion.services.deploy.spec import (
    ITEM_KEYS,
    Deployment,
    DeploymentError,
    DeploymentItem,
    item_from_dict,
    load_deployment,
    parse_deployment,
)

SOURCE = "d.json"
CWD = Path("/work/cwd")
BASE = Path("/work/base")
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- valid documents ----------------------------------------------------------------------------
#: One path component: anything but separators, NUL, '.', '..' or blanks.
component = st.text(st.characters(blacklist_characters="/\\\x00", blacklist_categories=["Cs"]),
                    min_size=1, max_size=8).filter(lambda s: bool(s.strip()) and s not in (".", ".."))
_safe = "abcXYZ019_-. "
segment = st.text(_safe, min_size=1, max_size=6).filter(lambda s: s.strip(" .") != "")
rel_path = st.lists(segment, min_size=1, max_size=3).map("/".join)
#: URL paths: no spaces, which a URL would lose at its ends (it is stripped).
url_path = st.lists(st.text(_safe.strip(), min_size=1, max_size=6).filter(lambda s: s.strip(".") != ""),
                    min_size=1, max_size=3).map("/".join)
host = st.text("abcxyz019.-", min_size=1, max_size=10)


@st.composite
def repository_urls(draw: st.DrawFn) -> tuple[str, tuple[str, str, str]]:
    """A repository URL in one of its four forms, with the (scheme, location, prefix) it names."""
    form = draw(st.sampled_from(["s3", "http", "https", "file-abs", "file-rel"]))
    if form in ("s3", "http", "https"):
        location = draw(host) + (draw(st.sampled_from(["", ":8080"])) if form != "s3" else "")
        prefix = draw(st.just("") | url_path)
        spelled = draw(st.sampled_from([form, form.upper()]))
        tail = draw(st.sampled_from(["", "/"])) if not prefix else "/" + prefix + draw(st.sampled_from(["", "/"]))
        return f"{spelled}://{location}{tail}", (form, location, prefix.strip("/"))
    path = draw(url_path)
    if form == "file-abs":
        return draw(st.sampled_from(["file://", "file:", "file://localhost"])) + "/" + path, (
            "file", os.path.normpath("/" + path), "")
    return "file:" + path, ("file", os.path.normpath(BASE / path), "")


var_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,5}", fullmatch=True)
#: Variable values: may hold '/', '$' and spaces, never a leading '~' (that would be the user's home).
var_value = st.text("abc/$ _.-0", max_size=8)
#: Literal destination text, including '$' that is not a variable.
literal = st.text(_safe + "/", min_size=1, max_size=6) | st.sampled_from(["$1", "$-", "$ ", "/$9/"])


@st.composite
def destinations(draw: st.DrawFn, environ: dict[str, str]) -> tuple[str, str]:
    """A destination as written (``$VAR`` / ``${VAR}`` among literal text) and as expanded."""
    parts = draw(st.lists(literal | st.sampled_from(sorted(environ)).map(lambda v: ("var", v))
                          if environ else literal, min_size=1, max_size=4))
    written, expanded = "", ""
    for n, part in enumerate(parts):
        if isinstance(part, tuple):
            following = parts[n + 1] if n + 1 < len(parts) else ""
            next_char = ("$" if isinstance(following, tuple) else following[:1]) or "/"
            braces = draw(st.booleans()) or next_char.isalnum() or next_char == "_"
            written += f"${{{part[1]}}}" if braces else f"${part[1]}"
            expanded += environ[part[1]]
        else:
            written += part
            expanded += part
    if not written.strip() or written.startswith("~"):
        written = expanded = "/" + written
    return written, expanded


hex64 = st.text("0123456789abcdefABCDEF", min_size=64, max_size=64)
sha256 = st.one_of(hex64, st.dictionaries(rel_path, hex64, min_size=1, max_size=2))


@st.composite
def items(draw: st.DrawFn, environ: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An item as written, and the fields it should parse into."""
    written, expanded = draw(destinations(environ))
    item: dict[str, Any] = {"name": draw(component), "version": draw(component), "platform": draw(component),
                            "destination": written}
    for key in ("link", "unpack", "keep_updated", "sha256"):
        if draw(st.booleans()):
            item[key] = draw(sha256 if key == "sha256" else st.booleans())
    unknown = draw(st.lists(st.text(max_size=6).filter(lambda k: k not in ITEM_KEYS), max_size=2, unique=True))
    for key in unknown:
        item[key] = draw(st.none() | st.integers() | st.text(max_size=4))
    digest = item.get("sha256")
    expected = {
        "name": item["name"], "version": item["version"], "platform": item["platform"],
        "destination": Path(os.path.normpath(os.path.join(CWD, expanded))),
        "link": item.get("link", True), "unpack": item.get("unpack", True),
        "keep_updated": item.get("keep_updated", False),
        "sha256": (digest.lower() if isinstance(digest, str)
                   else {k: v.lower() for k, v in digest.items()} if digest else None),
        "warnings": len(unknown),
    }
    return item, expected


@st.composite
def documents(draw: st.DrawFn) -> tuple[list[Any], dict[str, str], list[dict[str, Any]], int]:
    """A valid deployment, its environment, the expected item fields in order, the warning count."""
    environ = draw(st.dictionaries(var_name, var_value, max_size=3))
    doc: list[Any] = []
    expected: list[dict[str, Any]] = []
    warnings = 0
    for r in range(1, draw(st.integers(1, 2)) + 1):
        url, repo_fields = draw(repository_urls())
        drawn = draw(st.lists(items(environ), max_size=3))  # up to 6 items in all
        repo: dict[str, Any] = {"url": url, "items": [item for item, _ in drawn]}
        if draw(st.booleans()):
            repo["comment"] = "unknown"
            warnings += 1
        doc.append(repo)
        for i, (_, fields) in enumerate(drawn, 1):
            warnings += fields["warnings"]
            expected.append(dict(fields, repository=repo_fields, position=f"repository #{r}, item #{i}"))
    return doc, environ, expected, warnings


def _check_items(dep: Deployment, expected: list[dict[str, Any]]) -> None:
    assert len(dep.items) == len(expected)
    for item, want in zip(dep.items, expected, strict=True):
        repo = item.repository
        assert (repo.scheme, repo.location, repo.prefix) == want["repository"]
        for key in ("name", "version", "platform", "destination", "link", "unpack", "keep_updated", "sha256",
                    "position"):
            assert getattr(item, key) == want[key], key


def _parse(doc: Any, environ: dict[str, str]) -> Deployment:
    return parse_deployment(doc, source=SOURCE, base_dir=BASE, cwd=CWD, environ=environ)


@SETTINGS
@given(documents())
def test_valid_documents_parse_into_their_items(generated: tuple[list[Any], dict[str, str],
                                                                 list[dict[str, Any]], int]) -> None:
    """Every item of a valid document comes back in order with its fields, defaults filled,
    variables expanded from the given environment, digests lower-cased, one warning per unknown key."""
    doc, environ, expected, warnings = generated
    dep = _parse(doc, environ)
    _check_items(dep, expected)
    assert len(dep.warnings) == warnings


# -- near-valid documents: exactly the one problem put in ------------------------------------------
bad_component = st.sampled_from([0, 1.5, None, True, [], {}, "", "  ", "a/b", "a\\b", ".", "..", "a\x00b"])
bad_flag = st.sampled_from(["false", "true", "", 0, 1, 0.0, None, [], {}])
bad_destination = st.sampled_from([0, None, True, "", "   ", [], {}])
bad_sha256 = st.sampled_from(["abc", "g" * 64, "a" * 63, 42, True, [], {}, {"f": "x"}, {"/abs": "a" * 64},
                              {"a/../b": "a" * 64}])
bad_url = st.sampled_from([0, None, "", "ftp://x", "s3://", "http://", "https:///p", "file://host/x", "file:",
                           "http://[", "nourl", []])
BAD_VALUES = {"name": bad_component, "version": bad_component, "platform": bad_component,
              "destination": bad_destination, "link": bad_flag, "unpack": bad_flag, "keep_updated": bad_flag,
              "sha256": bad_sha256}


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[list[Any], dict[str, str], str | None]:
    """A valid document with one thing wrong, and a word its one problem must contain
    (None: nothing is wrong, an unknown key was added)."""
    doc, environ, _, _ = draw(documents())
    repo = draw(st.sampled_from(doc))
    targets = ["missing url", "bad url", "bad items"]
    if repo["items"]:
        targets += ["missing key", "bad value", "bad value", "unset variable", "not an object", "extra key"]
    target = draw(st.sampled_from(targets))
    if target == "missing url":
        del repo["url"]
        return doc, environ, "missing 'url'"
    if target == "bad url":
        repo["url"] = draw(bad_url)
        # A string names its fault (scheme, bucket, host, folder); anything else is "'url' must be...".
        return doc, environ, "" if isinstance(repo["url"], str) and repo["url"] else "'url'"
    if target == "bad items":
        repo["items"] = draw(st.sampled_from([None, {}, "items", 3]))
        return doc, environ, "'items'"
    n = draw(st.integers(0, len(repo["items"]) - 1))
    item = repo["items"][n]
    if target == "missing key":
        key = draw(st.sampled_from(["name", "version", "platform", "destination"]))
        del item[key]
        return doc, environ, f"missing {key!r}"
    if target == "bad value":
        key = draw(st.sampled_from(sorted(BAD_VALUES)))
        item[key] = draw(BAD_VALUES[key])
        return doc, environ, f"{key!r}"
    if target == "unset variable":
        name = draw(var_name.filter(lambda v: v not in environ))
        item["destination"] = f"/x/${{{name}}}/y"
        return doc, environ, f"${name}"
    if target == "not an object":
        repo["items"][n] = draw(st.sampled_from([None, 1, "item", [], True]))
        return doc, environ, "must be an object"
    item[draw(st.text(max_size=6).filter(lambda k: k not in ITEM_KEYS))] = "extra"
    return doc, environ, None


@SETTINGS
@given(near_valid())
def test_one_fault_is_exactly_one_problem(generated: tuple[list[Any], dict[str, str], str | None]) -> None:
    """A document with one key missing, mistyped or unset fails with DeploymentError listing that
    one problem, naming the file and the key; one extra key is only a warning."""
    doc, environ, word = generated
    try:
        _parse(doc, environ)
    except DeploymentError as exc:
        assert word is not None, f"an extra key was refused: {exc.problems}"
        (problem,) = exc.problems
        assert problem.startswith(f"{SOURCE}: repository #")
        assert word in problem
        event("refused")
    else:
        assert word is None, f"accepted although it has {word}"
        event("warned")


@SETTINGS
@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5), st.just([]),
                 st.dictionaries(st.text(max_size=5), st.none(), max_size=2)))
def test_not_an_array_of_repositories_is_refused(data: Any) -> None:
    """Anything but a non-empty array is one DeploymentError naming the file."""
    with pytest.raises(DeploymentError) as info:
        _parse(data, {})
    (problem,) = info.value.problems
    assert problem.startswith(SOURCE)


# -- any file: only DeploymentError --------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["url", "items", *ITEM_KEYS, "x"]) | st.text(max_size=4), children, max_size=5),
    max_leaves=20,
)


def _file_texts() -> st.SearchStrategy[bytes]:
    valid = documents().map(lambda d: json.dumps(d[0]).encode())
    return st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
        json_values.map(lambda v: json.dumps(v).encode()),
        valid,
        # A valid document spoiled: cut short, or with bytes that are not UTF-8 inside it.
        st.tuples(valid, st.integers(0, 400), st.sampled_from([b"", b"\xff", b"\xc3", b"\xed\xa0\x80"]))
        .map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]),
        # What json itself raises outside JSONDecodeError: numbers too long, nesting too deep.
        st.integers(4301, 20000).map(lambda n: b"[" + b"7" * n + b"]"),
        st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(1, 100_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    )


@SETTINGS
@given(_file_texts(), st.dictionaries(var_name, var_value, max_size=2))
def test_any_file_loads_or_is_a_deployment_error(content: bytes, environ: dict[str, str]) -> None:
    """Whatever bytes a deployment file holds, load_deployment returns a Deployment or raises
    DeploymentError with at least one problem naming the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SOURCE
        path.write_bytes(content)
        try:
            dep = load_deployment(path, cwd=CWD, environ=environ)
        except DeploymentError as exc:
            assert exc.problems and all(p.startswith(str(path)) for p in exc.problems)
            event("refused")
        else:
            assert isinstance(dep, Deployment)
            event("loaded")


# -- Deploy requests: item_from_dict -----------------------------------------------------------------
request_keys = st.text(max_size=4) | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=2)
#: What a msgpack-decoded request can hold: maps with int and bytes keys, bytes, nested values.
request_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        request_keys, inner, max_size=3),
    max_leaves=10,
)


@st.composite
def requests(draw: st.DrawFn) -> Any:
    """A request item: a valid one with some keys replaced by anything, or anything at all."""
    doc, environ, _, _ = draw(documents().filter(lambda d: bool(d[2])))
    item = _parse(doc, environ).items[0].to_dict()
    for key in draw(st.lists(st.sampled_from([*ITEM_KEYS, "url", "position", "x"]), max_size=3)):
        if draw(st.booleans()):
            item.pop(key, None)
        else:
            item[key] = draw(request_values | st.builds(lambda k, h: {k: h}, request_keys | rel_path, hex64))
    return draw(st.just(item) | request_values)


@SETTINGS
@given(requests())
def test_request_items_raise_only_deployment_error(data: Any) -> None:
    """item_from_dict of any msgpack value returns a DeploymentItem or raises DeploymentError."""
    try:
        item = item_from_dict(data, "req")
    except DeploymentError as exc:
        assert exc.problems
        event("refused")
    else:
        assert isinstance(item, DeploymentItem)
        event("read")


def test_request_sha256_with_a_non_string_file_name_is_refused():
    """Regression: a sha256 map whose key is not a string (msgpack allows int and bytes keys)
    raised AttributeError; it is a DeploymentError naming the key."""
    data = {"url": "s3://b", "name": "a", "version": "1", "platform": "p", "destination": "/x",
            "sha256": {1: "a" * 64, b"f": "b" * 64}}
    with pytest.raises(DeploymentError) as info:
        item_from_dict(data, "req")
    assert len(info.value.problems) == 2
    assert all("not a path inside the version folder" in p for p in info.value.problems)


@SETTINGS
@given(documents().filter(lambda d: bool(d[2])))
def test_items_round_trip_through_a_request(generated: tuple[list[Any], dict[str, str],
                                                             list[dict[str, Any]], int]) -> None:
    """item_from_dict(item.to_dict()) is the item again: what the Deploy service reads is what
    the caller parsed (file URLs are sent absolute, so only the URL's spelling may differ)."""
    doc, environ, _, _ = generated
    for item in _parse(doc, environ).items:
        back = item_from_dict(item.to_dict(), "req")
        assert back.repository.url == item.to_dict()["url"]
        repo = item.repository
        assert (back.repository.scheme, back.repository.location, back.repository.prefix) == (
            repo.scheme, repo.location, repo.prefix)
        assert back == replace(item, repository=back.repository)


def test_request_destination_with_a_dollar_is_taken_literally():
    """Regression: a destination whose variable's value holds '$' ("$HOME/$X" with X="$y") was
    refused on the Deploy service's side as using the unset variable $y; a request's destination
    is already expanded, so it is taken as it is."""
    (item,) = parse_deployment([{"url": "s3://b", "items": [{"name": "a", "version": "1", "platform": "p",
                                                               "destination": "/opt/$X"}]}],
                               source=SOURCE, cwd=CWD, environ={"X": "$y"}).items
    assert item.destination == Path("/opt/$y")
    assert item_from_dict(item.to_dict(), "req") == item
