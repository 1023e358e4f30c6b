"""What the cache stores: entry keys, file metadata, the ``.entry`` file, reports.

An entry is one dependency version as the deployer uses it, at
``<root>/<repo-id>/<platform>/<name>/<version>[~packed]/``. Its ``.entry``
(INI, section ``[entry]`` plus one ``[file <path>]`` per regular file and one
``[link <path>]`` per symbolic link, paths percent-encoded) says what the
entry holds; it is written last, so an entry without one is incomplete.
"""

from __future__ import annotations

import configparser
import datetime
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit

from ion.services.cache.errors import CorruptEntryError, InvalidKeyError

__all__ = [
    "ENTRY_FILE",
    "ENTRY_TMP",
    "PACKED_SUFFIX",
    "LOCK_SUFFIX",
    "ENTRY_FORMAT_VERSION",
    "EntryKey",
    "FileMeta",
    "EntryInfo",
    "EntryReport",
    "PruneReport",
    "repo_id",
    "check_relpath",
]

#: The description file inside every complete entry; never part of the content.
ENTRY_FILE: Final = ".entry"
#: Where ``.entry`` is written before its atomic rename; reserved like it.
ENTRY_TMP: Final = ".entry.tmp"
#: Suffix of the folder of an ``unpack: false`` entry.
PACKED_SUFFIX: Final = "~packed"
#: Suffix of an entry's lock file, a sibling of the entry folder.
LOCK_SUFFIX: Final = ".lock"
#: ``config_version`` written in ``.entry``; readers accept any version whose fields they find.
ENTRY_FORMAT_VERSION: Final = 1

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~+-]*\.(s3|http|https|file)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_COMPONENT = 200


def _check_component(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidKeyError(f"{what} must be a string, not {type(value).__name__} ({value!r})")
    if not value or value in (".", "..") or value.startswith("."):
        raise InvalidKeyError(f"{what} {value!r} cannot name a cache folder (empty or starting with '.')")
    if len(value.encode("utf-8", "surrogateescape")) > _MAX_COMPONENT:
        raise InvalidKeyError(f"{what} {value[:40]!r}... is longer than {_MAX_COMPONENT} bytes")
    if any(c in value for c in "/\\\0\n\r"):
        raise InvalidKeyError(f"{what} {value!r} contains a path separator or a control character")
    return value


@dataclass(frozen=True)
class EntryKey:
    """Names one entry: a dependency version from one repository, unpacked or not.

    ``unpack: true`` and ``unpack: false`` of one version are two entries
    (``<version>/`` and ``<version>~packed/``).

    :raises InvalidKeyError: for a component that cannot name a folder, or a
        version ending in ``~packed`` or ``.lock`` (it would collide with
        another entry's folder or lock file).
    """

    repo_id: str
    platform: str
    name: str
    version: str
    unpack: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.repo_id, str) or not _REPO_ID.match(self.repo_id):
            raise InvalidKeyError(
                f"repository id {self.repo_id!r} is not of the form <id>.s3|http|https|file (see repo_id())")
        _check_component(self.platform, "platform")
        _check_component(self.name, "name")
        _check_component(self.version, "version")
        if self.version.endswith(PACKED_SUFFIX) or self.version.endswith(LOCK_SUFFIX):
            raise InvalidKeyError(
                f"version {self.version!r} cannot end in {PACKED_SUFFIX!r} or {LOCK_SUFFIX!r} "
                "(reserved by the cache layout)")
        if not isinstance(self.unpack, bool):
            raise InvalidKeyError(f"unpack must be a boolean, not {self.unpack!r}")

    @property
    def folder_name(self) -> str:
        """``<version>`` or ``<version>~packed``."""
        return self.version if self.unpack else self.version + PACKED_SUFFIX

    @property
    def relpath(self) -> PurePosixPath:
        """The entry folder relative to the cache root."""
        return PurePosixPath(self.repo_id, self.platform, self.name, self.folder_name)

    @property
    def dependency(self) -> tuple[str, str, str, bool]:
        """What ``prune --keep N`` counts versions of: repository, platform, name, unpack."""
        return (self.repo_id, self.platform, self.name, self.unpack)

    def __str__(self) -> str:
        packed = ", packed" if not self.unpack else ""
        return f"{self.name} {self.version} ({self.platform}, {self.repo_id}{packed})"

    def to_wire(self) -> dict[str, Any]:
        """The key as message content."""
        return {"repo_id": self.repo_id, "platform": self.platform, "name": self.name,
                "version": self.version, "unpack": self.unpack}

    @classmethod
    def from_wire(cls, data: Any) -> EntryKey:
        """Read a key from message content; ``url`` may stand in for ``repo_id``.

        :raises InvalidKeyError: for anything else than a dict with those keys.
        """
        if not isinstance(data, Mapping):
            raise InvalidKeyError(f"an entry key is a dict, not {type(data).__name__}")
        rid = data.get("repo_id")
        if rid is None and data.get("url") is not None:
            rid = repo_id(str(data["url"]))
        missing = [k for k in ("platform", "name", "version") if k not in data]
        if rid is None:
            missing.insert(0, "repo_id (or url)")
        if missing or rid is None:
            raise InvalidKeyError(f"entry key lacks {', '.join(missing)}")
        return cls(rid, data["platform"], data["name"], data["version"], data.get("unpack", True))

    @classmethod
    def from_relpath(cls, parts: tuple[str, str, str, str]) -> EntryKey:
        """The key of the entry folder ``<repo-id>/<platform>/<name>/<folder>``."""
        rid, platform, name, folder = parts
        if folder.endswith(PACKED_SUFFIX):
            return cls(rid, platform, name, folder[: -len(PACKED_SUFFIX)], False)
        return cls(rid, platform, name, folder, True)


def _short_hash(text: str, n: int = 12) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:n]


def repo_id(url: str) -> str:
    """The cache folder name of a repository URL (DESIGN §8).

    ``s3://bucket[/prefix]`` -> ``bucket.s3``; ``http(s)://host[:port][/path]``
    -> ``host.http(s)`` (``host_port`` with a port); ``file:`` -> ``<path-hash>.file``.
    A non-empty prefix or path adds ``~<hash>`` before the suffix, so two
    repositories in one bucket or on one host never share entries. Credentials
    in the URL are left out. A relative ``file:`` path is taken against the
    working folder: resolve it against the deployment file first.

    :raises InvalidKeyError: for another scheme or a URL without bucket or host.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        bucket = parts.hostname or ""
        if not bucket or not re.match(r"^[a-z0-9][a-z0-9.-]*$", bucket):
            raise InvalidKeyError(f"{url!r} names no valid S3 bucket")
        prefix = parts.path.strip("/")
        return f"{bucket}~{_short_hash(prefix)}.s3" if prefix else f"{bucket}.s3"
    if scheme in ("http", "https"):
        host = parts.hostname or ""
        if not host or not re.match(r"^[a-z0-9][a-z0-9.-]*$", host):
            # IPv6 literals and other hosts that make poor folder names are hashed.
            if not host:
                raise InvalidKeyError(f"{url!r} names no host")
            host = "h" + _short_hash(host)
        try:
            port = parts.port
        except ValueError as exc:
            raise InvalidKeyError(f"{url!r} has an invalid port") from exc
        base = f"{host}_{port}" if port else host
        path = parts.path.strip("/")
        return f"{base}~{_short_hash(path)}.{scheme}" if path else f"{base}.{scheme}"
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidKeyError(f"{url!r}: a file: URL names a local path, not host {parts.netloc!r}")
        path = os.path.normpath(os.path.abspath(unquote(parts.path) or "."))
        return f"{_short_hash(path, 16)}.file"
    raise InvalidKeyError(f"unknown repository URL scheme {parts.scheme!r} in {url!r} (s3, http, https, file)")


def check_relpath(rel: Any) -> str:
    """Validate a path inside an entry: relative, ``/``-separated, no ``.``/``..``/empty parts.

    :raises InvalidKeyError: otherwise, or for the reserved top-level ``.entry``.
    """
    if not isinstance(rel, str) or not rel:
        raise InvalidKeyError(f"a file path in an entry must be a non-empty string, not {rel!r}")
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in rel:
        raise InvalidKeyError(f"file path {rel!r} must be relative, without empty, '.' or '..' parts")
    if parts[0] in (ENTRY_FILE, ENTRY_TMP):
        raise InvalidKeyError(f"file path {rel!r}: {parts[0]!r} is reserved for the cache's description file")
    return rel


@dataclass(frozen=True)
class FileMeta:
    """One regular file of an entry: its size, the repository's checksum (S3 ETag,
    HTTP ``Content-MD5``/sidecar; ``None`` when there was none) and its sha256."""

    size: int
    remote_checksum: str | None
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise InvalidKeyError(f"file size must be a non-negative integer, not {self.size!r}")
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            raise InvalidKeyError(f"sha256 must be 64 lower-case hex digits, not {self.sha256!r}")
        if self.remote_checksum is not None and not isinstance(self.remote_checksum, str):
            raise InvalidKeyError(f"remote checksum must be a string or None, not {self.remote_checksum!r}")

    def to_wire(self) -> dict[str, Any]:
        return {"size": self.size, "remote_checksum": self.remote_checksum, "sha256": self.sha256}

    @classmethod
    def from_wire(cls, data: Any) -> FileMeta:
        if not isinstance(data, Mapping):
            raise InvalidKeyError(f"file metadata is a dict of size, remote_checksum, sha256, not {data!r}")
        try:
            return cls(data["size"], data.get("remote_checksum"), data["sha256"])
        except KeyError as exc:
            raise InvalidKeyError(f"file metadata lacks {exc.args[0]!r}") from None


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat()


@dataclass
class EntryInfo:
    """A complete entry, as its ``.entry`` describes it.

    ``last_used`` is the time of the last :meth:`Cache.lookup` that served it
    (the ``.entry`` file's mtime), what ``prune`` goes by.
    """

    key: EntryKey
    path: Path
    files: dict[str, FileMeta]
    links: dict[str, str] = field(default_factory=dict)
    fetched_at: float = 0.0
    last_used: float = 0.0
    url: str | None = None
    config_version: int = ENTRY_FORMAT_VERSION
    #: The newest mtime (ns) of its files when it was published: a file written since (an edit
    #: through a deployed link) is re-hashed by the next lookup. None in older ``.entry`` files.
    content_mtime_ns: int | None = None

    @property
    def size(self) -> int:
        """Total bytes of the entry's files."""
        return sum(m.size for m in self.files.values())

    def content_names(self) -> list[str]:
        """The top-level names a deployer places (links or copies): everything but ``.entry``."""
        names = {rel.split("/", 1)[0] for rel in (*self.files, *self.links)}
        names.discard(ENTRY_FILE)
        return sorted(names)

    def content_digest(self) -> str:
        """What identifies the entry's content: a digest of its files' sha256 and links.

        Stable across runs and hosts (unlike a timestamp read back from ``.entry``),
        so a deployer redoes a copy only when the content changed.
        """
        h = hashlib.sha256()
        for rel in sorted(self.files):
            h.update(f"{rel}\0{self.files[rel].sha256}\0".encode())
        for rel in sorted(self.links):
            h.update(f"{rel}\0->{self.links[rel]}\0".encode())
        return h.hexdigest()[:32]

    def to_wire(self) -> dict[str, Any]:
        return {
            "key": self.key.to_wire(), "path": str(self.path),
            "files": {rel: meta.to_wire() for rel, meta in self.files.items()},
            "links": dict(self.links), "fetched_at": self.fetched_at, "last_used": self.last_used,
            "url": self.url, "config_version": self.config_version, "size": self.size,
            "content_mtime_ns": self.content_mtime_ns,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> EntryInfo:
        return cls(
            key=EntryKey.from_wire(data["key"]), path=Path(data["path"]),
            files={rel: FileMeta.from_wire(m) for rel, m in data.get("files", {}).items()},
            links=dict(data.get("links", {})), fetched_at=float(data.get("fetched_at", 0.0)),
            last_used=float(data.get("last_used", 0.0)), url=data.get("url"),
            config_version=int(data.get("config_version", ENTRY_FORMAT_VERSION)),
            content_mtime_ns=int(data["content_mtime_ns"]) if data.get("content_mtime_ns") is not None else None,
        )

    # -- the .entry file ---------------------------------------------------------------
    def render(self) -> str:
        """The text of this entry's ``.entry`` file.

        The layout is ``configparser``'s (``RawConfigParser.write``, ``" = "`` between
        key and value, a value's newlines continued by a tab), written here directly:
        a publish renders one per entry, and building a ``RawConfigParser`` for it
        cost more than the rest of the rendering (tests compare the two texts).
        """
        entry = {
            "repo_id": self.key.repo_id, "platform": self.key.platform, "name": self.key.name,
            "version": self.key.version, "unpack": "true" if self.key.unpack else "false",
            "fetched_at": _iso(self.fetched_at), "config_version": str(self.config_version),
            "files": str(len(self.files)), "links": str(len(self.links)),
            "url": self.url or "",
        }
        if self.content_mtime_ns is not None:
            entry["content_mtime_ns"] = str(self.content_mtime_ns)
        out = ["# ion cache entry: written last, by atomic rename; an entry without it is incomplete.\n"]
        _ini_section(out, "entry", entry)
        for rel in sorted(self.files):
            meta = self.files[rel]
            _ini_section(out, "file " + _q(rel), {"size": str(meta.size), "sha256": meta.sha256,
                                                  "remote_checksum": meta.remote_checksum or ""})
        for rel in sorted(self.links):
            _ini_section(out, "link " + _q(rel), {"target": _q(self.links[rel])})
        return "".join(out)

    @classmethod
    def parse(cls, text: str, key: EntryKey, path: Path, last_used: float = 0.0) -> EntryInfo:
        """Read a ``.entry`` file's text for the entry ``key`` at ``path``.

        :raises CorruptEntryError: naming the entry and the file, when it does
            not parse or describes another entry.
        """
        where = path / ENTRY_FILE

        def corrupt(reason: str) -> CorruptEntryError:
            return CorruptEntryError(f"entry {key} has an unusable {where}: {reason}")

        sections = _read_ini(text)
        if sections is None:  # not the plain layout render() writes: the full INI parser decides
            cp = configparser.RawConfigParser(interpolation=None, strict=True)
            cp.optionxform = str  # type: ignore[assignment,method-assign]
            try:
                cp.read_string(text, source=str(where))
            except configparser.Error as exc:
                raise corrupt(f"not an INI file ({exc})") from None
            sections = {name: dict(cp[name]) for name in cp.sections()}
        sec = sections.get("entry")
        if sec is None:
            raise corrupt("no [entry] section")
        try:
            found = EntryKey(sec["repo_id"], sec["platform"], sec["name"], sec["version"],
                             {"true": True, "false": False}[sec["unpack"]])
            fetched_at = datetime.datetime.fromisoformat(sec["fetched_at"]).timestamp()
            config_version = int(sec["config_version"])
            files: dict[str, FileMeta] = {}
            links: dict[str, str] = {}
            for name, s in sections.items():
                if name.startswith("file "):
                    rel = check_relpath(_uq(name[5:]))
                    files[rel] = FileMeta(int(s["size"]), s.get("remote_checksum") or None, s["sha256"])
                elif name.startswith("link "):
                    links[check_relpath(_uq(name[5:]))] = _uq(s["target"])
            if int(sec.get("files", len(files))) != len(files) or int(sec.get("links", len(links))) != len(links):
                raise corrupt("the file count does not match the [file] sections (truncated?)")
        except KeyError as exc:
            raise corrupt(f"missing {exc.args[0]!r}") from None
        except (ValueError, InvalidKeyError) as exc:
            raise corrupt(str(exc)) from None
        if found != key:
            raise corrupt(f"it describes {found}")
        try:
            mtime = int(sec["content_mtime_ns"]) if sec.get("content_mtime_ns") else None
        except ValueError:
            raise corrupt(f"content_mtime_ns {sec.get('content_mtime_ns')!r} is not an integer") from None
        return cls(key=key, path=path, files=files, links=links, fetched_at=fetched_at, last_used=last_used,
                   url=sec.get("url") or None, config_version=config_version, content_mtime_ns=mtime)


def _read_ini(text: str) -> dict[str, dict[str, str]] | None:
    """The sections of an INI text in the plain layout :meth:`EntryInfo.render` writes, or None.

    A warm deploy reads one ``.entry`` per item, and ``configparser`` costs most of
    that. This reads the subset ``render`` produces (``[section]`` lines, ``key = value``
    lines, comment and blank lines) exactly as ``RawConfigParser`` would; anything
    else (indented continuation lines, a line without a delimiter, a repeated section
    or key, ``[DEFAULT]``) returns None, so that ``configparser`` parses it, or reports
    what is wrong with it.
    """
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if line[0].isspace():
            return None
        if stripped[0] == "[":
            name = stripped[1:-1]
            if stripped[-1] != "]" or not name or name in sections or name == "DEFAULT":
                return None
            current = sections[name] = {}
            continue
        eq, colon = line.find("="), line.find(":")
        cut = eq if colon < 0 or 0 <= eq < colon else colon
        if cut <= 0 or current is None:
            return None
        key = line[:cut].rstrip()
        if not key or key in current:
            return None
        current[key] = line[cut + 1:].strip()
    return sections


def _ini_section(out: list[str], name: str, items: Mapping[str, str]) -> None:
    """One section as ``RawConfigParser.write`` writes it (``space_around_delimiters``)."""
    out.append(f"[{name}]\n")
    for key, value in items.items():
        out.append(f"{key} = {value.replace(chr(10), chr(10) + chr(9))}\n")
    out.append("\n")


def _q(text: str) -> str:
    return quote(text, safe="/", errors="surrogateescape")


def _uq(text: str) -> str:
    return unquote(text, errors="surrogateescape")


@dataclass
class EntryReport:
    """What ``verify`` (and ``repair``) found for one entry.

    ``status``: ``good``; ``bad`` (``problems`` maps each bad file, or
    ``.entry``, to what is wrong); ``incomplete`` (no ``.entry``); ``changed``
    (republished while it was being checked; check again). ``action`` is set
    by ``repair``: ``kept``, ``quarantined`` (moved to ``moved_to``; the next
    deploy fetches it again), ``removed`` (an incomplete entry), or ``busy``
    (locked by a fetch; left alone). ``url``: the repository the entry came
    from, as its ``.entry`` says (None when it cannot be read): a shared cache
    may hold one version of a dependency from several repositories.
    """

    key: EntryKey
    path: Path
    status: str
    problems: dict[str, str] = field(default_factory=dict)
    action: str | None = None
    moved_to: Path | None = None
    url: str | None = None

    @property
    def good(self) -> bool:
        return self.status == "good"

    def to_wire(self) -> dict[str, Any]:
        return {"key": self.key.to_wire(), "path": str(self.path), "status": self.status,
                "problems": dict(self.problems), "action": self.action,
                "moved_to": str(self.moved_to) if self.moved_to else None, "url": self.url}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> EntryReport:
        moved = data.get("moved_to")
        return cls(EntryKey.from_wire(data["key"]), Path(data["path"]), data["status"],
                   dict(data.get("problems", {})), data.get("action"), Path(moved) if moved else None,
                   data.get("url"))


@dataclass
class PruneReport:
    """What ``prune`` or ``clear`` removed, and what it left because it was locked.

    :ivar removed: complete entries removed.
    :ivar incomplete: folders of incomplete entries removed.
    :ivar busy: entries left because a fetch holds their lock.
    :ivar staging: abandoned staging folders removed.
    :ivar quarantine: quarantined entries removed.
    :ivar locks: stale lock files removed.
    :ivar bytes_freed: total size of the removed complete entries' files.
    """

    removed: list[EntryInfo] = field(default_factory=list)
    incomplete: list[Path] = field(default_factory=list)
    busy: list[EntryKey] = field(default_factory=list)
    staging: list[Path] = field(default_factory=list)
    quarantine: list[Path] = field(default_factory=list)
    locks: list[Path] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(e.size for e in self.removed)

    def to_wire(self) -> dict[str, Any]:
        return {"removed": [e.to_wire() for e in self.removed], "incomplete": [str(p) for p in self.incomplete],
                "busy": [k.to_wire() for k in self.busy], "staging": [str(p) for p in self.staging],
                "quarantine": [str(p) for p in self.quarantine], "locks": [str(p) for p in self.locks],
                "bytes_freed": self.bytes_freed}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> PruneReport:
        return cls(removed=[EntryInfo.from_wire(e) for e in data.get("removed", [])],
                   incomplete=[Path(p) for p in data.get("incomplete", [])],
                   busy=[EntryKey.from_wire(k) for k in data.get("busy", [])],
                   staging=[Path(p) for p in data.get("staging", [])],
                   quarantine=[Path(p) for p in data.get("quarantine", [])],
                   locks=[Path(p) for p in data.get("locks", [])])
