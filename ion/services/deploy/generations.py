# -*- test-case-name: tests.services.deploy.test_generations -*-
"""Generations of a deployment file, and rollback (issue #17 §1).

Each successful deploy of a deployment file (every item in place) records a
**generation**: the file's sha256, every item (as a deploy request spells it:
repository, name, version, platform, destination, flags, sha256) with its
cache entry, the time and the caller. ``ion-deploy --generations FILE`` lists
them, ``ion-deploy --rollback [N] FILE`` deploys generation N again (default:
the previous one) and records that as a new generation; the Deploy service has
the ops ``generations`` and ``rollback``, the shell ``generations(file)`` and
``rollback(file, n)``.

Decisions:

- **Where**: ``<cache root>/generations/<32 hex>.json``, one JSON document per
  deployment file, replaced whole (temporary file and rename, through
  :class:`~ion.core.safefs.SafeDir`) under an ``flock`` of
  ``generations/.lock``. In the cache root, not beside the destinations: a
  deployment has many destinations, and the cache's reaper must read which
  entries the kept generations name cheaply (the ``entries`` key,
  :func:`ion.services.cache.reaper.kept_entries`), and a rollback must find
  the history whatever became of the destinations.
- **Which file** (:class:`DeploymentFile`): its resolved path on the host that
  read it (the caller's: ``ion-deploy`` in process, or the client of the Deploy
  service). The 32 hex are the sha256 of ``<host id>\\0<path>``. The file's
  content hash is a field of each generation: editing the file starts no new
  history.
- **Numbers** count from 1, the oldest ever recorded; each new generation
  takes the next. Only the newest ``keep_generations`` (3) are kept.
  ``rollback`` without N takes the previous one, i.e. the one before the
  newest (so two rollbacks in a row swap back).
- **A deploy that changes nothing** (same file hash, same items and entries as
  the newest generation) records none: running a deployment again does not
  push older generations out.
- **Rollback** builds a :class:`~ion.services.deploy.spec.Deployment` from
  the recorded items, with their exact versions and ``keep_updated`` off, and
  deploys it the usual way: an entry still cached is a cache hit, placed
  without any download; an evicted one is fetched again from its repository
  (and checked against the recorded ``sha256``). Items the newest generation
  has and the rolled-back one lacks are left in place, and named in the
  answer (``left``).
- **The caller**: the broker-validated ``broker-user`` on the service, the OS
  user for ``ion-deploy`` in process.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from ion.core.exceptions import ApplicationError
from ion.core.safefs import SafeDir
from ion.services.cache.entry import EntryKey, repo_id
from ion.services.cache.reaper import GENERATIONS_DIR
from ion.services.deploy.core import ItemResult
from ion.services.deploy.settings import DeploySettings
from ion.services.deploy.spec import Deployment, DeploymentError, item_from_dict

__all__ = ["DeploymentFile", "Generation", "GenerationError", "GenerationStore", "Rollback", "rollback",
           "record_generation", "os_user", "GENERATIONS_DIR", "FORMAT"]

#: The version of the record's layout.
FORMAT = 1
#: In ``generations/``: the file whose ``flock`` serialises updates of the records.
LOCK_FILE = ".lock"
#: The largest record read (bytes).
_MAX_BYTES = 64 << 20

_log = Logger()


class GenerationError(ApplicationError):
    """No such generation (404), or a generation number that is no number (400); says which are kept."""

    code = 404


@dataclass(frozen=True)
class DeploymentFile:
    """A deployment file, as its generations are named: its resolved path on the host that read it."""

    path: str
    host: str

    @classmethod
    def of(cls, path: str | os.PathLike[str], host: str) -> DeploymentFile:
        """The file at ``path`` (resolved now; it need not exist) read on ``host``."""
        return cls(os.path.realpath(path), host)

    @classmethod
    def from_wire(cls, data: Any) -> DeploymentFile:
        """``{"file": absolute path, "host": host id}`` of a request.

        :raises ApplicationError: 400 naming what is missing or wrong.
        """
        path = data.get("file") if isinstance(data, Mapping) else None
        host = data.get("host") if isinstance(data, Mapping) else None
        if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
            raise ApplicationError(f"'file' must be the deployment file's absolute path, not {path!r}", 400)
        if not isinstance(host, str) or not host or "\0" in host:
            raise ApplicationError(f"'host' must be the id of the host that reads the file, not {host!r}", 400)
        return cls(path, host)

    def to_wire(self) -> dict[str, str]:
        return {"file": self.path, "host": self.host}

    @property
    def key(self) -> str:
        """32 hex: the name of its record in ``generations/``."""
        return hashlib.sha256(f"{self.host}\0{self.path}".encode("utf-8", "surrogateescape")).hexdigest()[:32]


def entry_relpath(item: Any) -> str:
    """The cache entry of an item, relative to the cache root (``<repo-id>/<platform>/<name>/<folder>``):
    from its key, so it is the same wherever the cache is mounted."""
    key = EntryKey(repo_id(item.repository.wire_url), item.platform, item.name, item.version, item.unpack)
    return str(key.relpath)


@dataclass
class Generation:
    """One recorded deployment of a deployment file.

    :ivar number: 1 for the oldest ever recorded, then one more each time.
    :ivar items: each item as a deploy request spells it (:meth:`DeploymentItem.to_dict`), plus
        ``entry`` (its cache entry, relative to the cache root) and ``state`` (as deployed).
    :ivar rollback_of: the generation this one put back, if it was a rollback.
    """

    number: int
    time: float
    caller: str | None
    via: str
    source: str
    file_sha256: str | None
    items: list[dict[str, Any]] = field(default_factory=list)
    rollback_of: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"generation": self.number, "time": self.time, "caller": self.caller, "via": self.via,
                "source": self.source, "file_sha256": self.file_sha256, "rollback_of": self.rollback_of,
                "items": [dict(i) for i in self.items]}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Generation:
        return cls(number=int(data["generation"]), time=float(data.get("time") or 0.0),
                   caller=data.get("caller"), via=str(data.get("via") or ""), source=str(data.get("source") or ""),
                   file_sha256=data.get("file_sha256"), items=[dict(i) for i in data.get("items") or []],
                   rollback_of=data.get("rollback_of"))

    @property
    def entries(self) -> list[str]:
        """The cache entries it names (relative to the cache root)."""
        return [str(i["entry"]) for i in self.items if i.get("entry")]

    def same_as(self, other: Generation) -> bool:
        """The same file content, items and entries (what was deployed; not when or by whom)."""
        def strip(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{k: v for k, v in i.items() if k != "state"} for i in items]

        return self.file_sha256 == other.file_sha256 and strip(self.items) == strip(other.items)

    def deployment(self, source: str | None = None) -> Deployment:
        """The deployment that puts this generation back: its items with their exact versions,
        ``keep_updated`` off (a cached entry is used as it is, no remote check).

        :raises GenerationError: a recorded item cannot be read any more.
        """
        items = []
        label = source or self.source
        for raw in self.items:
            try:
                item = item_from_dict({k: v for k, v in raw.items() if k not in ("entry", "state")}, label)
            except DeploymentError as exc:
                raise GenerationError(f"generation {self.number}: a recorded item cannot be read: {exc}",
                                      400) from None
            items.append(replace(item, keep_updated=False))
        return Deployment(label, items, file_sha256=self.file_sha256)


@dataclass
class History:
    """The record of one deployment file: its kept generations, oldest first."""

    file: DeploymentFile
    generations: list[Generation] = field(default_factory=list)

    def to_wire(self, keep: int | None = None) -> dict[str, Any]:
        kept = self.generations[-keep:] if keep else self.generations
        entries = sorted({e for g in kept for e in g.entries})
        return {"format": FORMAT, **self.file.to_wire(), "entries": entries,
                "generations": [g.to_wire() for g in kept]}

    @classmethod
    def from_wire(cls, file: DeploymentFile, data: Any) -> History:
        gens = data.get("generations") if isinstance(data, Mapping) else None
        out = cls(file)
        for g in gens if isinstance(gens, list) else ():
            try:
                out.generations.append(Generation.from_wire(g))
            except (KeyError, TypeError, ValueError, AttributeError):
                _log.warn("a generation of {path} cannot be read; skipped", path=file.path)
        out.generations.sort(key=lambda g: g.number)
        return out

    def find(self, number: int | None) -> Generation:
        """Generation ``number``; None: the previous one (the one before the newest).

        :raises GenerationError: there is none, naming the kept ones.
        """
        where = f"{self.file.path} (host {self.file.host})"
        if not self.generations:
            raise GenerationError(f"no generation of {where} is recorded: deploy it first")
        kept = ", ".join(str(g.number) for g in self.generations)
        if number is None:
            if len(self.generations) < 2:
                raise GenerationError(f"{where} has only generation {kept}: there is no previous one to roll "
                                      f"back to")
            return self.generations[-2]
        for g in self.generations:
            if g.number == number:
                return g
        raise GenerationError(f"{where} has no generation {number}; kept: {kept}")


# -- the record on disk (blocking: run in the pool) ----------------------------------------------------
def _open_folder(root: Path, create: bool) -> SafeDir | None:
    if create:
        os.makedirs(root, exist_ok=True)
    try:
        with SafeDir.open_root(root) as top:
            return top.open_dir(GENERATIONS_DIR, create=create)
    except FileNotFoundError:
        if create:
            raise
        return None


def _read(folder: SafeDir, file: DeploymentFile) -> History:
    raw = folder.read_bytes(f"{file.key}.json", limit=_MAX_BYTES)
    if raw is None:
        return History(file)
    try:
        return History.from_wire(file, json.loads(raw.decode("utf-8")))
    except ValueError as exc:
        raise GenerationError(f"the generation record {folder.path / (file.key + '.json')} of {file.path} "
                              f"cannot be read ({exc})", 500) from None


def read_history(root: Path, file: DeploymentFile) -> History:
    """The history of ``file`` in the cache ``root`` (empty when none is recorded)."""
    folder = _open_folder(root, create=False)
    if folder is None:
        return History(file)
    with folder:
        return _read(folder, file)


def append_generation(root: Path, file: DeploymentFile, make: Callable[[int], Generation],
                      keep: int) -> tuple[Generation, bool]:
    """Record ``make(next number)`` as the newest generation of ``file``, keeping ``keep``.

    A generation the same as the newest (:meth:`Generation.same_as`) is not recorded:
    answers ``(newest, False)``; else ``(the new one, True)``.
    """
    folder = _open_folder(root, create=True)
    assert folder is not None
    with folder, folder.locked(LOCK_FILE, timeout=60.0):
        history = _read(folder, file)
        number = history.generations[-1].number + 1 if history.generations else 1
        new = make(number)
        if history.generations and history.generations[-1].same_as(new):
            return history.generations[-1], False
        history.generations.append(new)
        data = json.dumps(history.to_wire(keep), indent=1, sort_keys=True).encode("utf-8")
        folder.write_atomic(f"{file.key}.json", data)
        return new, True


# -- the async face --------------------------------------------------------------------------------------
class GenerationStore:
    """The generations of the deployment files deployed with the cache at ``root``.

    :param pool: runs the blocking file work (a :class:`~ion.core.threads.BlockingPool`).
    :param keep: generations kept per file (``keep_generations``).
    """

    def __init__(self, root: Path, pool: Any, keep: int = DeploySettings.keep_generations) -> None:
        self.root = Path(root)
        self.pool = pool
        self.keep = max(1, int(keep))

    def history(self, file: DeploymentFile) -> defer.Deferred[History]:
        """Every kept generation of ``file``, oldest first."""
        return self.pool.run(read_history, self.root, file)

    def find(self, file: DeploymentFile, number: int | None) -> defer.Deferred[Generation]:
        """Generation ``number`` of ``file`` (None: the previous one); fails with :class:`GenerationError`."""
        return self.history(file).addCallback(lambda h: h.find(number))

    def record(self, file: DeploymentFile, deployment: Deployment, results: Sequence[ItemResult], *,
               caller: str | None, via: str, rollback_of: int | None = None,
               now: float | None = None) -> defer.Deferred[tuple[Generation, bool]]:
        """Record a successful deployment as the newest generation of ``file``.

        Fires with ``(generation, recorded)``: ``recorded`` is False when it was the same
        as the newest (which is answered).
        """
        items = []
        for item, result in zip(deployment.items, results, strict=True):
            items.append({**item.to_dict(), "entry": entry_relpath(item), "state": result.state})
        when = time.time() if now is None else now

        def make(number: int) -> Generation:
            return Generation(number, when, caller, via, deployment.source, deployment.file_sha256, items,
                              rollback_of)

        return self.pool.run(append_generation, self.root, file, make, self.keep)


def os_user() -> str:
    """Who runs this process (the caller ``ion-deploy`` records)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


async def record_generation(store: GenerationStore, file: DeploymentFile | None, deployment: Deployment,
                            results: Sequence[ItemResult], *, caller: str | None, via: str,
                            rollback_of: int | None = None) -> Generation | None:
    """The one hook after a deploy: record a generation when every item is in place.

    None when nothing is recorded: no file, an item not in place, or the record could not
    be written (logged: the deployment itself stands).
    """
    if file is None or not results or not all(r.ok for r in results):
        return None
    try:
        generation, _ = await store.record(file, deployment, results, caller=caller, via=via,
                                           rollback_of=rollback_of)
    except Exception as exc:
        _log.warn("cannot record the generation of {path}: {exc}", path=file.path, exc=exc)
        return None
    return generation


@dataclass
class Rollback:
    """What a rollback did: the generation put back (``to``), every item's result, the generation
    recorded for it (None when an item failed; the newest when nothing changed), and the items of
    the newest generation that ``to`` lacks, left in place (``left``: ``platform/name/version ->
    destination``)."""

    to: Generation
    deployment: Deployment
    results: list[ItemResult]
    generation: Generation | None
    left: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def to_wire(self) -> dict[str, Any]:
        return {"source": self.deployment.source, "ok": self.ok, "items": [r.to_wire() for r in self.results],
                "rollback_of": self.to.number,
                "generation": self.generation.number if self.generation is not None else None,
                "left": list(self.left)}


async def rollback(store: GenerationStore, file: DeploymentFile, number: int | None,
                   deploy: Callable[[Deployment], Any], *, caller: str | None, via: str,
                   check: Callable[[Deployment], Any] | None = None) -> Rollback:
    """Put generation ``number`` of ``file`` (None: the previous one) back in place.

    :param deploy: deploys a :class:`Deployment` (the usual path: fetch, which is a cache hit
        while the entry is cached, then place); fires with one :class:`ItemResult` per item.
    :param check: called with the deployment first (the Deploy service's authorization);
        may raise, or return a Deferred.
    :raises GenerationError: no such generation.
    """
    history = await store.history(file)
    target = history.find(number)
    placed = {(i.get("destination"), i.get("platform"), i.get("name")) for i in target.items}
    left = [f"{i.get('platform')}/{i.get('name')}/{i.get('version')} -> {i.get('destination')}"
            for i in history.generations[-1].items
            if (i.get("destination"), i.get("platform"), i.get("name")) not in placed]
    deployment = target.deployment()
    if check is not None:
        await defer.maybeDeferred(check, deployment)
    results = list(await deploy(deployment))
    generation = await record_generation(store, file, deployment, results, caller=caller, via=via,
                                         rollback_of=target.number)
    return Rollback(target, deployment, results, generation, left)


def parse_number(value: Any) -> int | None:
    """A generation number of a request or the command line (None: the previous one).

    :raises GenerationError: 400, for anything but a whole number >= 1.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GenerationError(f"a generation is a whole number >= 1, not {value!r}", 400)
    return value
