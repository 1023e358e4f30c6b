# -*- test-case-name: tests.services.records.test_deployer -*-
"""The deployer's records and their one validation (DESIGN §4 typed content, §8).

Below both the Deploy and the Fetch service (it imports neither), so each
takes its records from here:

- :class:`RepositoryURL` (:func:`parse_repository_url`): the repository coordinate;
- :class:`DeploymentItem`: one dependency to deploy (what a deployment file's item becomes);
- :class:`FetchRequest`: what the Fetch service is asked (built from an item, or read
  from message content by :meth:`FetchRequest.from_wire`);
- :class:`FetchResult`: what a fetch did.

The checks of an item's keys (:func:`check_fields`: ``name``, ``version`` and
``platform`` one path component each, the flags booleans, ``sha256`` 64 hex
digits or ``{file: digest}``) are these, for a deployment file and a request alike.
Their protobuf form is ``deployer.proto`` (package ``ion.deployer``); the
converters are :mod:`ion.services.records.convert`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote, unquote, urlsplit

from ion.core.exceptions import IonError
from ion.services.cache.entry import EntryInfo, EntryKey

__all__ = [
    "RecordError",
    "RepositoryURL",
    "DeploymentItem",
    "FetchRequest",
    "FetchResult",
    "parse_repository_url",
    "check_fields",
    "check_component",
    "check_sha256",
    "describe_value",
    "ITEM_KEYS",
    "REQUIRED_KEYS",
    "FLAGS",
]

#: Keys an item may have; others draw a warning.
ITEM_KEYS = ("name", "version", "platform", "destination", "link", "unpack", "keep_updated", "sha256")
#: Keys an item must have.
REQUIRED_KEYS = ("name", "version", "platform", "destination")
#: The boolean keys and their defaults.
FLAGS = {"link": True, "unpack": True, "keep_updated": False}
_COMPONENTS = ("name", "version", "platform")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_SCHEMES = ("s3", "file", "http", "https")


class RecordError(IonError):
    """A record cannot be read; ``problems`` lists every reason found."""

    def __init__(self, problems: list[str], url: str | None = None) -> None:
        self.problems = problems
        self.url = url
        super().__init__("; ".join(problems))


# -- the repository coordinate ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RepositoryURL:
    """A parsed repository URL.

    :ivar scheme: ``s3``, ``file``, ``http`` or ``https``.
    :ivar location: the bucket (s3), host[:port] (http) or absolute folder (file).
    :ivar prefix: the key prefix / URL path under the location, without slashes at the ends.
    """

    url: str
    scheme: str
    location: str
    prefix: str = ""

    def __str__(self) -> str:
        return self.url

    @property
    def location_path(self) -> Path:
        """The folder of a ``file`` repository."""
        return Path(self.location)

    @property
    def wire_url(self) -> str:
        """The URL as sent in a message: a ``file:`` URL made absolute (``file:///abs``)."""
        if self.scheme == "file":
            return "file://" + quote(self.location)
        return self.url

    def child(self, *parts: str) -> str:
        """The URL (or path, for ``file``) of a folder under the repository."""
        tail = "/".join(p.strip("/") for p in (self.prefix, *parts) if p)
        if self.scheme == "file":
            return str(Path(self.location, *[p for p in (self.prefix, *parts) if p]))
        if self.scheme == "s3":
            return f"s3://{self.location}/{tail}"
        return f"{self.scheme}://{self.location}/{tail}"


def parse_repository_url(url: str, base_dir: Path | None = None) -> RepositoryURL:
    """Parse a repository URL; ``file:relative`` is resolved against ``base_dir``.

    :raises ValueError: with the reason, for an unknown scheme or a URL missing its bucket/host/path.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("'url' must be a non-empty string")
    if "\x00" in url:
        raise ValueError(f"'url' must not contain a NUL byte: {url!r}")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"unknown URL scheme {parts.scheme + ':' if parts.scheme else url!r}; "
                         f"use s3://bucket[/prefix], file:path or http(s)://host/path")
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{url!r} names no bucket (s3://bucket[/prefix])")
        return RepositoryURL(url, "s3", parts.netloc, parts.path.strip("/"))
    if scheme in ("http", "https"):
        if not parts.netloc:
            raise ValueError(f"{url!r} names no host")
        return RepositoryURL(url, scheme, parts.netloc, parts.path.strip("/"))
    # file:///abs, file:/abs, file:relative, file://localhost/abs
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{url!r}: file URLs name a local path (file:///abs/path or file:relative/path)")
    raw = unquote(parts.path)
    if not raw:
        raise ValueError(f"{url!r} names no folder")
    path = Path(raw)
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return RepositoryURL(url, "file", str(Path(os.path.normpath(path))), "")


# -- the checks of an item's keys ---------------------------------------------------------------------------
def _at(where: str, text: str) -> str:
    return f"{where}: {text}" if where else text


def describe_value(value: Any) -> str:
    """A value as a message shows it: ``the string "x"``, ``null``, ``int 3``, ``dict ...``."""
    if isinstance(value, str):
        return f"the string {json.dumps(value)}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    kind = "dict" if isinstance(value, dict) else type(value).__name__
    return f"{kind} {json.dumps(value) if isinstance(value, (int, float)) else '...'}"


def check_component(key: str, value: Any, where: str, problems: list[str]) -> str | None:
    """``value`` if it is one non-empty path component; else None, the reason added to ``problems``."""
    if not isinstance(value, str):
        problems.append(_at(where, f"{key!r} must be a string, not {describe_value(value)}"))
        return None
    if not value.strip():
        problems.append(_at(where, f"{key!r} must not be empty"))
        return None
    if "/" in value or "\\" in value or value in (".", "..") or "\x00" in value:
        problems.append(_at(where, f"{key!r} must be one path component, not {value!r}"))
        return None
    return value


def check_sha256(value: Any, where: str, problems: list[str]) -> str | dict[str, str] | None:
    """``value`` as an expected sha256 (64 hex digits, or ``{file inside the version: digest}``),
    lower-cased; None when absent or wrong (the reason added to ``problems``)."""
    if value is None:
        return None
    if isinstance(value, str):
        if not _HEX64.match(value):
            problems.append(_at(where, f"'sha256' must be 64 hex digits, not {value!r}"))
            return None
        return value.lower()
    if isinstance(value, Mapping) and value:
        out: dict[str, str] = {}
        for fname, digest in value.items():
            if not isinstance(digest, str) or not _HEX64.match(digest):
                problems.append(_at(where, f"'sha256' of {fname!r} must be 64 hex digits"))
                continue
            if not isinstance(fname, str) or fname.startswith("/") or ".." in Path(fname).parts or "\x00" in fname:
                problems.append(_at(where, f"'sha256' names {fname!r}, which is not a path inside the version folder"))
                continue
            out[fname] = digest.lower()
        return out
    problems.append(_at(where, f"'sha256' must be a hex digest or an object {{file: digest}}, "
                               f"not {describe_value(value)}"))
    return None


def check_fields(item: Mapping[str, Any], where: str, problems: list[str],
                 flags: tuple[str, ...] = tuple(FLAGS), sha256: bool = True) -> dict[str, Any]:
    """The checked values of an item's ``name``, ``version``, ``platform`` (those present),
    ``flags`` (their defaults when absent) and, with ``sha256``, its ``sha256``; each problem
    added to ``problems`` (a wrong value is None in the answer)."""
    out: dict[str, Any] = {}
    for key in _COMPONENTS:
        if key in item:
            out[key] = check_component(key, item[key], where, problems)
    for key in flags:
        value = item.get(key, FLAGS[key])
        if not isinstance(value, bool):
            problems.append(_at(where, f"{key!r} must be true or false (a JSON boolean), "
                                       f"not {describe_value(value)}"))
        out[key] = value if isinstance(value, bool) else FLAGS[key]
    if sha256:
        out["sha256"] = check_sha256(item.get("sha256"), where, problems)
    return out


# -- the item ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeploymentItem:
    """One dependency to deploy."""

    repository: RepositoryURL
    name: str
    version: str
    platform: str
    destination: Path
    link: bool = True
    unpack: bool = True
    keep_updated: bool = False
    #: Expected sha256: one hex digest (the single file) or {relative file: hex}.
    sha256: str | dict[str, str] | None = None
    #: Where it stands in the file, for messages: "repository #1, item #2".
    position: str = ""

    @property
    def label(self) -> str:
        """``platform/name/version``, as the repository lays it out."""
        return f"{self.platform}/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """The wire form (content of a Deploy request): paths absolute, variables expanded."""
        return {
            "url": self.repository.wire_url, "name": self.name, "version": self.version,
            "platform": self.platform, "destination": str(self.destination), "link": self.link,
            "unpack": self.unpack, "keep_updated": self.keep_updated, "sha256": self.sha256,
            "position": self.position,
        }


# -- the fetch request ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FetchRequest:
    """One dependency version to have in the cache.

    :ivar sha256: expected sha256: one hex digest (the version holds one file) or ``{file: hex}``.
    :ivar label: where it comes from, for messages (``deployment.json: repository #1, item #2``).
    """

    repository: RepositoryURL
    platform: str
    name: str
    version: str
    unpack: bool = True
    keep_updated: bool = False
    sha256: str | dict[str, str] | None = None
    label: str = ""

    @classmethod
    def from_item(cls, item: DeploymentItem) -> Self:
        """The request of a deployment item (its destination and link do not matter here)."""
        return cls(item.repository, item.platform, item.name, item.version, item.unpack, item.keep_updated,
                   item.sha256, item.position)

    @classmethod
    def from_wire(cls, data: Any, *, base_dir: Path | None = None) -> Self:
        """Read a request from message content (:meth:`DeploymentItem.to_dict` or :meth:`to_wire`),
        checked as a deployment file's item is (:func:`check_fields`).

        A relative ``file:`` URL is resolved against ``base_dir`` (or ``data["base_dir"]``).

        :raises RecordError: naming each key that is missing or wrong.
        """
        if not isinstance(data, Mapping):
            raise RecordError([f"a fetch request is a dict (an item), not {type(data).__name__}"])
        missing = [k for k in ("url", "platform", "name", "version") if k not in data]
        if missing:
            raise RecordError([f"the fetch request lacks {', '.join(repr(k) for k in missing)}"])
        problems: list[str] = []
        values = check_fields(data, "", problems, flags=("unpack", "keep_updated"))
        if problems:
            raise RecordError(problems)
        base = data.get("base_dir") or base_dir
        try:
            url = parse_repository_url(data["url"], Path(base) if base else None)
        except ValueError as exc:
            raise RecordError([str(exc)], url=str(data["url"])) from None
        label = data.get("position") or data.get("label") or ""
        return cls(url, values["platform"], values["name"], values["version"], values["unpack"],
                   values["keep_updated"], values["sha256"], str(label))

    def to_wire(self) -> dict[str, Any]:
        """The request as message content (a ``file:`` URL made absolute)."""
        return {"url": self.repository.wire_url, "platform": self.platform, "name": self.name,
                "version": self.version, "unpack": self.unpack, "keep_updated": self.keep_updated,
                "sha256": self.sha256, "position": self.label}

    @property
    def repo_url(self) -> str:
        """The repository URL the cache names entries by (``file:`` made absolute)."""
        return self.repository.wire_url

    def describe(self) -> str:
        """``zlib 1.2 (linux) from s3://bucket/prefix``, with the label when there is one."""
        where = f"{self.label}: " if self.label else ""
        return f"{where}{self.name} {self.version} ({self.platform}) from {self.repository.url}"


# -- the fetch result ----------------------------------------------------------------------------------------
@dataclass
class FetchResult:
    """What a fetch did: ``state`` (cached, downloaded, updated) and the entry's info."""

    state: str
    key: EntryKey
    info: EntryInfo
    warnings: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        """The entry folder."""
        return self.info.path

    @property
    def files(self) -> list[str]:
        """The entry's regular files, relative, sorted."""
        return sorted(self.info.files)

    def to_wire(self) -> dict[str, Any]:
        return {"state": self.state, "path": str(self.info.path), "files": self.files,
                "links": dict(self.info.links), "content": self.info.content_names(), "key": self.key.to_wire(),
                "size": self.info.size, "url": self.info.url, "fetched_at": self.info.fetched_at,
                "stamp": self.info.content_digest(),
                "warnings": list(self.warnings)}
