"""Hostile deployment files: what a careless or malicious deployment.json could hold.

Pure data. ``test_deployment_files.py`` writes each case to ``deployment.json`` in an
empty folder and reads it with ``load_deployment`` (``ion/services/deploy/spec.py``)
with no environment variables set, then gives the same file to ``ion-deploy``.

A case is refused (:attr:`Case.errors`: one fragment per problem, in the order the
file holds them, all reported at once) or accepted (:attr:`Case.items` items, and
:attr:`Case.warnings`: one fragment per warning).

Add a case: one :class:`Case` entry in :data:`CASES`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: What :func:`item` and :func:`repo` leave out when given as a value.
DROP: Any = object()

#: An environment variable no case sets (the runner makes sure it is unset).
UNSET_VARS = ("ION_HOSTILE_UNSET", "ION_HOSTILE_ALSO_UNSET")


@dataclass(frozen=True)
class Case:
    """One deployment file.

    :ivar text: the file's content: text (written UTF-8), bytes, or a function making
        the bytes (for big files, made only when the case runs).
    :ivar errors: for a refused file, a fragment of each problem, in order.
    :ivar warnings: a fragment of each warning, in order.
    :ivar items: for an accepted file, how many items it deploys.
    :ivar xfail: why the code does not give this answer yet (both runs fail, strictly).
    """

    id: str
    text: str | bytes | Callable[[], bytes]
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    items: int | None = None
    xfail: str = ""
    #: Why ``ion-deploy`` alone does not give this answer yet (its run fails, strictly).
    xfail_cli: str = ""

    def __post_init__(self) -> None:
        assert bool(self.errors) != (self.items is not None), f"{self.id}: errors or items, not both"

    def content(self) -> bytes:
        text = self.text() if callable(self.text) else self.text
        return text.encode("utf-8") if isinstance(text, str) else text


def item(**fields: Any) -> dict[str, Any]:
    """A valid item (zlib 1.2 for linux, into ``out``) with ``fields`` replaced (:data:`DROP`: removed)."""
    out: dict[str, Any] = {"name": "zlib", "version": "1.2", "platform": "linux", "destination": "out"}
    out.update(fields)
    return {k: v for k, v in out.items() if v is not DROP}


def repo(*items: dict[str, Any], url: Any = "s3://b", **extra: Any) -> dict[str, Any]:
    """A repository entry holding ``items`` (default: one valid item)."""
    out: dict[str, Any] = {"url": url, "items": list(items) if items else [item()], **extra}
    return {k: v for k, v in out.items() if v is not DROP}


def doc(*repos: dict[str, Any]) -> str:
    """A deployment file of ``repos`` (default: one valid repository)."""
    return json.dumps(list(repos) if repos else [repo()], indent=1)


def _where(i: int = 1, name: str | None = "zlib", url: str = "s3://b") -> str:
    """The position a problem names: ``repository #1 (s3://b), item #1 (zlib)``."""
    return f"repository #1 ({url}), item #{i}" + (f" ({name})" if name else "")


_R1 = "repository #1 (s3://b)"
_I1 = _where()

# Just over 64 MiB: a valid document padded with spaces.
_BIG = 64 * 1024 * 1024 + 1

CASES: list[Case] = [
    # -- not JSON, or not text -----------------------------------------------------------------------
    Case("json-syntax-error", '[\n  {"url": "s3://b",\n   "items": [,]}\n]', ("invalid JSON at line 3, column 14",)),
    Case("json-truncated", doc()[:40], ("invalid JSON at line",)),
    Case("empty-file", b"", ("invalid JSON at line 1, column 1: Expecting value",)),
    Case("json-comments", "// deps\n" + doc(), ("invalid JSON at line 1, column 1",)),
    Case("json-trailing-garbage", doc() + "\n]]", ("invalid JSON at line",)),
    Case("json-nan", doc(repo(item(version=float("nan")))), (f"{_I1}: 'version' must be a string, not float NaN",)),
    Case("not-utf8", doc().encode().replace(b"zlib", b"zl\xffib"),
         ("cannot read the deployment file: 'utf-8' codec can't decode byte 0xff",)),
    Case("utf16", doc().encode("utf-16"), ("cannot read the deployment file",)),
    Case("utf8-bom", b"\xef\xbb\xbf" + doc().encode(), ("invalid JSON at line 1, column 1: Unexpected UTF-8 BOM",)),
    Case("nesting-100000-deep", "[" * 100_000 + "]" * 100_000, ("invalid JSON: nested too deeply",)),
    Case("objects-nested-100000-deep", '{"a":' * 100_000 + "1" + "}" * 100_000, ("invalid JSON: nested too deeply",)),
    Case("number-5000-digits", "[" + "1" * 5000 + "]", ("invalid JSON: Exceeds the limit",)),
    Case("over-64-mib", lambda: (doc() + " " * _BIG).encode(), ("64 MiB",)),
    # -- wrong shape ---------------------------------------------------------------------------------
    Case("top-level-object", json.dumps({"url": "s3://b", "items": []}),
         ('the deployment must be a JSON array of {"url": ..., "items": [...]}, not dict',)),
    Case("top-level-string", json.dumps("s3://b"), ("must be a JSON array", )),
    Case("top-level-null", "null", ("must be a JSON array",)),
    Case("empty-array", "[]", ("the deployment lists no repository",)),
    Case("repository-not-object", json.dumps([["s3://b"]]),
         ("repository #1: must be an object with 'url' and 'items'",)),
    Case("items-missing", doc(repo(items=DROP)),
         (f"{_R1}: 'items' must be an array of items, not null",)),
    Case("items-a-string", doc(repo(items="zlib")),
         (f"{_R1}: 'items' must be an array of items, not the string \"zlib\"",)),
    Case("item-null", doc(repo(None)), (f"{_where(name=None)}: must be an object",)),  # type: ignore[arg-type]
    Case("item-empty-object", doc(repo({})), tuple(f"{_where(name=None)}: missing {key!r}"
                                                   for key in ("name", "version", "platform", "destination"))),
    Case("repository-with-no-items", doc(repo(items=[])), items=0),
    Case("json-duplicate-key", doc().replace('"name": "zlib",', '"link": false, "link": true, "name": "zlib",'),
         (f"{_I1}: 'link' is given more than once",)),
    # -- wrong types ---------------------------------------------------------------------------------
    Case("link-string-false", doc(repo(item(link="false"))),
         (f"{_I1}: 'link' must be true or false (a JSON boolean), not the string \"false\"",)),
    Case("unpack-as-1", doc(repo(item(unpack=1))),
         (f"{_I1}: 'unpack' must be true or false (a JSON boolean), not int 1",)),
    Case("keep-updated-null", doc(repo(item(keep_updated=None))), (f"{_I1}: 'keep_updated' must be true or false",)),
    Case("version-as-number", doc(repo(item(version=1.2))), (f"{_I1}: 'version' must be a string, not float 1.2",)),
    Case("version-as-int", doc(repo(item(version=1))), (f"{_I1}: 'version' must be a string, not int 1",)),
    Case("name-as-list", doc(repo(item(name=["zlib"]))), (f"{_where(name=None)}: 'name' must be a string, not list",)),
    Case("destination-as-bool", doc(repo(item(destination=True))),
         (f"{_I1}: 'destination' must be a non-empty string, not true",)),
    Case("destination-empty", doc(repo(item(destination=" "))), (f"{_I1}: 'destination' must be a non-empty string",)),
    Case("url-as-number", doc(repo(url=5)), ("repository #1: 'url' must be a non-empty string",)),
    Case("url-unknown-scheme", doc(repo(url="ftp://host/x")), ("repository #1: unknown URL scheme 'ftp:'",)),
    Case("url-javascript", doc(repo(url="javascript:alert(1)")), ("repository #1: unknown URL scheme 'javascript:'",)),
    Case("url-s3-without-bucket", doc(repo(url="s3://")), ("repository #1: 's3://' names no bucket",)),
    Case("url-file-on-other-host", doc(repo(url="file://evil.example/x")), ("file URLs name a local path",)),
    Case("sha256-not-hex", doc(repo(item(sha256="abc"))), (f"{_I1}: 'sha256' must be 64 hex digits, not 'abc'",)),
    Case("sha256-file-outside", doc(repo(item(sha256={"../x": "a" * 64}))),
         (f"{_I1}: 'sha256' names '../x', which is not a path inside the version folder",)),
    Case("sha256-absolute-file", doc(repo(item(sha256={"/etc/passwd": "a" * 64}))),
         ("'sha256' names '/etc/passwd', which is not a path inside the version folder",)),
    Case("sha256-as-list", doc(repo(item(sha256=["a" * 64]))), ("'sha256' must be a hex digest or an object",)),
    # -- missing keys ---------------------------------------------------------------------------------
    *[Case(f"missing-{key}", doc(repo(item(**{key: DROP}))),
           (f"{_where(name=None if key == 'name' else 'zlib')}: missing {key!r}",))
      for key in ("name", "version", "platform", "destination")],
    Case("missing-url", json.dumps([{"items": [item()]}]), ("repository #1: missing 'url'",)),
    # -- variables ------------------------------------------------------------------------------------
    Case("unset-variables", doc(repo(item(destination=f"${{{UNSET_VARS[0]}}}/x/${UNSET_VARS[1]}"))),
         (f"uses unset variable(s) ${UNSET_VARS[0]}, ${UNSET_VARS[1]}",)),
    # -- paths that would leave the repository layout or the destination -------------------------------
    *[Case(f"{key}-{label}", doc(repo(item(**{key: value}))),
           (f"{key!r} must " + ("not be empty" if not value.strip() else f"be one path component, not {value!r}"),))
      for key, label, value in [
          ("name", "dotdot-slash", "../etc"), ("name", "slash", "a/b"), ("name", "dotdot", ".."),
          ("name", "empty", ""), ("name", "blank", " "), ("name", "backslash", "..\\x"),
          ("name", "nul", "zlib\x00"), ("name", "dot", "."), ("platform", "dotdot-slash", "../../etc"),
          ("platform", "absolute", "/etc"), ("version", "dotdot", ".."), ("version", "dotdot-slash", "../1.2")]],
    Case("destination-nul-byte", doc(repo(item(destination="out\x00/evil"))), (f"{_I1}: 'destination'",)),
    # Destinations are the user's own choice: absolute, or relative with '..', they are used as written.
    Case("destination-absolute", doc(repo(item(destination="/opt/tools"))), items=1),
    Case("destination-dotdot", doc(repo(item(destination="../../elsewhere"))), items=1),
    # -- repositories a file must not make us fetch from -------------------------------------------------
    # The parser and ion-deploy in process accept any address (the user may fetch what they can);
    # a deployment by message naming it is refused by the Deploy and Fetch services (403,
    # allowed_networks of ion.services.fetch: tests/hostile/test_fetch.py).
    Case("url-cloud-metadata", doc(repo(url="http://169.254.169.254/latest/meta-data")), items=1),
    # -- several items -------------------------------------------------------------------------------
    Case("two-versions-to-one-destination",
         # Placed in turn, the last in the file wins (tests/services/deploy/test_core.py).
         doc(repo(item(version="1.2"), item(version="1.3"))), items=2),
    Case("every-problem-at-once", json.dumps([
        {"url": "s3://b", "items": [
            {"name": "a", "platform": "p", "destination": "d"},
            {"name": "b", "version": 1.2, "platform": "p", "destination": "d", "unpack": 1},
        ]},
        {"url": "ftp://x", "items": []},
        {"items": "nope"},
    ]), ("item #1 (a): missing 'version'", "item #2 (b): 'version' must be a string, not float 1.2",
         "item #2 (b): 'unpack' must be true or false", "repository #2: unknown URL scheme 'ftp:'",
         "repository #3: missing 'url'", "repository #3: 'items' must be an array")),
    Case("mixed-problems-and-unknown-keys", json.dumps([{"url": "ftp://host/x", "colour": 1, "items": [
        {"name": "a", "version": 1, "platform": "p", "destination": "d", "link": "false", "x": 2}]}]),
         ("unknown URL scheme 'ftp:'", "'version' must be a string", "'link' must be true or false")),
    Case("name-with-newline", doc(repo(item(name="zlib\nError: all good", link="false"))),
         ("'link' must be true or false",)),
    # -- accepted, with warnings ---------------------------------------------------------------------
    Case("unknown-keys", doc(repo(item(colour="red"), extra=1)), warnings=(
        "repository #1: unknown key 'extra' ignored", f"{_I1}: unknown key 'colour' ignored"), items=1),
    Case("unknown-key-that-looks-like-one", doc(repo(item(Link=False))),
         warnings=(f"{_I1}: unknown key 'Link' ignored",), items=1),
    Case("ten-thousand-items", doc(repo(*[item(name=f"n{i}") for i in range(10_000)])), items=10_000),
]
