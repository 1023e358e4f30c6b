"""Putting a cached dependency in place at its destination (DESIGN §8, Deploy; §10).

Blocking filesystem code, run in the container's :class:`~ion.core.threads.BlockingPool`.

Each top-level name of the entry becomes either a symlink into the cache
(``link: true``) or a copy, written beside the target and renamed over it, so
the destination never holds a half-written dependency. What an item placed is
recorded in a manifest, ``<destination>/.ion-deploy/<platform>.<name>.json``,
written last; the next deployment of that item removes the names the new
version lacks, and nothing else at the destination is ever touched. A name
that exists there but that no item of ours placed is refused, never
overwritten — except a symlink, which holds no data (Umpire's old links, a
dangling link) and is replaced.

**Nothing is redirected.** A destination is checked (under an allowed root,
after ``realpath``) when the request arrives, and written after a fetch that
may take minutes. So every write goes through descriptors
(:class:`~ion.core.safefs.SafeDir`): the walk starts at the *root* the
destination was checked under (the Deploy service's allowed root; ``/`` for
``ion-deploy`` in process, the destination being resolved once at the start)
and follows no symlink below it, so a folder swapped for a link meanwhile is
refused (:class:`PlacementError`: "... is a symbolic link and was refused"),
never followed. The same holds for ``.ion-deploy`` and the names in it. A
destination in the cache root, or in the entry itself, is refused: published
cache entries are never written by a deployment. An entry whose top-level
names include ``.ion-deploy`` or the placer's temporary names
(``.<name>.ion-new-*``, ``.<name>.ion-old-*``) is refused too, so the record
of a destination can never be a link into the cache nor part of a dependency.

**One placement of a destination at a time**, across threads and processes:
the read-manifest → place → write-manifest section holds an ``flock`` on
``.ion-deploy/.lock`` (a permanent, empty file that manifest readers skip), so
two ``ion-deploy`` runs copying into one destination never take each other's
fresh copy for a foreign file.

Before it links a destination into the cache, placement records the
destination beside the entry (:func:`ion.services.cache.reaper.record_link`),
so that the cache's reaper never evicts an entry a live destination uses.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from ion.core.exceptions import IonError
from ion.core.safefs import SafeDir, SymlinkRefused
from ion.services.cache.reaper import record_link

__all__ = ["PlacementError", "Placement", "Target", "place", "placed_already", "manifest_path", "is_name",
           "is_reserved", "MANIFEST_DIR", "LOCK_FILE"]

MANIFEST_DIR = ".ion-deploy"
#: In :data:`MANIFEST_DIR`: the file whose ``flock`` serialises placements of one destination.
LOCK_FILE = ".lock"

_log = Logger()


class PlacementError(IonError):
    """A dependency could not be placed at its destination; says which path and why."""


@dataclass
class Placement:
    """What placing one item did."""

    destination: Path
    names: list[str]
    already: bool
    removed: list[str] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {"destination": str(self.destination), "names": self.names, "already": self.already,
                "removed": self.removed}


@dataclass(frozen=True)
class Target:
    """Where an item goes: ``path``, resolved when it was checked, walked from ``root`` following no link.

    ``root`` is trusted (an allowed root's realpath, or ``/``); every component of
    ``path`` below it must still be a real folder when it is written.
    """

    root: Path
    path: Path

    @classmethod
    def resolve(cls, destination: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Target:
        """``destination``'s realpath now, below ``root``'s realpath (default ``/``)."""
        real_root = Path(os.path.realpath(root)) if root is not None else Path("/")
        return cls(real_root, Path(os.path.realpath(destination)))


def manifest_path(destination: Path, platform: str, name: str) -> Path:
    """Where the record of what an item placed at ``destination`` lives."""
    return destination / MANIFEST_DIR / _manifest_name(platform, name)


def _manifest_name(platform: str, name: str) -> str:
    return f"{platform}.{name}.json"


def is_name(name: object) -> bool:
    """True for a single path component: what a top-level name at a destination may be."""
    return (isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name
            and name not in (".", "..") and "\x00" not in name)


def is_reserved(name: str) -> bool:
    """True for a name the placer keeps for itself at a destination: its records' folder, its temp names."""
    return name == MANIFEST_DIR or (name.startswith(".") and (".ion-new-" in name or ".ion-old-" in name))


def _check_names(entry: Path, names: list[str]) -> None:
    bad = [n for n in names if not is_name(n)]
    if bad:
        raise PlacementError(f"entry {entry} names {bad[0]!r}, which is not a top-level name; refusing it")
    reserved = [n for n in names if is_reserved(n)]
    if reserved:
        raise PlacementError(f"entry {entry} has the top-level name {reserved[0]!r}, which the deployer keeps "
                             f"for its own record ({MANIFEST_DIR}) or temporary files at a destination; "
                             f"refusing to place it")


def _refused(exc: SymlinkRefused) -> str:
    return f"{exc}: a destination is written only through real folders, never through a link"


def _target(destination: Path, root: Path | None) -> tuple[Path, Path]:
    """(walk from, path): without a root, the destination's realpath now, walked from ``/``."""
    if root is None:
        return Path("/"), Path(os.path.realpath(destination))
    return Path(root), Path(destination)


def _refuse_cache(real: Path, destination: Path, entry: Path, cache_root: Path | None) -> None:
    """A destination that is or lies in the cache root (or the entry) is refused."""
    for top, what in ((cache_root, "the cache root"), (entry, "the cache entry")):
        if top is None:
            continue
        real_top = Path(os.path.realpath(top))
        if real == real_top or real_top in real.parents:
            raise PlacementError(f"destination {destination} (resolved: {real}) lies in {what} {real_top}; "
                                 f"published cache entries are never written by a deployment: refusing it")


def _open_destination(top: Path, path: Path, destination: Path) -> SafeDir:
    """The destination folder, made if missing, walked from ``top`` without following links."""
    try:
        return SafeDir.open_below(top, path, create=True)
    except SymlinkRefused as exc:
        raise PlacementError(_refused(exc)) from exc
    except ValueError as exc:
        raise PlacementError(f"destination {destination} ({path}) is not below {top}, the root it was "
                             f"checked under; refusing it") from exc
    except OSError as exc:
        raise PlacementError(f"cannot create destination {destination}: {exc.strerror or exc}") from exc


def _read_manifest(records: SafeDir, manifest: str) -> dict[str, Any] | None:
    try:
        raw = records.read_bytes(manifest)
        if raw is None:
            return None
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return None  # unreadable (or a link): treated as no previous deployment
    if not isinstance(data, dict) or not isinstance(data.get("names"), list):
        return None
    # A manifest is a file in the destination, which others may write: never let
    # it name anything but a top-level name of the destination itself.
    data["names"] = [n for n in data["names"] if is_name(n) and not is_reserved(n)]
    return data


def _owners(records: SafeDir, skip: str) -> dict[str, str]:
    """Top-level names other items' manifests claim at this destination."""
    owners: dict[str, str] = {}
    try:
        entries = records.listdir()
    except OSError:
        return owners
    for fname in entries:
        stem, suffix = os.path.splitext(fname)
        if fname == skip or suffix != ".json":
            continue
        data = _read_manifest(records, fname)
        if data:
            for n in data["names"]:
                owners[str(n)] = stem
    return owners


def _swap_in(dest: SafeDir, tmp: str, name: str) -> None:
    """Rename ``tmp`` over ``name`` (a file, link or folder), both in ``dest``."""
    st = dest.lstat(name)
    new = dest.lstat(tmp)
    # rename() replaces a file or link by a file or link, and nothing else: a folder on either
    # side goes aside first (a copied folder over an old link included).
    if st is not None and (stat.S_ISDIR(st.st_mode) or (new is not None and stat.S_ISDIR(new.st_mode))):
        old = f".{name}.ion-old-{uuid.uuid4().hex[:8]}"
        dest.rename(name, old)
        try:
            dest.rename(tmp, name)
        except OSError:
            dest.rename(old, name)  # the old version back in place: a failed update loses nothing
            raise
        dest.remove(old)
    else:
        dest.replace(tmp, name)


def place(entry: Path, names: list[str], destination: Path, *, link: bool, platform: str, name: str,
          version: str, entry_stamp: str, root: Path | None = None, cache_root: Path | None = None) -> Placement:
    """Place an entry's top-level ``names`` at ``destination``.

    :param entry: the cache entry folder.
    :param entry_stamp: identifies the entry's content (e.g. its fetch time), so a
        copy is redone when the cache entry was refetched.
    :param root: where the walk to ``destination`` starts (see :class:`Target`):
        ``destination`` is then absolute, resolved when it was checked, and no
        link below ``root`` is followed. None: ``destination``'s realpath now,
        walked from ``/``.
    :param cache_root: the cache's root: a destination in it is refused.
    :raises PlacementError: naming the path that could not be written (or was a
        symbolic link), or a name that something else owns.
    """
    _check_names(entry, names)
    top, path = _target(destination, root)
    _refuse_cache(path, destination, entry, cache_root)
    manifest = manifest_path(destination, platform, name)
    with ExitStack() as stack:
        dest = stack.enter_context(_open_destination(top, path, destination))
        # Defence in depth: where the descriptor really is (the walk followed no link).
        _refuse_cache(dest.realpath(), destination, entry, cache_root)
        try:
            records = stack.enter_context(dest.open_dir(MANIFEST_DIR, create=True))
            stack.enter_context(records.locked(LOCK_FILE))
        except SymlinkRefused as exc:
            raise PlacementError(_refused(exc)) from exc
        except OSError as exc:
            raise PlacementError(f"cannot write {destination / MANIFEST_DIR}: {exc.strerror or exc}") from exc
        if link:  # before the links are made (see the module notes), once the destination is known good
            _record_link(entry, destination)
        return _place_locked(entry, names, destination, dest, records, manifest, link=link, version=version,
                             entry_stamp=entry_stamp)
    raise AssertionError("unreachable")  # pragma: no cover  (for the type checker: ExitStack swallows nothing)


def _remove_leftovers(dest: SafeDir, names: list[str]) -> None:
    """Remove the temporary copies (``.<name>.ion-new-*``) and set-aside old versions
    (``.<name>.ion-old-*``) of ``names`` that a placer killed mid-way left: only a placer holding the
    destination's lock makes them, and we hold it now, so every one there is a dead placer's."""
    prefixes = tuple(f".{n}.ion-{kind}-" for n in names for kind in ("new", "old"))
    for leftover in dest.listdir():
        if leftover.startswith(prefixes):
            try:
                dest.remove(leftover)
            except OSError as exc:
                raise PlacementError(f"cannot remove {dest.path / leftover}, left by a placement that was "
                                     f"killed: {exc.strerror or exc}") from exc


def _place_locked(entry: Path, names: list[str], destination: Path, dest: SafeDir, records: SafeDir,
                  manifest: Path, *, link: bool, version: str, entry_stamp: str) -> Placement:
    """:func:`place`, the destination and its records open, holding the destination's lock."""
    mname = manifest.name
    _remove_leftovers(dest, names)
    previous = _read_manifest(records, mname) or {}
    prev_names = [str(n) for n in previous.get("names", [])]
    record = _record(entry, names, link=link, version=version, entry_stamp=entry_stamp)
    if _same(previous, record) and _all_in_place(entry, names, dest, link):
        return Placement(destination, sorted(names), already=True)
    if not prev_names and link and names and _all_in_place(entry, names, dest, link):
        # Links already right but no record (first deploy over a tree placed by hand).
        _write_manifest(records, manifest, record)
        return Placement(destination, sorted(names), already=True)

    owners = _owners(records, mname)
    for n in names:
        target = destination / n
        if n in owners:
            raise PlacementError(f"{target} is deployed there by item {owners[n]}; refusing to replace it")
        st = dest.lstat(n)
        if st is not None and n not in prev_names and not stat.S_ISLNK(st.st_mode):
            raise PlacementError(f"{target} exists and was not placed by a deployment; "
                                 f"refusing to overwrite it (move it away to deploy here)")
    placed_any = False
    placed: list[str] = []
    current = destination
    try:
        for n in names:
            current = destination / n
            src = entry / n
            if link and dest.readlink(n) == str(src):
                continue
            tmp = f".{n}.ion-new-{uuid.uuid4().hex[:8]}"
            try:
                if link:
                    dest.symlink(src, tmp)
                else:
                    dest.copy_tree(src, tmp)
                _swap_in(dest, tmp, n)
                placed_any = True
                placed.append(n)
            except BaseException:
                try:
                    dest.remove(tmp)
                except OSError:
                    pass
                raise
    except OSError as exc:
        # Record what is ours now (the old names and those just placed), so that
        # the next run may replace them instead of refusing them as foreign.
        partial = dict(previous, names=sorted(set(prev_names) | set(placed)), stamp="partial")
        try:
            _write_manifest(records, manifest, partial)
        except PlacementError:
            pass
        if isinstance(exc, SymlinkRefused):
            raise PlacementError(_refused(exc)) from exc
        where = exc.filename if exc.filename and os.path.isabs(str(exc.filename)) else current
        raise PlacementError(f"cannot write {where}: {exc.strerror or exc}") from exc
    removed = []
    for n in prev_names:
        if n not in names and dest.exists(n):
            try:
                dest.remove(n)
            except OSError as exc:
                raise PlacementError(f"cannot remove {destination / n}, left from the previous version: "
                                     f"{exc.strerror or exc}") from exc
            removed.append(n)
    _write_manifest(records, manifest, record)
    return Placement(destination, sorted(names), already=not placed_any and not removed, removed=removed)


def placed_already(entry: Path, names: list[str], destination: Path, *, link: bool, platform: str, name: str,
                   version: str, entry_stamp: str, root: Path | None = None) -> Placement | None:
    """The placement, if ``destination`` holds this entry's ``names`` as :func:`place` left them; else None.

    A few opens and stats and one small read, by descriptors walked from
    ``root`` as :func:`place` does (a short call, see ``BlockingPool.run_short``):
    on a warm deploy most items end here, and only the others go on to
    :func:`place`, which reports anything wrong (a link in the way included).
    """
    if not all(is_name(n) and not is_reserved(n) for n in names):
        return None  # place() refuses it, naming the culprit
    top, path = _target(destination, root)
    record = _record(entry, names, link=link, version=version, entry_stamp=entry_stamp)
    try:
        with SafeDir.open_below(top, path) as dest:
            with dest.open_dir(MANIFEST_DIR) as records:
                previous = _read_manifest(records, _manifest_name(platform, name)) or {}
            if not (_same(previous, record) and _all_in_place(entry, names, dest, link)):
                return None
    except (OSError, ValueError):
        return None  # missing, a link in the way, not below root: place() says what
    if link:
        _record_link(entry, destination)
    return Placement(destination, sorted(names), already=True)


def _record_link(entry: Path, destination: Path) -> None:
    try:
        record_link(entry, destination.absolute())
    except OSError as exc:
        _log.warn("cannot record the link from {dest} in the cache ({exc}): the cache's reaper may "
                  "evict {entry} while it is linked", dest=str(destination), exc=exc, entry=str(entry))


def _record(entry: Path, names: list[str], *, link: bool, version: str, entry_stamp: str) -> dict[str, Any]:
    """What the manifest of a placement says."""
    return {"version": version, "link": link, "entry": str(entry), "stamp": entry_stamp, "names": sorted(names)}


def _same(previous: dict[str, Any], record: dict[str, Any]) -> bool:
    return all(previous.get(k) == v for k, v in record.items() if k != "names") and sorted(
        str(n) for n in previous.get("names", [])) == record["names"]


def _write_manifest(records: SafeDir, manifest: Path, record: dict[str, Any]) -> None:
    """Write the manifest (atomically, in the records folder opened without following links)."""
    try:
        records.write_atomic(manifest.name, json.dumps(record, indent=1, sort_keys=True).encode("utf-8"))
    except OSError as exc:
        raise PlacementError(f"cannot record the deployment in {manifest}: {exc.strerror or exc}") from exc


def _all_in_place(entry: Path, names: list[str], dest: SafeDir, link: bool) -> bool:
    for n in names:
        if link:
            if dest.readlink(n) != str(entry / n):
                return False
        else:
            st = dest.lstat(n)
            if st is None or stat.S_ISLNK(st.st_mode):
                return False
    return True
