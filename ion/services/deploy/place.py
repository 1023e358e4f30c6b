"""Putting a cached dependency in place at its destination (DESIGN §8, Deploy).

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

Before it links a destination into the cache, placement records the
destination beside the entry (:func:`ion.services.cache.reaper.record_link`),
so that the cache's reaper never evicts an entry a live destination uses.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from ion.core.exceptions import IonError
from ion.services.cache.reaper import record_link

__all__ = ["PlacementError", "Placement", "place", "manifest_path", "MANIFEST_DIR"]

MANIFEST_DIR = ".ion-deploy"

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


def manifest_path(destination: Path, platform: str, name: str) -> Path:
    """Where the record of what an item placed at ``destination`` lives."""
    return destination / MANIFEST_DIR / f"{platform}.{name}.json"


def is_name(name: object) -> bool:
    """True for a single path component: what a top-level name at a destination may be."""
    return (isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name
            and name not in (".", "..") and "\x00" not in name)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable: treated as no previous deployment
    if not isinstance(data, dict) or not isinstance(data.get("names"), list):
        return None
    # A manifest is a file in the destination, which others may write: never let
    # it name anything but a top-level name of the destination itself.
    data["names"] = [n for n in data["names"] if is_name(n)]
    return data


def _owners(destination: Path, skip: Path) -> dict[str, str]:
    """Top-level names other items' manifests claim at this destination."""
    owners: dict[str, str] = {}
    folder = destination / MANIFEST_DIR
    try:
        entries = list(folder.iterdir())
    except OSError:
        return owners
    for path in entries:
        if path == skip or path.suffix != ".json":
            continue
        data = _read_manifest(path)
        if data:
            for n in data["names"]:
                owners[str(n)] = path.stem
    return owners


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    """Remove a file, link or tree, read-only parts included."""
    if path.is_symlink() or not path.is_dir():
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        return

    def onerror(func: Any, p: str, exc_info: Any) -> None:
        os.chmod(os.path.dirname(p), stat.S_IRWXU)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, stat.S_IRWXU)
        func(p)

    shutil.rmtree(path, onerror=onerror)


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` over ``target`` (a file, link or folder)."""
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.ion-old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        os.rename(tmp, target)
        _remove(old)
    else:
        os.replace(tmp, target)


def _copy(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst)


def place(entry: Path, names: list[str], destination: Path, *, link: bool, platform: str, name: str,
          version: str, entry_stamp: str) -> Placement:
    """Place an entry's top-level ``names`` at ``destination``.

    :param entry: the cache entry folder.
    :param entry_stamp: identifies the entry's content (e.g. its fetch time), so a
        copy is redone when the cache entry was refetched.
    :raises PlacementError: naming the path that could not be written, or a name
        that something else owns.
    """
    bad = [n for n in names if not is_name(n)]
    if bad:
        raise PlacementError(f"entry {entry} names {bad[0]!r}, which is not a top-level name; refusing it")
    if link:
        _record_link(entry, destination)
    manifest = manifest_path(destination, platform, name)
    try:
        destination.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PlacementError(f"cannot create destination {destination}: {exc.strerror or exc}") from exc
    previous = _read_manifest(manifest) or {}
    prev_names = [str(n) for n in previous.get("names", [])]
    record = _record(entry, names, link=link, version=version, entry_stamp=entry_stamp)
    if _same(previous, record) and _all_in_place(entry, names, destination, link):
        return Placement(destination, sorted(names), already=True)
    if not prev_names and link and names and _all_in_place(entry, names, destination, link):
        # Links already right but no record (first deploy over a tree placed by hand).
        _write_manifest(manifest, record)
        return Placement(destination, sorted(names), already=True)

    owners = _owners(destination, manifest)
    for n in names:
        target = destination / n
        if n in owners:
            raise PlacementError(f"{target} is deployed there by item {owners[n]}; refusing to replace it")
        if (target.exists() or target.is_symlink()) and n not in prev_names and not target.is_symlink():
            raise PlacementError(f"{target} exists and was not placed by a deployment; "
                                 f"refusing to overwrite it (move it away to deploy here)")
    placed_any = False
    placed: list[str] = []
    try:
        for n in names:
            target = destination / n
            src = entry / n
            if link and target.is_symlink() and os.readlink(target) == str(src):
                continue
            tmp = destination / f".{n}.ion-new-{uuid.uuid4().hex[:8]}"
            try:
                if link:
                    os.symlink(src, tmp)
                else:
                    _copy(src, tmp)
                _swap_in(tmp, target)
                placed_any = True
                placed.append(n)
            except BaseException:
                if tmp.exists() or tmp.is_symlink():
                    _remove(tmp)
                raise
    except OSError as exc:
        # Record what is ours now (the old names and those just placed), so that
        # the next run may replace them instead of refusing them as foreign.
        partial = dict(previous, names=sorted(set(prev_names) | set(placed)), stamp="partial")
        try:
            _write_manifest(manifest, partial)
        except OSError:
            pass
        where = exc.filename or destination
        raise PlacementError(f"cannot write {where}: {exc.strerror or exc}") from exc
    removed = []
    for n in prev_names:
        if n not in names:
            target = destination / n
            if target.exists() or target.is_symlink():
                try:
                    _remove(target)
                except OSError as exc:
                    raise PlacementError(f"cannot remove {target}, left from the previous version: "
                                         f"{exc.strerror or exc}") from exc
                removed.append(n)
    try:
        _write_manifest(manifest, record)
    except OSError as exc:
        raise PlacementError(f"cannot record the deployment in {manifest}: {exc.strerror or exc}") from exc
    return Placement(destination, sorted(names), already=not placed_any and not removed, removed=removed)


def placed_already(entry: Path, names: list[str], destination: Path, *, link: bool, platform: str, name: str,
                   version: str, entry_stamp: str) -> Placement | None:
    """The placement, if ``destination`` holds this entry's ``names`` as :func:`place` left them; else None.

    A few stats and one small read (a short call, see ``BlockingPool.run_short``):
    on a warm deploy most items end here, and only the others go on to :func:`place`.
    """
    if not all(is_name(n) for n in names):
        return None  # place() refuses it, naming the culprit
    previous = _read_manifest(manifest_path(destination, platform, name)) or {}
    if not (_same(previous, _record(entry, names, link=link, version=version, entry_stamp=entry_stamp))
            and _all_in_place(entry, names, destination, link)):
        return None
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


def _write_manifest(manifest: Path, record: dict[str, Any]) -> None:
    _write_atomic(manifest, json.dumps(record, indent=1, sort_keys=True))


def _all_in_place(entry: Path, names: list[str], destination: Path, link: bool) -> bool:
    for n in names:
        target = destination / n
        if link:
            if not target.is_symlink() or os.readlink(target) != str(entry / n):
                return False
        elif not (target.exists() and not target.is_symlink()):
            return False
    return True
