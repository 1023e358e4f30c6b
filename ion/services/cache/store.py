"""The cache store: the blocking file operations on the cache tree (DESIGN §8).

Every function here blocks (filesystem calls, hashing): run each one as one
job of a pool. :class:`~ion.services.cache.core.Cache` runs them for the
deployer and the services; :mod:`~ion.services.cache.verify` and
:mod:`~ion.services.cache.reaper` use them through the same names. Locks are
not taken here (see :mod:`~ion.services.cache.locks`): the caller holds what
an operation needs.

Tree, under ``root``::

    <repo-id>/<platform>/<name>/<version>[~packed]/         one entry (~packed: unpack false)
    <repo-id>/<platform>/<name>/<version>[~packed]/.entry   its description, written last
    <repo-id>/<platform>/<name>/<version>[~packed].lock     its lock file (see locks.py)
    staging/<host>-<pid>-<ms>-<random>/                     one per fetch; renamed into place
    quarantine/<stamp>-<random>/<repo-id>/.../<version>/    bad entries, moved aside

What is here:

- reading: :func:`read_info` (an entry's ``.entry``), :func:`require_info`,
  :func:`read_entry_bytes`, :func:`scan` (every entry folder and lock file,
  as :class:`FoundEntry` rows), :func:`lookup_entry` (what a cache hit checks);
- comparing a folder with its description: :func:`compare_tree` (the one walk,
  no content read), :func:`check_tree` (and hashing), :func:`quick_check`
  (sizes only, no walk), :func:`describe` (problems in one line);
- integrity: :func:`plan_check` and :func:`hash_range` (a re-hash in paced
  pieces: the periodic verifier), :func:`verify_entry` (one entry in one job:
  ``Cache.verify``/``repair``), :func:`quarantine_dest` and
  :func:`quarantine_entry` (a bad entry moved aside);
- writing: :func:`make_staging`, :func:`publish_staged` (by rename),
  :func:`write_entry_file`, :func:`remove_entry`, :func:`cleanup_staging`,
  :func:`clear_quarantine`, :func:`remove_empty_parents`, :func:`fsync_dir`;
- :func:`sha256_file`.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ion.services.cache.entry import (
    ENTRY_FILE,
    ENTRY_TMP,
    LOCK_SUFFIX,
    EntryInfo,
    EntryKey,
    EntryReport,
)
from ion.services.cache.errors import CorruptEntryError, EntryNotFoundError, InvalidKeyError
from ion.services.cache.locks import PROCESS_STARTED, debris_lock_name, litter_present, pid_alive

__all__ = [
    "STAGING",
    "QUARANTINE",
    "sha256_file",
    "fsync_dir",
    "read_info",
    "require_info",
    "read_entry_bytes",
    "walk",
    "TreeCheck",
    "compare_tree",
    "digest_problem",
    "check_tree",
    "quick_check",
    "describe",
    "lookup_entry",
    "write_entry_file",
    "publish_staged",
    "VerifyPlan",
    "plan_check",
    "hash_range",
    "verify_entry",
    "quarantine_dest",
    "quarantine_entry",
    "remove_entry",
    "FoundEntry",
    "scan",
    "cleanup_staging",
    "clear_quarantine",
    "remove_empty_parents",
    "make_staging",
]

#: Folder names at the cache root that are not repositories.
STAGING: Final = "staging"
QUARANTINE: Final = "quarantine"
_STAGING_NAME = re.compile(r"^([0-9a-f]{8})-(\d+)-(\d+)-[0-9a-f]+(-trash)?$")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """The sha256 of a file, read in ``chunk``-byte pieces (blocking: run it in the pool)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        # A buffer no bigger than the file (and a byte, to see its end in one read): 1 MiB made and
        # dropped per small file is most of what hashing it costs.
        buf = bytearray(max(1, min(chunk, os.fstat(f.fileno()).st_size + 1)))
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


# -- blocking helpers (each runs as one pool job) ----------------------------------------------------
def fsync_dir(path: Path) -> None:
    """fsync the folder ``path`` (a rename in it made durable); a filesystem that refuses is ignored."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def read_info(path: Path, key: EntryKey) -> EntryInfo:
    """The entry's ``.entry``; FileNotFoundError when there is none (incomplete)."""
    return _read_entry(path, key)[1]


def _read_entry(path: Path, key: EntryKey) -> tuple[bytes, EntryInfo]:
    """The raw ``.entry`` and what it says, from one read (a republish cannot slip in between)."""
    entry_file = path / ENTRY_FILE
    st = os.lstat(entry_file)
    if not stat.S_ISREG(st.st_mode):
        raise CorruptEntryError(f"entry {key} has a {entry_file} that is not a regular file")
    try:
        raw = entry_file.read_bytes()
    except OSError as exc:
        raise CorruptEntryError(f"entry {key}: cannot read {entry_file}: {exc.strerror}") from exc
    return raw, EntryInfo.parse(raw.decode("utf-8", errors="surrogateescape"), key, path, last_used=st.st_mtime)


def _rel(top: Path, full: str) -> str:
    return os.path.relpath(full, top).replace(os.sep, "/")


def walk(top: Path) -> list[tuple[str, os.stat_result]]:
    """Every name under ``top`` but folders, relative, with its lstat; symlinks are not followed."""
    out: list[tuple[str, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if not stat.S_ISDIR(st.st_mode):
                out.append((_rel(top, full), st))
    return out


def _link_inside(rel: str, target: str) -> bool:
    if os.path.isabs(target):
        return False
    resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    return not (resolved == ".." or resolved.startswith("../"))


@dataclass
class TreeCheck:
    """What comparing a folder with its description found without reading content.

    :ivar problems: relative path -> what is wrong.
    :ivar to_hash: the regular files whose size is right, ``(relative path, size,
        expected sha256)``: what a re-hash still has to read.
    """

    problems: dict[str, str] = field(default_factory=dict)
    to_hash: list[tuple[str, int, str]] = field(default_factory=list)


def compare_tree(top: Path, info: EntryInfo, *, staged: bool,
                 listing: list[tuple[str, os.stat_result]] | None = None) -> TreeCheck:
    """Compare the tree at ``top`` with ``info`` (names, kinds, sizes, link targets; no content read).

    ``staged``: a folder about to be published: its symlinks are collected into
    ``info.links`` instead of compared, and ``.entry`` is a reserved name.
    ``listing``: :func:`walk` of ``top``, if the caller has it already.
    """
    check = TreeCheck()
    problems = check.problems
    seen: set[str] = set()
    for rel, st in walk(top) if listing is None else listing:
        if rel in (ENTRY_FILE, ENTRY_TMP):
            if staged:
                problems[rel] = "the name is reserved for the cache's description file"
            continue
        full = top / rel
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(full)
            if staged:
                if not _link_inside(rel, target):
                    problems[rel] = f"symlink to {target!r} points out of the entry"
                info.links[rel] = target
            elif rel not in info.links:
                problems[rel] = f"unexpected symlink (to {target!r})"
            elif info.links[rel] != target:
                problems[rel] = f"symlink changed: points to {target!r}, not {info.links[rel]!r}"
            seen.add(rel)
        elif stat.S_ISREG(st.st_mode):
            seen.add(rel)
            meta = info.files.get(rel)
            if meta is None:
                problems[rel] = "unexpected file (not in the file list)" if staged else "unexpected file"
            elif st.st_size != meta.size:
                problems[rel] = f"size {st.st_size}, expected {meta.size}"
            else:
                check.to_hash.append((rel, meta.size, meta.sha256))
        else:
            problems[rel] = "not a regular file, folder or symlink"
    for rel in info.files.keys() - seen:
        problems[rel] = "described but not staged" if staged else "missing"
    if not staged:
        for rel in info.links.keys() - seen:
            problems[rel] = "symlink missing"
    return check


def digest_problem(digest: str, expected: str) -> str | None:
    """What is wrong with a file that hashed to ``digest`` (None: nothing)."""
    return None if digest == expected else f"sha256 {digest}, expected {expected}"


def check_tree(top: Path, info: EntryInfo, *, hash_chunk: int | None, staged: bool) -> dict[str, str]:
    """Compare the tree at ``top`` with ``info`` (:func:`compare_tree`): what is wrong, per relative path.

    ``hash_chunk``: also re-hash every file of the right size (read in pieces
    of that many bytes); None: sizes only.
    """
    check = compare_tree(top, info, staged=staged)
    if hash_chunk is not None:
        for rel, _size, expected in check.to_hash:
            problem = digest_problem(sha256_file(top / rel, hash_chunk), expected)
            if problem:
                check.problems[rel] = problem
    return check.problems


def quick_check(path: Path, info: EntryInfo, hash_chunk: int = 1 << 20) -> dict[str, str]:
    """What lookup affords: sizes and link targets, no walk; a file written since the entry was
    published (newer than ``content_mtime_ns``: e.g. edited through a deployed link) is re-hashed."""
    problems: dict[str, str] = {}
    newest = info.content_mtime_ns
    for rel, meta in info.files.items():
        try:
            st = os.lstat(path / rel)
        except FileNotFoundError:
            problems[rel] = "missing"
            continue
        if not stat.S_ISREG(st.st_mode):
            problems[rel] = "not a regular file"
        elif st.st_size != meta.size:
            problems[rel] = f"size {st.st_size}, expected {meta.size}"
        elif newest is not None and st.st_mtime_ns > newest:
            digest = sha256_file(path / rel, hash_chunk)
            if digest != meta.sha256:
                problems[rel] = f"changed since it was published: sha256 {digest}, expected {meta.sha256}"
    for rel, target in info.links.items():
        try:
            if os.readlink(path / rel) != target:
                problems[rel] = "symlink changed"
        except OSError:
            problems[rel] = "symlink missing"
    return problems


def describe(problems: Mapping[str, str], limit: int = 5) -> str:
    """Problems in one line, sorted, at most ``limit`` of them (and how many more)."""
    items = [f"{rel}: {why}" for rel, why in sorted(problems.items())]
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def lookup_entry(path: Path, key: EntryKey, now: float, hash_chunk: int | None,
                 lock_path: Path | None = None) -> tuple[EntryInfo | None, str | None, bool]:
    """The entry if complete and whole (else None and, if damaged, why), and, for a complete
    one, whether its lock file (or a temporary file of one) is there (``lock_path`` given)."""
    try:
        info = read_info(path, key)
    except FileNotFoundError:
        return None, None, False
    except CorruptEntryError as exc:
        return None, str(exc), False
    problems = (check_tree(path, info, hash_chunk=hash_chunk, staged=False) if hash_chunk
                else quick_check(path, info))
    if problems:
        return None, f"entry {key} at {path} is damaged: {describe(problems)}", False
    try:
        os.utime(path / ENTRY_FILE, (now, now), follow_symlinks=False)
        info.last_used = now
    except OSError:
        pass  # a read-only cache still serves
    return info, None, lock_path is not None and litter_present(lock_path)


def require_info(path: Path, key: EntryKey) -> EntryInfo:
    """The complete entry at ``path``; :class:`EntryNotFoundError` (saying which) if it has no ``.entry``."""
    try:
        return read_info(path, key)
    except FileNotFoundError:
        if path.is_dir():
            raise EntryNotFoundError(f"entry {key} at {path} is incomplete (no {ENTRY_FILE}); "
                                     "the next deploy fetches it again") from None
        raise EntryNotFoundError(f"no entry {key} in the cache (looked for {path})") from None


def write_entry_file(path: Path, info: EntryInfo, now: float) -> None:
    """Write ``.entry`` atomically: temporary file, fsync, rename, fsync of the folder."""
    tmp = path / ENTRY_TMP
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        os.write(fd, info.render().encode("utf-8", "surrogateescape"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path / ENTRY_FILE)
    os.utime(path / ENTRY_FILE, (now, now))
    fsync_dir(path)


def publish_staged(staging: Path, path: Path, info: EntryInfo, trash: Path, now: float, fsync_content: bool) -> EntryInfo:
    try:
        st = os.lstat(staging)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise CorruptEntryError(f"cannot publish {info.key}: staging folder {staging} does not exist")
    info.links.clear()
    listing = walk(staging)
    problems = compare_tree(staging, info, staged=True, listing=listing).problems
    if problems:
        raise CorruptEntryError(f"cannot publish {info.key} from {staging}: {describe(problems)}")
    # (Renames keep mtimes: a file of the entry written after this is newer.)
    mtimes = {rel: st.st_mtime_ns for rel, st in listing}
    info.content_mtime_ns = max((mtimes[rel] for rel in info.files), default=None)
    if fsync_content:
        for rel in info.files:
            with open(staging / rel, "rb") as f:
                os.fsync(f.fileno())
    old: Path | None = None
    try:
        # Nothing there yet (the lock file's folder exists: the caller holds the lock): one rename.
        # (An empty folder there is replaced by it, as it would be by the steps below.)
        os.rename(staging, path)
    except OSError:
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(path):
            # An older, incomplete or quarantine-bound folder: out of the way in one rename.
            try:
                (path / ENTRY_FILE).unlink()
            except (FileNotFoundError, NotADirectoryError):
                pass
            os.rename(path, trash)
            old = trash
        os.rename(staging, path)
    fsync_dir(path.parent)
    write_entry_file(path, info, now)
    info.last_used = now
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return info


@dataclass
class VerifyPlan:
    """One entry's re-hash, planned from its ``.entry`` and a walk of its folder (no content read).

    :ivar entry_bytes: the ``.entry`` it was planned against (compare it after hashing:
        a republish in between changes it).
    :ivar problems: what the walk already found wrong.
    :ivar to_hash: ``(relative path, size, expected sha256)`` of the files to read, sorted.
    :ivar url: the repository the entry was fetched from (its ``.entry``), when it says.
    """

    entry_bytes: bytes
    problems: dict[str, str]
    to_hash: list[tuple[str, int, str]]
    url: str | None = None


def plan_check(path: Path, key: EntryKey) -> VerifyPlan | None:
    """The entry's ``.entry`` and the files to hash; size, link and name problems found without
    reading content. None when the entry has no ``.entry`` (any more): incomplete, not verifiable."""
    try:
        entry_bytes, info = _read_entry(path, key)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except CorruptEntryError as exc:
        return VerifyPlan(read_entry_bytes(path) or b"", {ENTRY_FILE: str(exc)}, [])
    check = compare_tree(path, info, staged=False)
    check.to_hash.sort()
    return VerifyPlan(entry_bytes, check.problems, check.to_hash, info.url)


def hash_range(path: Path, hasher: Any, offset: int, n: int) -> int:
    """Read ``n`` bytes of ``path`` at ``offset`` into ``hasher``; the bytes read (fewer at end of file).

    Opens and closes the file: no descriptor outlives the call (a paced re-hash
    is one call per piece).
    """
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        data = f.read(n)
    hasher.update(data)
    return len(data)


def read_entry_bytes(path: Path) -> bytes | None:
    """The raw ``.entry`` of the entry folder ``path``; None if there is none."""
    try:
        return (path / ENTRY_FILE).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def verify_entry(path: Path, key: EntryKey, hash_chunk: int) -> EntryReport:
    """Re-hash one entry against its ``.entry`` (:func:`plan_check`, then every file):
    ``good``, ``bad`` (with its problems), ``incomplete``, ``missing``, or ``changed``
    (its ``.entry`` was replaced while it was hashed)."""
    if not path.is_dir():
        return EntryReport(key, path, "missing")
    plan = plan_check(path, key)
    if plan is None:
        return EntryReport(key, path, "incomplete")
    problems = plan.problems
    for rel, _size, expected in plan.to_hash:
        problem = digest_problem(sha256_file(path / rel, hash_chunk), expected)
        if problem:
            problems[rel] = problem
    if (read_entry_bytes(path) or b"") != plan.entry_bytes:
        return EntryReport(key, path, "changed")
    return EntryReport(key, path, "bad" if problems else "good", problems, url=plan.url)


def quarantine_dest(quarantine_root: Path, key: EntryKey, now: float) -> Path:
    """A new place under ``quarantine_root`` for the entry ``key``: ``<stamp>-<random>/<key's path>``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return quarantine_root.joinpath(f"{stamp}-{secrets.token_hex(4)}", *key.relpath.parts)


def quarantine_entry(path: Path, dest: Path) -> None:
    """Move a bad entry to ``dest`` (:func:`quarantine_dest`), its ``.entry`` removed first:
    incomplete from then on, so a lookup misses it and the next deploy fetches it again."""
    (path / ENTRY_FILE).unlink(missing_ok=True)  # incomplete from here on, whatever follows
    fsync_dir(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, dest)


def remove_entry(path: Path, trash: Path) -> None:
    """Remove an entry folder: ``.entry`` first, then the folder renamed to ``trash`` and deleted,
    so a reader never sees a half-removed entry as complete."""
    try:
        (path / ENTRY_FILE).unlink(missing_ok=True)
    except NotADirectoryError:
        pass
    trash.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _dirs(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


@dataclass
class FoundEntry:
    """An entry folder :func:`scan` found: complete (``info`` set) or not (``problem`` says why)."""

    key: EntryKey
    path: Path
    info: EntryInfo | None
    problem: str | None  # None: complete; "incomplete"; or why .entry is unusable


def scan(root: Path) -> tuple[list[FoundEntry], list[Path]]:
    """Every entry folder (complete or not) and every lock file under ``root`` (and the lock
    path of every temporary file of a lock, which a dead process may have left without one)."""
    found: list[FoundEntry] = []
    locks: list[Path] = []
    seen: set[Path] = set()
    for repo in _dirs(str(root)):
        if repo.name in (STAGING, QUARANTINE):
            continue
        for platform in _dirs(repo.path):
            for name in _dirs(platform.path):
                with os.scandir(name.path) as it:
                    children = list(it)
                for child in children:
                    if child.is_file(follow_symlinks=False):
                        lock_name = child.name if child.name.endswith(LOCK_SUFFIX) else debris_lock_name(child.name)
                        lock_path = Path(name.path) / lock_name if lock_name else None
                        if lock_path is not None and lock_path not in seen:
                            seen.add(lock_path)
                            locks.append(lock_path)
                    if not child.is_dir(follow_symlinks=False):
                        continue
                    try:
                        key = EntryKey.from_relpath((repo.name, platform.name, name.name, child.name))
                    except InvalidKeyError:
                        continue
                    path = Path(child.path)
                    try:
                        found.append(FoundEntry(key, path, read_info(path, key), None))
                    except FileNotFoundError:
                        found.append(FoundEntry(key, path, None, "incomplete"))
                    except CorruptEntryError as exc:
                        found.append(FoundEntry(key, path, None, str(exc)))
    found.sort(key=lambda f: (f.key.repo_id, f.key.platform, f.key.name, f.key.version, f.key.unpack))
    return found, locks


def _newest_mtime(path: Path) -> float:
    newest = os.lstat(path).st_mtime
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def cleanup_staging(staging_root: Path, now: float, max_age: float, host_tag: str, live: frozenset[str]) -> list[Path]:
    """Remove abandoned staging folders under ``staging_root`` (see ``Cache.cleanup_staging``); the removed ones."""
    removed: list[Path] = []
    try:
        with os.scandir(staging_root) as it:
            children = list(it)
    except FileNotFoundError:
        return removed
    for child in children:
        if child.name in live:
            continue
        path = Path(child.path)
        m = _STAGING_NAME.match(child.name)
        if m and m.group(1) == host_tag:
            pid, created = int(m.group(2)), int(m.group(3)) / 1000
            if pid == os.getpid():
                if created >= PROCESS_STARTED:
                    continue  # this process's (another Cache instance of it)
            elif pid_alive(pid):
                continue  # a live local fetch, however long it takes
        else:
            try:
                if now - _newest_mtime(path) <= max_age:
                    continue  # another host's, or unknown: only by age
            except FileNotFoundError:
                continue
        if child.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def clear_quarantine(quarantine_root: Path) -> list[Path]:
    """Remove everything under ``quarantine/``; what was removed."""
    removed = []
    for child in _dirs(str(quarantine_root)):
        shutil.rmtree(child.path, ignore_errors=True)
        removed.append(Path(child.path))
    return removed


def remove_empty_parents(root: Path, paths: list[Path]) -> None:
    """Remove the folders above ``paths`` that became empty, up to ``root`` (never a non-empty one)."""
    for path in paths:
        parent = path.parent
        while parent != root and root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (a lock file or another version): a live publisher's folder stays
            parent = parent.parent


def make_staging(staging_root: Path, path: Path) -> Path:
    """Create the staging folder ``path`` (and ``staging/``, the first time); ``path``."""
    try:
        path.mkdir()
    except FileNotFoundError:
        staging_root.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    return path


