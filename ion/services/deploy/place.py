"""Putting a cached dependency in place at its destination (DESIGN §8, Deploy; §10).

Blocking filesystem code, run in the container's :class:`~ion.core.threads.BlockingPool`.

Each top-level name of the entry becomes either a symlink into the cache
(``link: true``) or a copy, written beside the target (``.<name>.ion-new-*``)
and switched in, so the destination never holds a half-written dependency.
What an item placed is recorded in a manifest,
``<destination>/.ion-deploy/<platform>.<name>.json``, written last; the next
deployment of that item removes the names the new version lacks, and nothing
else at the destination is ever touched. A name that exists there but that no
item of ours placed is refused, never overwritten — except a symlink, which
holds no data (Umpire's old links, a dangling link) and is replaced.

**A name is never missing** (:func:`_swap_in`). The new version is swapped
with the old one by :meth:`SafeDir.exchange <ion.core.safefs.SafeDir.exchange>`
(``renameat2(RENAME_EXCHANGE)``): one step, the old version left at
``.<name>.ion-old-*``. Where the filesystem has no exchange (NFS, old
kernels), a file or link is renamed over the name (atomic; the old one kept
aside by a hard link or a copy first), and a copied folder is put beside it as
a versioned folder ``.<name>.ion-ver-<8 hex>`` that the name, a symlink,
names: switching it is renaming a new link over the old one. Readers follow
the link as they would the folder; the copy is in place already when its
placement finds such a link to its own version. Only a real folder at the
name without exchange has the two renames (old aside, new in) of old, once:
the name is a link from then on.

**Two-phase** (``place(pending=True)``, the Deployer's all or nothing):
the names are switched and the manifest written, but the previous versions
stay aside; the result's :class:`Switch` is then committed (:func:`commit`:
the previous versions removed) or undone (:func:`undo`: each name exchanged
back, the names the new version lacked renamed back, the manifest rewritten
as it was), each under the destination's lock again. Meanwhile the switch
holds a shared ``flock`` on ``.ion-deploy/.pending``. A placement removes what
a killed placer left (``.<name>.ion-new-*`` always; ``.ion-old-*`` and the
``.ion-ver-*`` no link names only when it can take ``.pending`` exclusively,
that is when no live switch waits there): a SIGKILLed deployer's shared lock
is gone with it, so its set-aside versions are cleaned by the next placement.
Until its commit, a switch's manifest says ``"pending": true``: another
deployment does not take that version for in place (an undo may still take it
away) and places it again; a mark no live switch holds is dropped.
A name changed by someone else since the switch is not switched back
(:class:`PlacementError` says which).

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
(``.<name>.ion-new-*``, ``.<name>.ion-old-*``, ``.<name>.ion-ver-*``) is refused too, so the record
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

import errno
import json
import os
import stat
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from ion.core.exceptions import IonError
from ion.core.safefs import SafeDir, SymlinkRefused, WalkCache, lies_in
from ion.core.tokens import random_hex
from ion.services.cache.reaper import record_link

__all__ = ["PlacementError", "Placement", "Switch", "Target", "place", "commit", "undo", "placed_already",
           "manifest_path", "is_name", "is_reserved", "MANIFEST_DIR", "LOCK_FILE", "PENDING_FILE"]

MANIFEST_DIR = ".ion-deploy"
#: In :data:`MANIFEST_DIR`: the file whose ``flock`` serialises placements of one destination.
LOCK_FILE = ".lock"
#: In :data:`MANIFEST_DIR`: shared-``flock``ed while switched items wait for their commit or undo.
PENDING_FILE = ".pending"
#: The placer's own names at a destination: ``.<name>.ion-<kind>-<8 hex>``.
TEMP_KINDS = ("new", "old", "ver")

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
    #: Two-phase (``place(pending=True)``): what to :func:`commit` or :func:`undo`; None when nothing changed.
    switch: Switch | None = None

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
    return name == MANIFEST_DIR or (name.startswith(".") and any(f".ion-{kind}-" in name for kind in TEMP_KINDS))


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


def _cache_tops(entry: Path, cache_root: Path | None, walks: WalkCache | None = None) -> list[tuple[Path, str]]:
    """The folders no destination may be or lie in (the cache root, the entry), resolved once per
    placement for both of its checks (with ``walks``, the folders above them once per deployment)."""
    realpath = walks.realpath if walks is not None else os.path.realpath
    tops = [(Path(realpath(cache_root)), "the cache root")] if cache_root is not None else []
    return [*tops, (Path(realpath(entry)), "the cache entry")]


def _refuse_cache(real: Path, destination: Path, tops: list[tuple[Path, str]]) -> None:
    """A destination that is or lies in one of ``tops`` (:func:`_cache_tops`) is refused."""
    for real_top, what in tops:
        if lies_in(real, real_top):
            raise PlacementError(f"destination {destination} (resolved: {real}) lies in {what} {real_top}; "
                                 f"published cache entries are never written by a deployment: refusing it")


def _open_destination(top: Path, path: Path, destination: Path, walks: WalkCache | None = None) -> SafeDir:
    """The destination folder, made if missing, walked from ``top`` without following links (with
    ``walks``, from its parent folder as first walked to in this deployment)."""
    try:
        return (walks or SafeDir).open_below(top, path, create=True)
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
    except OSError:
        return None  # unreadable (or a link): treated as no previous deployment
    return _parse_manifest(raw)


def _parse_manifest(raw: bytes | None) -> dict[str, Any] | None:
    """A manifest's content (read by :func:`_read_manifest`), or None if it is none or not one."""
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:
        return None  # unreadable: treated as no previous deployment
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


@dataclass
class _Swap:
    """One name a placement switched, and how to switch it back.

    ``how``: ``new`` (nothing was there), ``exchanged`` (the old version swapped out in one step,
    now at ``old``), ``replaced`` (the old file or link kept at ``old``, a hard link or copy, and
    the new one renamed over it), ``aside`` (no exchange: the old folder renamed to ``old``, then
    the new one renamed in) or ``removed`` (a name the new version lacks, renamed to ``old``).
    """

    name: str
    how: str
    old: str | None = None
    #: ``(st_dev, st_ino)`` of what was put at ``name``: checked before switching it back.
    placed: tuple[int, int] | None = None
    #: The versioned folder ``.<name>.ion-ver-*`` the old link named: removed with the old version.
    old_version: str | None = None
    #: The versioned folder the new link names (no exchange, a folder copied): removed on undo.
    new_version: str | None = None


@dataclass
class Switch:
    """What a placement switched in, waiting for :func:`commit` or :func:`undo` (each under the lock).

    Meanwhile the previous versions wait at their temporary names and the switch holds a
    shared ``flock`` on ``.ion-deploy/.pending``, so that no placement takes them for what
    a killed placer left (see :func:`_remove_leftovers`).
    """

    top: Path
    path: Path
    destination: Path
    manifest: str
    #: The manifest's content before (None: there was none).
    previous: bytes | None
    swaps: list[_Swap]
    pending_fd: int = -1
    #: The manifest as the switch wrote it (marked ``pending``), and as :func:`commit` rewrites it.
    written: bytes | None = None
    committed: bytes | None = None
    #: The deployment's walks (:class:`~ion.core.safefs.WalkCache`), if any: the commit or undo walks
    #: from the destination's parent as first walked to.
    walks: WalkCache | None = field(default=None, repr=False)

    def release(self) -> None:
        """Drop the shared lock that keeps the previous versions (after a commit or an undo)."""
        if self.pending_fd >= 0:
            os.close(self.pending_fd)
            self.pending_fd = -1


def _ident(dest: SafeDir, name: str) -> tuple[int, int] | None:
    st = dest.lstat(name)
    return None if st is None else (st.st_dev, st.st_ino)


def _version_of(dest: SafeDir, name: str) -> str | None:
    """The versioned folder ``.<name>.ion-ver-*`` beside it that the link ``name`` names, if it is one."""
    target = dest.readlink(name)
    if target is None or not target.startswith(f".{name}.ion-ver-") or "/" in target:
        return None
    st = dest.lstat(target)
    return target if st is not None and stat.S_ISDIR(st.st_mode) else None


def _swap_in(dest: SafeDir, tmp: str, name: str) -> _Swap:
    """Put ``tmp`` (the new version) at ``name``, both in ``dest``, keeping the old version aside.

    ``name`` is never missing: an exchange where the filesystem has one; otherwise a file or
    link is renamed over it (atomic), and a copied folder becomes a versioned folder
    ``.<name>.ion-ver-*`` that ``name``, a symlink, names, switched by that same rename. Only
    a real folder at ``name`` without exchange is renamed aside first (once: it is a link after).
    """
    token = tmp.rsplit("-", 1)[-1]
    old = f".{name}.ion-old-{token}"
    st = dest.lstat(name)
    if st is None:
        dest.rename(tmp, name)
        return _Swap(name, "new", placed=_ident(dest, name))
    old_version = _version_of(dest, name) if stat.S_ISLNK(st.st_mode) else None
    if dest.exchange(tmp, name):
        try:
            dest.rename(tmp, old)
        except OSError:
            old = tmp  # it waits at the temporary name instead
        return _Swap(name, "exchanged", old=old, placed=_ident(dest, name), old_version=old_version)
    new_version = None
    new = dest.lstat(tmp)
    if new is not None and stat.S_ISDIR(new.st_mode):
        new_version = f".{name}.ion-ver-{token}"
        dest.rename(tmp, new_version)
        dest.symlink(new_version, tmp)
    try:
        if not stat.S_ISDIR(st.st_mode):
            dest.second_name(name, old)
            dest.replace(tmp, name)
            return _Swap(name, "replaced", old=old, placed=_ident(dest, name), old_version=old_version,
                         new_version=new_version)
        # A real folder and no exchange: the one moment without the name (the next switch is a link's).
        dest.rename(name, old)
        try:
            dest.rename(tmp, name)
        except OSError:
            dest.rename(old, name)  # the old version back in place: a failed update loses nothing
            raise
        return _Swap(name, "aside", old=old, placed=_ident(dest, name), new_version=new_version)
    except BaseException:
        if new_version is not None:
            dest.remove(new_version)
        raise


def _commit_swaps(dest: SafeDir, swaps: list[_Swap]) -> list[str]:
    """Remove the previous versions the swaps kept; the problems met (each one's name stays a leftover)."""
    problems = []
    for s in swaps:
        for gone in (s.old, s.old_version):
            if gone is None:
                continue
            try:
                dest.remove(gone)
            except OSError as exc:
                problems.append(f"cannot remove {dest.path / gone}, the previous version of {s.name}: "
                                f"{exc.strerror or exc}")
    return problems


def _undo_swaps(dest: SafeDir, swaps: list[_Swap], undone: list[str] | None = None) -> None:
    """Switch each name back to its previous version, the last switched first (each one's name
    appended to ``undone`` once back).

    :raises OSError: or :class:`PlacementError` (a name changed since): the rest is left as it is.
    """
    for s in reversed(swaps):
        now = _ident(dest, s.name)
        if s.how == "removed":
            if now is not None:
                raise PlacementError(f"{dest.path / s.name} was placed again since; not switched back")
            assert s.old is not None
            dest.rename(s.old, s.name)
            if undone is not None:
                undone.append(s.name)
            continue
        if now != s.placed:
            raise PlacementError(f"{dest.path / s.name} changed since this deployment placed it; "
                                 f"not switched back")
        if s.how == "new":
            dest.remove(s.name)
        elif s.how == "exchanged":
            assert s.old is not None
            if not dest.exchange(s.old, s.name):
                raise PlacementError(f"cannot switch {dest.path / s.name} back: the filesystem no longer "
                                     f"exchanges names")
            dest.remove(s.old)
        elif s.how == "replaced":
            assert s.old is not None
            dest.replace(s.old, s.name)
        else:  # aside: the name is missing for a moment again, as when it was switched
            assert s.old is not None
            gone = f".{s.name}.ion-new-{random_hex(8)}"
            dest.rename(s.name, gone)
            dest.rename(s.old, s.name)
            dest.remove(gone)
        if undone is not None:
            undone.append(s.name)
        if s.new_version is not None:
            dest.remove(s.new_version)


def _hold_pending(records: SafeDir) -> int:
    """A shared ``flock`` on ``.ion-deploy/.pending``, held while previous versions wait (see :class:`Switch`)."""
    # Only a placement holding the destination's lock (as we do) takes it exclusively: never busy.
    fd = records.try_lock(PENDING_FILE, shared=True)
    if fd is None:
        raise OSError(errno.EWOULDBLOCK, "locked by another placement", str(records.path / PENDING_FILE))
    return fd


def _none_pending(records: SafeDir) -> bool:
    """True if no placement's previous versions wait at this destination (no shared lock on ``.pending``)."""
    try:
        fd = records.try_lock(PENDING_FILE, create=False)
    except OSError:
        return False
    if fd is not None:
        os.close(fd)
        return True
    return not records.exists(PENDING_FILE)


def place(entry: Path, names: list[str], destination: Path, *, link: bool, platform: str, name: str,
          version: str, entry_stamp: str, root: Path | None = None, cache_root: Path | None = None,
          pending: bool = False, walks: WalkCache | None = None) -> Placement:
    """Place an entry's top-level ``names`` at ``destination``.

    :param entry: the cache entry folder.
    :param entry_stamp: identifies the entry's content (e.g. its fetch time), so a
        copy is redone when the cache entry was refetched.
    :param root: where the walk to ``destination`` starts (see :class:`Target`):
        ``destination`` is then absolute, resolved when it was checked, and no
        link below ``root`` is followed. None: ``destination``'s realpath now,
        walked from ``/``.
    :param cache_root: the cache's root: a destination in it is refused.
    :param pending: two-phase: the names are switched and the manifest written, but
        the previous versions are kept until :func:`commit` or :func:`undo` of the
        result's ``switch`` (None when nothing changed). If one name fails, the
        item's names already switched are switched back. False: done at once (the
        previous versions removed; a failure keeps the names placed so far, recorded).
    :param walks: the deployment's :class:`~ion.core.safefs.WalkCache`: the destination is walked
        to from its parent folder as first walked to, and the cache's folders resolved once.
    :raises PlacementError: naming the path that could not be written (or was a
        symbolic link), or a name that something else owns.
    """
    _check_names(entry, names)
    top, path = _target(destination, root)
    tops = _cache_tops(entry, cache_root, walks)
    _refuse_cache(path, destination, tops)
    manifest = manifest_path(destination, platform, name)
    with ExitStack() as stack:
        dest = stack.enter_context(_open_destination(top, path, destination, walks))
        # Defence in depth: where the descriptor really is (the walk followed no link).
        _refuse_cache(dest.realpath(), destination, tops)
        try:
            records = stack.enter_context(dest.open_dir(MANIFEST_DIR, create=True))
            # A destination this placement made holds nothing of an earlier one: when its records
            # folder and their lock are new too, none is read (no record, leftover or manifest).
            made_lock = stack.enter_context(records.locked(LOCK_FILE, new=dest.created and records.created))
            fresh = dest.created and records.created and made_lock
        except SymlinkRefused as exc:
            raise PlacementError(_refused(exc)) from exc
        except OSError as exc:
            raise PlacementError(f"cannot write {destination / MANIFEST_DIR}: {exc.strerror or exc}") from exc
        if link:  # before the links are made (see the module notes), once the destination is known good
            _record_link(entry, destination)
        placement = _place_locked(entry, names, destination, dest, records, manifest, link=link, version=version,
                                  entry_stamp=entry_stamp, pending=pending, fresh=fresh)
        switch = placement.switch
        if switch is not None:
            switch.top, switch.path, switch.walks = top, path, walks
            if not pending:
                placement.switch = None
                for problem in _commit_swaps(dest, switch.swaps):
                    _log.warn("{problem} (the next placement removes it)", problem=problem)
        return placement
    raise AssertionError("unreachable")  # pragma: no cover  (for the type checker: ExitStack swallows nothing)


def _locked_destination(switch: Switch) -> Any:
    """The switch's destination and records, walked again from its root, holding the destination's lock."""
    stack = ExitStack()
    try:
        dest = stack.enter_context((switch.walks or SafeDir).open_below(switch.top, switch.path))
        records = stack.enter_context(dest.open_dir(MANIFEST_DIR))
        stack.enter_context(records.locked(LOCK_FILE))
    except SymlinkRefused as exc:
        stack.close()
        raise PlacementError(_refused(exc)) from exc
    except (OSError, ValueError) as exc:
        stack.close()
        raise PlacementError(f"cannot open {switch.destination} again: {getattr(exc, 'strerror', None) or exc}") \
            from exc
    return stack, dest, records


def commit(switch: Switch) -> list[str]:
    """Keep what ``switch`` placed: its previous versions are removed, under the destination's lock.

    Blocking. :return: the problems met (each previous version that could not be removed is
    a leftover the next placement of that item removes); the new versions stay either way.
    """
    try:
        stack, dest, records = _locked_destination(switch)
    except PlacementError as exc:
        switch.release()
        return [str(exc)]
    with stack:
        try:
            problems = _commit_swaps(dest, switch.swaps)
            if switch.written is not None and switch.committed is not None:
                # The manifest loses its pending mark, unless another placement has rewritten it since.
                try:
                    if records.read_bytes(switch.manifest) == switch.written:
                        records.write_atomic(switch.manifest, switch.committed)
                except OSError as exc:
                    problems.append(f"cannot record the commit in {records.path / switch.manifest}: "
                                    f"{exc.strerror or exc} (the next placement of the item places it again)")
            return problems
        finally:
            switch.release()


def undo(switch: Switch) -> None:
    """Switch back what ``switch`` placed: each name to its previous version (exchanged back where
    it was exchanged), and the manifest to what it said before, under the destination's lock.

    Blocking. :raises PlacementError: a name could not be switched back (or changed since).
    """
    try:
        stack, dest, records = _locked_destination(switch)
    except PlacementError:
        switch.release()
        raise
    with stack:
        try:
            undone: list[str] = []
            try:
                _undo_swaps(dest, switch.swaps, undone)
            except (OSError, PlacementError):
                if undone:  # part old, part new: see _mark_partial
                    _mark_partial(records, switch)
                raise
            if switch.previous is None:
                records.unlink(switch.manifest)
            else:
                records.write_atomic(switch.manifest, switch.previous)
        except SymlinkRefused as exc:
            raise PlacementError(_refused(exc)) from exc
        except OSError as exc:
            raise PlacementError(f"cannot switch {switch.destination} back: {exc.strerror or exc}") from exc
        finally:
            switch.release()


def _mark_partial(records: SafeDir, switch: Switch) -> None:
    """An undo stopped part way (some names back to the previous version, some not): the manifest
    claims every name either version placed and says ``partial``, so that the next placement of the
    item places each name again instead of taking the mix for in place."""
    try:
        current = _read_manifest(records, switch.manifest) or {}
        names = {str(n) for n in current.get("names", [])} | {s.name for s in switch.swaps}
        mark = {k: v for k, v in current.items() if k != "pending"}
        _write_manifest(records, Path(switch.manifest), dict(mark, names=sorted(names), stamp="partial"))
    except (OSError, PlacementError) as exc:
        _log.warn("cannot mark {manifest} partial after a failed undo: {exc}", manifest=switch.manifest, exc=exc)


def _remove_leftovers(dest: SafeDir, records: SafeDir, names: list[str]) -> None:
    """Remove what a placer killed mid-way left for ``names``: temporary copies (``.<name>.ion-new-*``), and,
    unless a live placement's previous versions wait here (a shared lock on ``.pending``), set-aside old
    versions (``.<name>.ion-old-*``) and versioned folders no link names (``.<name>.ion-ver-*``).

    Only a placer holding the destination's lock makes them, and we hold it now, so every one
    there is a dead placer's, or a pending switch's (which holds ``.pending``)."""
    kinds = ("new", "old", "ver") if _none_pending(records) else ("new",)
    prefixes = tuple(f".{n}.ion-{kind}-" for n in names for kind in kinds)
    current = {_version_of(dest, n) for n in names}
    for leftover in dest.listdir():
        if leftover.startswith(prefixes) and leftover not in current:
            try:
                dest.remove(leftover)
            except OSError as exc:
                raise PlacementError(f"cannot remove {dest.path / leftover}, left by a placement that was "
                                     f"killed: {exc.strerror or exc}") from exc


def _place_locked(entry: Path, names: list[str], destination: Path, dest: SafeDir, records: SafeDir,
                  manifest: Path, *, link: bool, version: str, entry_stamp: str, pending: bool,
                  fresh: bool = False) -> Placement:
    """:func:`place`, the destination and its records open, holding the destination's lock.

    ``fresh``: this placement made the destination folder, its records folder and their lock file
    (nobody placed anything there before it): no record, leftover or manifest to read.
    """
    mname = manifest.name
    if fresh:
        before = None
    else:
        try:
            before = records.read_bytes(mname)
        except OSError:
            before = None
    previous = _parse_manifest(before) or {}
    prev_names = [str(n) for n in previous.get("names", [])]
    if not fresh:
        _remove_leftovers(dest, records, sorted(set(names) | set(prev_names)))
    record = _record(entry, names, link=link, version=version, entry_stamp=entry_stamp)
    # Marked pending by a switch whose placer died before its commit (no live switch holds
    # ``.pending``): the item is whole in that version, which counts as in place.
    stale = bool(previous.get("pending")) and _none_pending(records)
    if stale:
        previous = {k: v for k, v in previous.items() if k != "pending"}
    if _same(previous, record) and _all_in_place(entry, names, dest, link):
        if stale:
            try:
                _write_manifest(records, manifest, record)
            except PlacementError as exc:
                _log.warn("{exc} (its pending mark stays: the next placement checks it again)", exc=exc)
        return Placement(destination, sorted(names), already=True)
    if not fresh and not prev_names and link and names and _all_in_place(entry, names, dest, link):
        # Links already right but no record (first deploy over a tree placed by hand).
        _write_manifest(records, manifest, record)
        return Placement(destination, sorted(names), already=True)

    owners = {} if fresh else _owners(records, mname)
    for n in names:
        target = destination / n
        if n in owners:
            raise PlacementError(f"{target} is deployed there by item {owners[n]}; refusing to replace it")
        st = dest.lstat(n)
        if st is not None and n not in prev_names and not stat.S_ISLNK(st.st_mode):
            raise PlacementError(f"{target} exists and was not placed by a deployment; "
                                 f"refusing to overwrite it (move it away to deploy here)")
    switch = Switch(Path("/"), destination, destination, mname, before, [])
    if pending:
        try:
            switch.pending_fd = _hold_pending(records)
        except OSError as exc:
            raise PlacementError(f"cannot write {records.path / PENDING_FILE}: {exc.strerror or exc}") from exc
    # Recorded before any name is switched, so that a placer killed amid the switch (SIGKILL: no
    # cleanup) leaves names the next placement knows for ours, never "not placed by a deployment".
    # A fresh destination (nothing there before) with two phases gets its pending record at once:
    # each name is then missing or its new version whole, as that record says (a stale pending
    # mark: see above). Otherwise a record that claims the old names and the new ones, marked
    # partial (never "in place"): the next placement places each name again.
    prewritten = fresh and pending
    intent = dict(record, pending=True) if prewritten else dict(
        previous, names=sorted(set(prev_names) | set(names)), stamp="partial", pending=True)
    try:
        _write_manifest(records, manifest, intent)
    except PlacementError:
        switch.release()
        raise
    try:
        _switch_names(entry, names, destination, dest, link, switch)
        removed = _set_aside_removed(dest, destination, names, prev_names, switch)
    except (OSError, PlacementError) as exc:
        _failed_switch(exc, dest, records, manifest, switch, previous, prev_names, pending)
        raise AssertionError("unreachable") from exc  # pragma: no cover  (_failed_switch raises)
    try:
        if pending and switch.swaps:
            # Marked pending until its commit: not "in place" for another deployment meanwhile
            # (:func:`_same`), since an undo may still take it away.
            if not prewritten:
                _write_manifest(records, manifest, dict(record, pending=True))
            switch.written, switch.committed = _manifest_bytes(dict(record, pending=True)), _manifest_bytes(record)
        else:
            _write_manifest(records, manifest, record)
    except PlacementError:
        _failed_switch(None, dest, records, manifest, switch, previous, prev_names, pending=True)
        raise
    if not switch.swaps:
        switch.release()
        return Placement(destination, sorted(names), already=True)
    return Placement(destination, sorted(names), already=False, removed=removed, switch=switch)


def _switch_names(entry: Path, names: list[str], destination: Path, dest: SafeDir, link: bool,
                  switch: Switch) -> None:
    """Each name's new version written beside it and switched in (:func:`_swap_in`), recorded in ``switch``."""
    for n in names:
        src = entry / n
        if link and dest.readlink(n) == str(src):
            continue
        tmp = f".{n}.ion-new-{random_hex(8)}"
        try:
            if link:
                dest.symlink(src, tmp)
            else:
                dest.copy_tree(src, tmp)
            switch.swaps.append(_swap_in(dest, tmp, n))
        except OSError as exc:
            try:
                dest.remove(tmp)
            except OSError:
                pass
            if exc.filename is None or not os.path.isabs(str(exc.filename)):
                exc.filename = str(destination / n)
            raise
        except BaseException:
            try:
                dest.remove(tmp)
            except OSError:
                pass
            raise


def _set_aside_removed(dest: SafeDir, destination: Path, names: list[str], prev_names: list[str],
                       switch: Switch) -> list[str]:
    """The names the previous version placed and this one lacks, renamed aside (removed on commit)."""
    removed = []
    for n in prev_names:
        if n not in names and dest.exists(n):
            old = f".{n}.ion-old-{random_hex(8)}"
            try:
                dest.rename(n, old)
            except OSError as exc:
                raise PlacementError(f"cannot remove {destination / n}, left from the previous version: "
                                     f"{exc.strerror or exc}") from exc
            switch.swaps.append(_Swap(n, "removed", old=old))
            removed.append(n)
    return removed


def _failed_switch(exc: BaseException | None, dest: SafeDir, records: SafeDir, manifest: Path, switch: Switch,
                   previous: dict[str, Any], prev_names: list[str], pending: bool) -> None:
    """A name could not be switched: two-phase, the item's switched names go back; else (or if that
    fails too) what is ours now is recorded (the old names and those placed), so that the next run may
    replace them instead of refusing them as foreign. Raises the :class:`PlacementError` to report."""
    switched_back = False
    if pending:
        try:
            _undo_swaps(dest, switch.swaps)
            if switch.previous is None:
                records.unlink(manifest.name)
            else:
                records.write_atomic(manifest.name, switch.previous)
            switched_back = True
        except (OSError, PlacementError) as undo_exc:
            _log.warn("cannot switch {dest} back after a failed placement: {exc}", dest=str(dest.path),
                      exc=undo_exc)
    if not switched_back:
        for problem in _commit_swaps(dest, switch.swaps):
            _log.warn("{problem} (the next placement removes it)", problem=problem)
        placed = [s.name for s in switch.swaps if s.how != "removed"]
        gone = {s.name for s in switch.swaps if s.how == "removed"}
        partial = dict(previous, names=sorted((set(prev_names) - gone) | set(placed)), stamp="partial")
        try:
            _write_manifest(records, manifest, partial)
        except PlacementError:
            pass
    switch.release()
    if exc is None:
        return
    if isinstance(exc, PlacementError):
        raise exc
    if isinstance(exc, SymlinkRefused):
        raise PlacementError(_refused(exc)) from exc
    assert isinstance(exc, OSError)
    raise PlacementError(f"cannot write {exc.filename}: {exc.strerror or exc}") from exc


def placed_already(entry: Path, names: list[str], destination: Path, *, link: bool, platform: str, name: str,
                   version: str, entry_stamp: str, root: Path | None = None,
                   walks: WalkCache | None = None) -> Placement | None:
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
        with (walks or SafeDir).open_below(top, path) as dest:
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
    """The manifest ``previous`` records the placement ``record`` describes, committed (a
    two-phase switch not committed yet may still be undone: not in place)."""
    if previous.get("pending"):
        return False
    return all(previous.get(k) == v for k, v in record.items() if k != "names") and sorted(
        str(n) for n in previous.get("names", [])) == record["names"]


def _manifest_bytes(record: dict[str, Any]) -> bytes:
    """A manifest's bytes: one line of JSON, keys sorted.

    Written two or three times per placed item; ``json`` encodes with its C encoder
    only when no ``indent`` is asked (its Python one held the GIL for ~11 % of a
    deploy of 1,000 small items). Readers parse JSON; the layout is not part of the
    format.
    """
    return _MANIFEST_ENCODER.encode(record).encode("utf-8") + b"\n"


_MANIFEST_ENCODER = json.JSONEncoder(sort_keys=True, separators=(", ", ": "))


def _write_manifest(records: SafeDir, manifest: Path, record: dict[str, Any]) -> None:
    """Write the manifest (atomically, in the records folder opened without following links)."""
    try:
        records.write_atomic(manifest.name, _manifest_bytes(record))
    except OSError as exc:
        raise PlacementError(f"cannot record the deployment in {manifest}: {exc.strerror or exc}") from exc


def _all_in_place(entry: Path, names: list[str], dest: SafeDir, link: bool) -> bool:
    for n in names:
        if link:
            if dest.readlink(n) != str(entry / n):
                return False
        else:
            st = dest.lstat(n)
            if st is None or (stat.S_ISLNK(st.st_mode) and _version_of(dest, n) is None):
                return False  # missing, or a link but to a version folder of its own (no exchange)
    return True
