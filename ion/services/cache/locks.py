"""Entry locks: one fetch per cache entry, within a process and across processes and hosts.

Two levels (DESIGN §8, "Locks"), and a third between them where hosts share a broker:

- **In the process**, a ``DeferredLock`` per entry: a second fetch of the
  same entry waits on a Deferred that fires when the first one releases --
  no sleep, no polling.
- **Through the broker** (the Cache service; :class:`BrokerLocks`, issue 18),
  an exclusive queue per lock, which the broker deletes when its holder's
  connection closes: the lock of a host that dies is free within the
  broker's detection time (a closed socket: at once; a silent host: the
  AMQP heartbeats), not ``lock_timeout``. Its holder writes the broker lock's
  marker in the lock file, and a process that gets the broker lock takes a
  file with the same marker over at once (see :meth:`LockTable.judge`).
  Without a broker (``ion-deploy``), or when it cannot be reached, the lock
  file alone.
- **Across processes and hosts**, the lock file ``<version>[~packed].lock``
  beside the entry folder, created with ``O_CREAT | O_EXCL`` and holding
  ``host_id::pid::started`` (``started``: wall-clock seconds, 6 decimals),
  written with one ``write`` right after creation. ``O_EXCL`` creation is
  atomic on local filesystems and on NFSv3 and later (Linux clients since
  2.6), the default (``lock_method: excl``). Where the filesystem has
  ``O_TMPFILE`` (Linux: ext4, xfs, btrfs, tmpfs...), ``excl`` writes the
  content into an unnamed file first and links it to the lock name
  (``linkat``, exclusive like ``O_EXCL``), so the lock file is never seen
  empty and a kill at any moment leaves either no file or a whole one;
  elsewhere (NFS) it is ``O_EXCL`` then the write. Where it is not (NFSv2, some
  FUSE filesystems), ``lock_method: link`` creates the lock the classic
  NFS-safe way: the content goes to a unique hidden file beside the lock,
  which is hard-linked to the lock name; the lock is ours exactly when that
  file then has two links, whatever ``link()`` answered (on NFS a lost reply
  can report a failure for a link that was made). A file found empty is one
  being created: it is waited on like a live lock, for ``EMPTY_GRACE``
  (10 s); an older empty file was left by a creator that died between
  creating and writing it, and is taken over. (A holder that was merely
  stalled that long finds out at its next refresh or at ``publish``.)

A lock file held by someone else is judged (:meth:`LockTable.judge`):

- same host id and a dead pid (or a zombie) -> taken over at once; our own
  pid with a ``started`` before this process began -> a previous process
  that had our pid (a restarted container) -> taken over at once;
- unparseable content -> a corrupt lock, treated as a stale one: taken over;
- otherwise (live pid, or another host) -> wait, polling with a backoff from
  50 ms to at most 1 s on the injected clock, while the holder refreshes the
  file's mtime every ``refresh_interval`` (``lock_timeout / 4``); it is taken
  over only when its mtime is older than ``lock_timeout``, with a warning
  naming the previous holder.

Taking over renames the stale file aside, checks that what it moved is the
very file it judged (device, inode, content, mtime) and only then deletes
it; if a fresher lock was moved by mistake it is linked back. A release
removes the file the same way, so a holder that lost its lock never deletes
its successor's. A holder notices a lost lock at its next refresh and at
``publish`` (:class:`~ion.services.cache.errors.LockNotHeldError`).

What a SIGKILL leaves (issue 12) is removed by the next process that meets it:

- a lock file of a dead holder on an entry that is complete (killed between
  ``publish`` and the release): the next run is a cache hit and never locks,
  so :meth:`Cache.lookup <ion.services.cache.core.Cache.lookup>` judges a
  lock file it finds beside a complete entry and removes it if stale
  (:meth:`LockTable.remove_if_stale`, race-free like a takeover);
- the link method's content file and a lock file renamed aside (killed
  mid-step): both are named ``.<lock>.<host-hash>-<pid>.<random>.{tmp,stale}``
  after their maker, and :func:`_sweep` (run before each try at a lock, by a
  cache hit that sees them, and by clear/prune/reaper) removes those of a
  dead pid of this host at once, others once their ctime is older than
  ``lock_timeout``;
- an empty lock file (killed between its creation and its write) is taken
  over, or removed by a hit, once older than ``EMPTY_GRACE``.

Time: mtimes are written and compared in the injected clock's frame
(``os.utime`` with ``clock.seconds()``), so a ``task.Clock`` drives every
timeout in tests; in production the clock is the reactor, i.e. wall time,
and hosts sharing a cache need clocks that agree to well within
``lock_timeout``.

Host id (:func:`resolve_host_id`): ``ION_HOST_ID``, else ``/etc/machine-id``,
else a UUID kept in ``~/.config/ion/host-id``; never the hostname. A process
in a container's own pid namespace adds that namespace to the id, since
containers often share one machine-id but cannot see each other's pids.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import logging
import math
import os
import re
import secrets
import stat
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core.exceptions import ConnectionLostError
from ion.core.messaging.memory import MemoryTransport
from ion.core.tokens import random_hex
from ion.services.cache.entry import EntryKey
from ion.services.cache.errors import InvalidKeyError, LockTimeoutError

__all__ = [
    "PROCESS_STARTED",
    "this_host_id",
    "LockHolder",
    "CacheLock",
    "LockTable",
    "resolve_host_id",
    "pid_alive",
    "debris_tag",
    "debris_lock_name",
    "litter_present",
    "LOCK_METHODS",
    "BROKER_LOCK_PREFIX",
    "BrokerHold",
    "BrokerLocks",
    "broker_identity",
    "lock_transport_factory",
    "cache_identity",
    "CACHE_ID_FILE",
]

_log = Logger()

#: Wall-clock time this module was imported: a lock file with our own pid and
#: an earlier ``started`` was left by an earlier process that had our pid.
PROCESS_STARTED: Final = time.time()
#: The most lock files moved aside that a :class:`LockTable` keeps before deleting them while
#: locks are still held (see :meth:`LockTable.removal`).
ASIDE_KEPT: Final = 8192
#: Seconds a :class:`LockTable` must have held and waited for no lock before it deletes the lock
#: files moved aside (a deployment's fetches come and go; its end is a pause).
ASIDE_DELAY: Final = 1.0

#: Seconds an empty lock file is taken for one being created; older, its creator died between
#: creating and writing it (with ``lock_method: link`` a lock file is never empty).
EMPTY_GRACE: Final = 10.0
#: Inode of the initial pid namespace (the kernel's ``PROC_PID_INIT_INO``).
_INIT_PID_NS: Final = 0xEFFFFFFC
_O_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_O_TMPFILE: Final = getattr(os, "O_TMPFILE", 0)
_O_DIRECTORY: Final = getattr(os, "O_DIRECTORY", 0)


def _check_host_id(value: str, source: str) -> str:
    value = value.strip()
    if not value or "::" in value or any(c.isspace() for c in value) or len(value) > 200 \
            or value.startswith("broker="):
        raise InvalidKeyError(f"host id {value!r} from {source} is empty, too long, contains '::' or spaces, "
                              f"or starts with 'broker=' (a lock file's marker)")
    return value


def resolve_host_id(env: Mapping[str, str] | None = None, *,
                    machine_id_files: tuple[str, ...] = ("/etc/machine-id", "/var/lib/dbus/machine-id"),
                    config_home: Path | None = None, pid_ns: str = "/proc/self/ns/pid") -> str:
    """This machine's id for lock files: unique per machine, never the hostname alone.

    ``ION_HOST_ID`` if set (taken as is: tests use it to play several hosts);
    else the machine-id; else a UUID created once in ``$XDG_CONFIG_HOME/ion/host-id``
    (``~/.config/ion/host-id``). Blocking (small file reads): call it at startup.
    """
    env = os.environ if env is None else env
    if env.get("ION_HOST_ID"):
        return _check_host_id(env["ION_HOST_ID"], "ION_HOST_ID")
    base: str | None = None
    for name in machine_id_files:
        try:
            text = Path(name).read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            continue
        if text and text != "uninitialized":
            base = _check_host_id(text, name)
            break
    if base is None:
        home = config_home or Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        base = _stored_uuid(home / "ion" / "host-id")
    try:
        ns = os.stat(pid_ns).st_ino
    except OSError:
        ns = _INIT_PID_NS
    return base if ns == _INIT_PID_NS else f"{base}+pidns{ns}"


_host_ids: dict[str | None, str] = {}


def this_host_id() -> str:
    """:func:`resolve_host_id`, read once per value of ``ION_HOST_ID`` (it reads, and may create, small
    files: the reactor thread pays for it once per process, not per call)."""
    env = os.environ.get("ION_HOST_ID")
    host = _host_ids.get(env)
    if host is None:
        host = _host_ids[env] = resolve_host_id()
    return host


def _stored_uuid(path: Path) -> str:
    try:
        return _check_host_id(path.read_text(encoding="ascii"), str(path))
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.write_text(uuid.uuid4().hex + "\n", encoding="ascii")
    try:
        os.link(tmp, path)  # atomic: two first runs at once agree on one UUID
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return _check_host_id(path.read_text(encoding="ascii"), str(path))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:][:1] != b"Z"
    except (OSError, ValueError):
        return True


def debris_tag(host_id: str, pid: int) -> str:
    """``<host-hash>-<pid>``: who made a lock file's temporary or moved-aside file (see :func:`_sweep`)."""
    return f"{hashlib.sha256(host_id.encode()).hexdigest()[:8]}-{pid}"


#: Tag of a temporary file whose maker is not known (removed by age only).
_ANON_HOST: Final = "00000000"
#: The files that lock handling makes beside ``<version>.lock``, named after their maker so that
#: those of a process killed mid-step can be told apart (a dead pid of this host) and removed:
#: ``.<version>.lock.<host-hash>-<pid>.<random>.tmp`` (the link method's content file) and
#: ``.<version>.lock.<host-hash>-<pid>.<random>.stale`` (a lock file renamed aside to be removed).
_DEBRIS: Final = re.compile(r"^\.(?P<lock>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[0-9a-f]+\.(?:tmp|stale)$")


def _debris_path(path: Path, tag: str | None, kind: str) -> Path:
    return path.with_name(f".{path.name}.{tag or f'{_ANON_HOST}-{os.getpid()}'}.{random_hex(12)}.{kind}")


def _is_litter(lock_name: str, name: str) -> bool:
    """Whether ``name`` (in the lock's folder) is the lock file or one of its temporary files,
    in this version's naming or an earlier one's (``.<lock>.<hex>``, ``<lock>.stale-<hex>``)."""
    return name == lock_name or name.startswith(f".{lock_name}.") or name.startswith(f"{lock_name}.stale-")


_OLD_TMP: Final = re.compile(r"^\.(?P<lock>.+)\.[0-9a-f]{16}$")
_OLD_ASIDE: Final = re.compile(r"^(?P<lock>.+)\.stale-[0-9a-f]{12}$")


def debris_lock_name(name: str, suffix: str = ".lock") -> str | None:
    """The name of the lock file whose temporary or moved-aside file ``name`` is, or None."""
    for pattern in (_DEBRIS, _OLD_TMP, _OLD_ASIDE):
        m = pattern.match(name)
        if m is not None and m["lock"].endswith(suffix):
            return m["lock"]
    return None


def litter_present(path: Path) -> bool:
    """Whether the lock file ``path`` or a temporary file of it exists (one ``listdir``)."""
    try:
        return any(_is_litter(path.name, n) for n in os.listdir(path.parent))
    except OSError:
        return False


def _sweep(path: Path, host_tag: str, max_age: float) -> list[Path]:
    """Remove what killed processes left beside the lock file ``path``: temporary and moved-aside
    files of a dead pid of this host (or of an earlier process that had our pid) at once, any
    other once its ctime (set by the create or the rename that made it) is older than ``max_age``
    seconds -- such a file lives microseconds in a live process (a lock file a publish moved aside:
    until that process holds no lock any more, see :meth:`LockTable.removal`). Never the lock file itself."""
    removed: list[Path] = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if name == path.name or not _is_litter(path.name, name):
            continue
        full = path.parent / name
        m = _DEBRIS.match(name)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if time.time() - st.st_ctime <= max_age:
            if m is None or m["lock"] != path.name or m["host"] != host_tag:
                continue  # another host's, or unnamed: by age only
            pid = int(m["pid"])
            if pid == os.getpid():
                if st.st_ctime >= PROCESS_STARTED:
                    continue  # this process's, mid-step in another thread
            elif pid_alive(pid):
                continue  # a live process's, mid-step
        try:
            os.unlink(full)
        except FileNotFoundError:
            continue
        removed.append(full)
    return removed


#: Before the host id in a lock file: the marker of the broker lock its holder held (see :class:`LockHolder`).
_MARKER_PREFIX: Final = "broker="


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock file: ``host_id::pid::started``, written ``broker=<marker>@host_id::pid::started``
    when the holder also held the entry's broker lock (:class:`BrokerLocks`) while it held the file.

    The marker goes in front of the host id, not after the three fields: a process of a release
    before broker locks (a host not upgraded yet, its ``ion-deploy``) then still reads three
    fields, a holder of another host that it waits for (``lock_timeout``), where a fourth field
    would make the file "corrupt" to it, taken over at once from a live holder. A fourth field
    ``::broker=<marker>`` is read too.
    """

    host_id: str
    pid: int
    started: float
    #: :meth:`BrokerLocks.marker` of the broker lock the holder held, or None (file lock only).
    broker: str | None = None

    def render(self) -> str:
        host = self.host_id if self.broker is None else f"{_MARKER_PREFIX}{self.broker}@{self.host_id}"
        return f"{host}::{self.pid}::{self.started:.6f}"

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder written in a lock file, or None if the text is not one."""
        parts = text.strip().split("::")
        broker: str | None = None
        if len(parts) == 4 and parts[3].startswith("broker="):
            broker = parts.pop()[len("broker="):]
            if not broker or any(c.isspace() for c in broker):
                return None
        if len(parts) != 3:
            return None
        host, pid_s, started_s = parts
        if broker is None and host.startswith(_MARKER_PREFIX):
            broker, at, host = host[len(_MARKER_PREFIX):].partition("@")
            if not at or not broker or any(c.isspace() for c in broker):
                return None
        try:
            pid, started = int(pid_s), float(started_s)
        except ValueError:
            return None
        if not host or any(c.isspace() for c in host) or pid <= 0 or not math.isfinite(started):
            return None
        return cls(host, pid, started, broker)

    def __str__(self) -> str:
        since = datetime.datetime.fromtimestamp(self.started, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        via = "" if self.broker is None else ", with the broker lock"
        return f"host {self.host_id} pid {self.pid} (since {since} UTC{via})"


# -- blocking helpers (run in the BlockingPool) -----------------------------------------------
@dataclass(frozen=True)
class _Observed:
    """A lock file as a contender saw it."""

    raw: bytes
    dev: int
    ino: int
    mtime_ns: int

    @property
    def holder(self) -> LockHolder | None:
        return LockHolder.parse(self.raw.decode("utf-8", "replace"))

    def describe(self) -> str:
        holder = self.holder
        if holder is not None:
            return str(holder)
        return f"unreadable content {self.raw[:60]!r}"


@dataclass
class _Attempt:
    """What one try at the lock file found."""

    acquired: bool
    dev: int = 0
    ino: int = 0
    observed: _Observed | None = None
    taken_over: list[tuple[_Observed, str]] = field(default_factory=list)
    displaced: list[_Observed] = field(default_factory=list)
    swept: list[Path] = field(default_factory=list)
    #: Acquired with a ``then``: what it answered (or raised), in a tuple.
    then: tuple[Any] | None = None


def _observe(path: Path) -> _Observed | None:
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    return _Observed(raw, st.st_dev, st.st_ino, st.st_mtime_ns)


_UNSUPPORTED: Final = "unsupported"


def _create_unnamed(path: Path, content: bytes, now: float) -> tuple[int, int] | str | None:
    """Like :func:`_create`, never visible without its content: an unnamed file (``O_TMPFILE``) is
    written, then linked to the lock name (``linkat``, which fails if the name exists). A process
    killed at any point leaves nothing: the unnamed file goes with its last descriptor.
    ``_UNSUPPORTED`` where the filesystem or the system has no such thing (NFS, FUSE, not Linux)."""
    if not _O_TMPFILE or os.link not in os.supports_dir_fd:
        return _UNSUPPORTED
    folder = os.open(path.parent, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)  # FileNotFoundError: made by the caller
    try:
        try:
            fd = os.open(path.parent, os.O_WRONLY | _O_TMPFILE | _O_CLOEXEC, 0o644)
        except OSError:
            return _UNSUPPORTED  # EOPNOTSUPP (the filesystem), EISDIR or EINVAL (the kernel)
        try:
            os.write(fd, content)
            os.utime(fd, (now, now))
            try:
                # linkat(AT_FDCWD, "/proc/self/fd/N", folder, name, AT_SYMLINK_FOLLOW): fails if the name
                # exists, like O_EXCL. (A dir fd makes CPython call linkat; link() would give EXDEV.)
                os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=folder, follow_symlinks=True)
            except FileExistsError:
                return None
            except OSError:
                return _UNSUPPORTED  # no /proc, or a filesystem that links no unnamed file
            st = os.fstat(fd)
            return st.st_dev, st.st_ino
        finally:
            os.close(fd)
    finally:
        os.close(folder)


def _create(path: Path, content: bytes, now: float) -> tuple[int, int] | None:
    made = _create_unnamed(path, content, now)
    if not isinstance(made, str):
        return made
    # O_EXCL, then the content: a file seen empty is one being written (or its writer died: EMPTY_GRACE).
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
    except FileExistsError:
        return None
    try:
        os.write(fd, content)  # one small write: readers see all of it or an empty file
        os.utime(fd, (now, now))
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return st.st_dev, st.st_ino


def _create_linked(path: Path, content: bytes, now: float) -> tuple[int, int] | None:
    """Like :func:`_create`, by the link-count method (``lock_method: link``)."""
    holder = LockHolder.parse(content.decode("utf-8", "replace"))
    tmp = _debris_path(path, debris_tag(holder.host_id, holder.pid) if holder else None, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
    try:
        try:
            os.write(fd, content)
            os.utime(fd, (now, now))
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileNotFoundError:
            raise
        except OSError:
            pass  # EEXIST, or a reply lost on NFS: the link count says which
        st = os.stat(tmp)
        return (st.st_dev, st.st_ino) if st.st_nlink == 2 else None
    finally:
        tmp.unlink(missing_ok=True)


#: How a lock file is created, by the ``lock_method`` setting.
LOCK_METHODS: Final[dict[str, Callable[[Path, bytes, float], tuple[int, int] | None]]] = {
    "excl": _create, "link": _create_linked}


def _remove_if(path: Path, dev: int, ino: int, raw: bytes, mtime_ns: int | None = None, *,
               tag: str | None = None, keep_aside: Callable[[Path], Any] | None = None) -> str:
    """Remove ``path`` only if it is this very file; ``removed``, ``gone``, ``kept`` or ``displaced``.

    Renamed aside first and checked there, so a lock file that another process
    re-created meanwhile is never deleted in its place. The aside name carries
    ``tag`` (:func:`debris_tag` of the remover), so that what a remover killed
    right after the rename leaves is recognised and swept (:func:`_sweep`).

    ``keep_aside``: once removed (renamed aside), the file moved aside is handed to it instead of
    deleted (:meth:`LockTable.removal`: deleted later, with others); the lock is free either way.
    """
    removed = False

    def same(obs: _Observed | None) -> bool:
        return obs is not None and (obs.dev, obs.ino, obs.raw) == (dev, ino, raw) and (
            mtime_ns is None or obs.mtime_ns == mtime_ns)

    current = _observe(path)
    if current is None:
        return "gone"
    if not same(current):
        return "kept"
    aside = _debris_path(path, tag, "stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return "gone"
    try:
        if same(_observe(aside)):
            removed = True
            return "removed"
        # It changed between our check and the rename (refreshed, or re-created): put it back.
        try:
            os.link(aside, path)
        except FileExistsError:
            return "displaced"
        except FileNotFoundError:
            return "gone"  # swept meanwhile: it was stale
        return "kept"
    finally:
        if removed and keep_aside is not None:
            keep_aside(aside)
        else:
            aside.unlink(missing_ok=True)


def _unlink_each(paths: list[Path]) -> list[Path]:
    """Delete the files ``paths`` (a missing one is skipped); those that could not be deleted."""
    failed = []
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            failed.append(path)
    return failed


def _owned(path: Path, dev: int, ino: int, raw: bytes) -> bool:
    obs = _observe(path)
    return obs is not None and (obs.dev, obs.ino, obs.raw) == (dev, ino, raw)


def _refresh(path: Path, dev: int, ino: int, raw: bytes, now: float) -> bool:
    if not _owned(path, dev, ino, raw):
        return False
    os.utime(path, (now, now), follow_symlinks=False)
    return True


#: The outcome of a :meth:`LockTable.removal` of a lock whose file is another holder's now (not touched).
_NOT_OURS: Final = "not ours"


def _removed_or_failure(path: Path, dev: int, ino: int, raw: bytes, tag: str | None,
                        keep_aside: Callable[[Path], Any] | None = None) -> Any:
    """:func:`_remove_if`'s outcome, or what it raised (at the end of a job whose own work is done)."""
    try:
        return _remove_if(path, dev, ino, raw, tag=tag, keep_aside=keep_aside)
    except Exception as exc:
        return exc


def _call_caught(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except Exception as exc:
        return exc
    return None


def _remove_then(path: Path, dev: int, ino: int, raw: bytes, tag: str | None,
                 tidy: Callable[[], Any] | None) -> tuple[str, BaseException | None]:
    """Release's one pool job: the lock file removed if it is ours (:func:`_remove_if`), then ``tidy()``;
    the outcome and what ``tidy`` raised."""
    outcome = _remove_if(path, dev, ino, raw, tag=tag)
    return outcome, _call_caught(tidy) if tidy is not None else None


def _try_acquire(path: Path, content: bytes, now: float,
                 judge: Callable[[_Observed, float], str | None], method: str = "excl",
                 sweep: Callable[[Path], list[Path]] | None = None,
                 then: Callable[[float], Any] | None = None) -> _Attempt:
    attempt = _Attempt(False)
    create = LOCK_METHODS[method]
    holder = LockHolder.parse(content.decode("utf-8", "replace"))
    tag = debris_tag(holder.host_id, holder.pid) if holder else None
    if sweep is not None:
        attempt.swept = sweep(path)
    for _ in range(8):
        try:
            made = create(path, content, now)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)  # new entry, or pruned meanwhile
            continue
        if made is not None:
            attempt.acquired, (attempt.dev, attempt.ino) = True, made
            if then is not None:  # the lock's first use, in the same pool job
                try:
                    attempt.then = (then(now),)
                except Exception as exc:
                    attempt.then = (exc,)
            return attempt
        obs = _observe(path)
        if obs is None:
            continue  # released between our create and our read
        attempt.observed = obs
        reason = judge(obs, now)
        if reason is None:
            return attempt
        outcome = _remove_if(path, obs.dev, obs.ino, obs.raw, obs.mtime_ns, tag=tag)
        if outcome == "removed":
            attempt.taken_over.append((obs, reason))
        elif outcome == "displaced":
            attempt.displaced.append(obs)
    return attempt


# -- the lock objects ---------------------------------------------------------------------------
class CacheLock:
    """A held lock of one entry, from :meth:`LockTable.acquire` until :meth:`LockTable.release`.

    :ivar key: the entry.
    :ivar path: the lock file.
    :ivar holder: what the lock file says (this host id, this pid, when).
    :ivar id: a random token naming this hold (the service hands it out over RPC).
    :ivar held: True until released.
    :ivar lost: True once another process took the lock over (we failed to
        refresh it within ``lock_timeout``), or its broker lock was lost with the connection
        to the broker (:attr:`broker_lost`); the entry may no longer be published with it.
    :ivar broker: the broker lock held with the lock file (:class:`BrokerLocks`), or None.
    """

    def __init__(self, key: EntryKey, path: Path, holder: LockHolder, dev: int, ino: int, acquired_at: float) -> None:
        self.key = key
        self.path = path
        self.holder = holder
        self.id = random_hex(32)
        self.acquired_at = acquired_at
        self.held = True
        self.lost = False
        self._dev = dev
        self._ino = ino
        self._raw = holder.render().encode()
        self._refresh_call: IDelayedCall | None = None
        self.broker: BrokerHold | None = None
        #: True when the lock was lost with its broker lock (the file may still be ours: removed at release).
        self.broker_lost = False
        #: True while a pool job that ends by removing the file runs (:meth:`LockTable.removal`): no refresh.
        self.releasing = False
        #: What the ``then`` of :meth:`LockTable.acquire` answered (or raised), in a tuple; None without one.
        self.then: tuple[Any] | None = None
        #: ``Cache.lock(lookup=True)``: the entry as the lookup made with the lock found it, in a tuple.
        self.looked_up: tuple[Any] | None = None

    @property
    def active(self) -> bool:
        """Held and not lost: what publishing needs."""
        return self.held and not self.lost

    def __repr__(self) -> str:
        state = "lost" if self.lost else "held" if self.held else "released"
        return f"<CacheLock {self.key} {state} {self.path}>"


class _Acquisition:
    """One pending :meth:`LockTable.acquire`: cancellation reaches what it is waiting on."""

    def __init__(self) -> None:
        self.cancelled = False
        self.waiting: defer.Deferred[Any] | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.waiting is not None and not self.waiting.called:
            self.waiting.cancel()


#: Names of the broker lock queues: ``ion.cache.lock.<sha256 of the cache's id and the lock file's path in it>``.
BROKER_LOCK_PREFIX: Final = "ion.cache.lock."


def _resource_locked(exc: BaseException) -> bool:
    """Whether a declare was refused because another connection holds the exclusive queue (405)."""
    return getattr(exc, "reply_code", None) == 405 or "RESOURCE_LOCKED" in str(exc)


class _LockRefusalsAreExpected(logging.Filter):
    """Drops pika's warning for each ``RESOURCE_LOCKED`` refusal of a broker lock queue: a waiter
    is refused at every retry (:class:`BrokerLocks`), and says itself what it waits for."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() if record.args else str(record.msg)
        return not ("RESOURCE_LOCKED" in text and BROKER_LOCK_PREFIX in text)


def _quiet_pika() -> None:
    log = logging.getLogger("pika.channel")
    if not any(isinstance(f, _LockRefusalsAreExpected) for f in log.filters):
        log.addFilter(_LockRefusalsAreExpected())


#: RabbitMQ's default ``cluster_name``: the name of the node answering (``rabbit@host``), which
#: differs from node to node of one cluster until ``rabbitmqctl set_cluster_name`` names it.
_NODE_NAME = re.compile(r"[^@\s]+@[^@\s]+")


def broker_identity(transport: Any) -> str | None:
    """What names the broker a transport is connected to, the same from every host and every node
    of one broker (or cluster) and vhost: ``amqp:<cluster_name>/<vhost>`` for a cluster named by
    ``rabbitmqctl set_cluster_name``; ``amqp:@/<vhost>`` where ``cluster_name`` is RabbitMQ's
    default, a node's name (``rabbit@host``): that default differs between the nodes of one
    cluster, so it cannot tell one broker from another (two unnamed brokers with one vhost name
    and one shared cache then count as one: a takeover too early costs a second download, the
    first holder's publish being refused). ``memory:<pid>:<id>`` for the embedded broker (of
    this process only). None when it cannot be told: then no lock file is marked (see
    :meth:`BrokerLocks.marker`), and takeovers wait for ``lock_timeout`` as without a broker."""
    if isinstance(transport, MemoryTransport):
        return f"memory:{os.getpid()}:{id(transport.broker)}"
    props = getattr(transport, "server_properties", None)  # AmqpTransport's
    if not isinstance(props, Mapping):
        return None
    name = props.get("cluster_name")
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    url = getattr(transport, "url", None)
    if not name or url is None:
        return None
    if _NODE_NAME.fullmatch(name):
        name = "@"  # (unnamed: see above)
    return f"amqp:{name}/{url.vhost}"


class BrokerHold:
    """One broker lock held (an exclusive queue declared on :attr:`BrokerLocks.transport`).

    :ivar queue: the queue's name.
    :ivar marker: written in the lock file taken with it (:meth:`BrokerLocks.marker`), or None.
    :ivar lost: True once the connection that holds it was lost: the broker has deleted the
        queue, and another host may hold it now.
    :ivar on_lost: called once if it is lost while held.
    """

    def __init__(self, queue: str, marker: str | None, transport: Any) -> None:
        self.queue = queue
        self.marker = marker
        self.lost = False
        self.on_lost: Callable[[], None] | None = None
        self.transport = transport

    def __repr__(self) -> str:
        return f"<BrokerHold {self.queue}{' lost' if self.lost else ''}>"


class BrokerLocks:
    """Entry locks through the broker, so that the lock of a host that dies is free within the
    broker's detection time instead of ``lock_timeout`` (issue 18).

    A lock is an **exclusive queue** ``ion.cache.lock.<hash>`` (:meth:`queue_name`): declaring it
    is holding it; another connection's declare is refused with ``RESOURCE_LOCKED`` (405) and
    tried again with a backoff from ``poll_start`` to ``poll_max`` (50 ms to 0.5 s) on the clock;
    releasing deletes it. The broker deletes an exclusive queue when the connection that declared
    it closes: at once when the holder's process dies (its socket is closed); once it has missed
    2-3 AMQP heartbeats (5 s each by default, ``ion.core.messaging: heartbeat``) when its host
    falls silent.

    The locks go over a **connection of their own** (``connect`` makes it, lazily, and again
    after a loss), without reconnection: a lost connection means lost locks -- every hold on it
    is marked lost (:attr:`BrokerHold.lost`, and its :class:`CacheLock` with it) -- and must not
    re-declare them behind the holder's back; its 405 refusals (which close a channel) never
    touch the container's own channels either.

    The broker lock is the authority across hosts: a waiter that gets it knows that whoever held
    it before is gone from the broker, so a lock file whose holder wrote the same
    :meth:`marker` may be taken over at once (:meth:`LockTable.judge`). The lock file itself is
    still taken, for processes of one host and for ``ion-deploy`` without a broker.

    Broker unreachable (no connection can be made, or a declare fails otherwise than with 405):
    the acquisition goes on with the lock file alone, as without a broker (a warning says so),
    and that file carries no marker, so nobody takes it over before ``lock_timeout``. After a
    failed connection, the locks taken within ``retry_connect`` seconds (10) go to their files at
    once, without waiting for another attempt to fail.

    :param connect: makes a new, unconnected transport to the broker (see :func:`lock_transport_factory`).
    :param clock: schedules the retries.
    """

    _log = _log

    def __init__(self, connect: Callable[[], Any], clock: IReactorTime, *, poll_start: float = 0.05,
                 poll_max: float = 0.5, retry_connect: float = 10.0) -> None:
        _quiet_pika()
        self.connect = connect
        self.clock = clock
        self.poll_start = poll_start
        self.poll_max = poll_max
        self.retry_connect = retry_connect
        #: Until when (clock seconds) a failed connection is not tried again, and why it failed.
        self._down_until = -math.inf
        self._down_reason = ""
        #: The connection the locks are held on, once made (None again after a loss).
        self.transport: Any = None
        self._waiters: list[defer.Deferred[Any]] | None = None
        #: Queue name -> the hold on it.
        self.held: dict[str, BrokerHold] = {}
        self.closed = False

    @staticmethod
    def queue_name(key: EntryKey, path: Path, cache_id: str | None = None) -> str:
        """The queue of the lock file ``path`` of ``key`` in the cache ``cache_id``
        (:func:`cache_identity`): named after the cache and the lock file's place in it (the
        same on every host sharing that cache, whatever the mount point; another on a host
        with a cache of its own), hashed to fit a queue name."""
        rel = f"{key.relpath.parent}/{path.name}"
        if cache_id is not None:
            rel = f"{cache_id}\0{rel}"
        return BROKER_LOCK_PREFIX + hashlib.sha256(rel.encode()).hexdigest()[:40]

    def marker(self, queue: str, transport: Any) -> str | None:
        """What a lock file taken under the broker lock ``queue`` says (``broker=<marker>@`` before its host id):
        a hash of the broker's identity (:func:`broker_identity`) and the queue; None if the
        broker cannot be told."""
        ident = broker_identity(transport)
        if ident is None:
            return None
        return hashlib.sha256(f"{ident}\0{queue}".encode()).hexdigest()[:32]

    # -- the connection -------------------------------------------------------------------------
    async def _transport(self) -> Any:
        """The lock connection, made now if there is none (one attempt shared by every caller)."""
        current = self.transport
        if current is not None:
            if getattr(current, "connected", not getattr(current, "closed", False)):
                return current
            self._connection_event(current, "lost", "the connection was closed")
        d: defer.Deferred[Any] = defer.Deferred()
        if self._waiters is None:
            self._waiters = [d]
            defer.ensureDeferred(self._open()).addBoth(self._opened)
        else:
            self._waiters.append(d)
        return await d

    async def _open(self) -> Any:
        transport = self.connect()
        await transport.connect()
        if self.closed:
            await transport.close()
            raise defer.CancelledError()
        transport.add_connection_listener(lambda event, reason: self._connection_event(transport, event, reason))
        self.transport = transport
        return transport

    def _opened(self, result: Any) -> None:
        if isinstance(result, Failure):
            self._down_until = self.clock.seconds() + self.retry_connect
            self._down_reason = result.getErrorMessage() or type(result.value).__name__
        waiters, self._waiters = self._waiters or [], None
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _connection_event(self, transport: Any, event: str, reason: str | None) -> None:
        if event != "lost" or transport is not self.transport:
            return
        self.transport = None
        lost = [hold for hold in self.held.values() if hold.transport is transport]
        for hold in lost:
            del self.held[hold.queue]
            hold.lost = True
            self._log.error("lost the broker lock {queue}: the connection to the broker was lost ({reason}); "
                            "another host may take the lock over now", queue=hold.queue, reason=reason)
            if hold.on_lost is not None:
                try:
                    hold.on_lost()
                except Exception:
                    self._log.failure("handling the loss of the broker lock {queue}", queue=hold.queue)
        d = defer.maybeDeferred(transport.close)
        d.addErrback(lambda f: None)

    # -- holding --------------------------------------------------------------------------------
    async def acquire(self, queue: str, deadline: float, acq: _Acquisition, entry: str,
                      timeout: float) -> BrokerHold | None:
        """Hold the broker lock ``queue``: the :class:`BrokerHold`, or None when the broker cannot be
        asked (go on with the lock file alone; logged).

        :raises LockTimeoutError: at ``deadline`` (clock seconds; ``timeout`` after the start),
            naming ``entry``.
        :raises defer.CancelledError: once ``acq`` is cancelled (nothing is left held).
        """
        delay = self.poll_start
        while True:
            if acq.cancelled or self.closed:
                raise defer.CancelledError()
            if self.transport is None and self.clock.seconds() < self._down_until:
                self._log.warn("not taking the broker lock {queue} of {entry}: the broker could not be reached "
                               "({err}); going on with the lock file alone", queue=queue, entry=entry,
                               err=self._down_reason)
                return None
            try:
                transport = await self._transport()
                await transport.declare_queue(queue, exclusive=True)
            except defer.CancelledError:
                raise
            except Exception as exc:
                if not _resource_locked(exc):
                    self._log.warn("could not take the broker lock {queue} of {entry}: {err}; going on with the "
                                   "lock file alone (taken over only after lock_timeout if its holder dies)",
                                   queue=queue, entry=entry, err=str(exc) or type(exc).__name__)
                    return None
            else:
                hold = BrokerHold(queue, self.marker(queue, transport), transport)
                self.held[queue] = hold
                if acq.cancelled or self.closed:
                    await self.release(hold)
                    raise defer.CancelledError()
                return hold
            now = self.clock.seconds()
            if now >= deadline:
                raise LockTimeoutError(f"gave up waiting for the lock of {entry} after {timeout:g} s: its broker "
                                       f"lock {queue} is held by another host")
            acq.waiting = task.deferLater(self.clock, min(delay, deadline - now), lambda: None)
            try:
                await acq.waiting
            finally:
                acq.waiting = None
            delay = min(delay * 2, self.poll_max)

    def release(self, hold: BrokerHold) -> defer.Deferred[None]:
        """Let the next waiter have the lock: delete the queue (never fails; problems are logged)."""
        if self.held.get(hold.queue) is hold:
            del self.held[hold.queue]
        if hold.lost:
            return defer.succeed(None)  # gone with its connection
        hold.lost = True
        d = defer.maybeDeferred(hold.transport.delete_queue, hold.queue)

        def failed(f: Failure) -> None:
            # A lost connection took the queue with it; anything else is worth a line.
            if not f.check(ConnectionLostError):
                self._log.warn("could not release the broker lock {queue}: {err}", queue=hold.queue,
                               err=f.getErrorMessage())

        return d.addErrback(failed)

    def close(self) -> defer.Deferred[None]:
        """Release every broker lock and close the connection (the Cache's close)."""
        self.closed = True
        transport, self.transport = self.transport, None
        holds = list(self.held.values())
        self.held.clear()
        for hold in holds:
            hold.lost = True
        if transport is None:
            return defer.succeed(None)
        return defer.maybeDeferred(transport.close).addErrback(lambda f: None)


#: In the cache root: the cache's random id, which names its broker locks (:func:`cache_identity`).
CACHE_ID_FILE: Final = ".cache-id"


def cache_identity(root: Path) -> str:
    """The id of the cache at ``root`` (blocking): 32 hex read from ``<root>/.cache-id``, made
    once by whoever comes first (written aside, then hard-linked: exactly one maker wins).

    Hosts sharing one cache folder read the same id whatever their mount point; hosts with
    caches of their own have different ids, so their broker locks (:meth:`BrokerLocks.queue_name`)
    never hold each other up.
    """
    path = root / CACHE_ID_FILE
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        else:
            try:
                text = os.read(fd, 256).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            if re.fullmatch(r"[0-9a-f]{32}", text):
                return text
            return hashlib.sha256(text.encode()).hexdigest()[:32]  # not ours, but the same for every host
        os.makedirs(root, exist_ok=True)
        token = secrets.token_hex(16)
        tmp = root / f"{CACHE_ID_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, f"{token}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, path)
            return token
        except FileExistsError:
            continue  # another host made it first: read theirs
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    raise OSError(f"cannot read or make {path}")


def lock_transport_factory(transport: Any) -> Callable[[], Any] | None:
    """How to open the lock connection (:class:`BrokerLocks`) to the broker of a container's
    ``transport``: the same addresses and login, no reconnection; None for a transport of
    another kind."""
    if isinstance(transport, MemoryTransport):
        broker, user = transport.broker, transport.user
        return lambda: broker.connect(user)
    try:
        from ion.core.messaging.amqp import AmqpTransport
    except ImportError:  # pragma: no cover - pika is a dependency
        return None
    if isinstance(transport, AmqpTransport):
        amqp = transport
        return lambda: AmqpTransport(list(amqp.urls), reactor=amqp.reactor, reconnect=False, heartbeat=amqp.heartbeat,
                                     connect_timeout=min(amqp.connect_timeout, 5.0), confirm=False)
    return None


class LockTable:
    """The entry locks of one :class:`~ion.services.cache.core.Cache`.

    :param host_id: written in lock files; see :func:`resolve_host_id`.
    :param lock_timeout: seconds without refresh after which a lock file of a
        live or remote holder may be taken over.
    :param clock: schedules polls and refreshes; its ``seconds()`` is the mtime frame.
    :param pool: runs the blocking file work (``run(fn, *args)`` -> Deferred).
    :param wait_timeout: default seconds :meth:`acquire` waits (2 x lock_timeout:
        long enough to outwait a stale lock).
    :param refresh_interval: seconds between the holder's mtime refreshes (lock_timeout / 4).
    :param broker: take each lock through the broker as well (:class:`BrokerLocks`), before its
        lock file; None: lock files only (``ion-deploy`` without a broker).
    """

    _log = _log

    def __init__(self, *, host_id: str, lock_timeout: float, clock: IReactorTime, pool: Any,
                 wait_timeout: float | None = None, refresh_interval: float | None = None,
                 poll_start: float = 0.05, poll_max: float = 1.0, method: str = "excl",
                 broker: BrokerLocks | None = None, root: Path | None = None) -> None:
        if lock_timeout <= 0:
            raise InvalidKeyError(f"lock_timeout must be positive, not {lock_timeout!r}")
        if method not in LOCK_METHODS:
            raise InvalidKeyError(f"lock_method must be one of {', '.join(LOCK_METHODS)}, not {method!r}")
        self.method = method
        self.broker = broker
        #: The cache root, whose id names the broker locks (:func:`cache_identity`); read once.
        self.root = root
        self._cache_id: str | None = None
        self.host_id = _check_host_id(host_id, "the host_id argument")
        self.lock_timeout = float(lock_timeout)
        self.clock = clock
        self.pool = pool
        self.wait_timeout = 2 * self.lock_timeout if wait_timeout is None else float(wait_timeout)
        self.refresh_interval = self.lock_timeout / 4 if refresh_interval is None else float(refresh_interval)
        self.poll_start = poll_start
        self.poll_max = poll_max
        #: Names this process's temporary and moved-aside files (see :func:`_sweep`).
        self.tag = debris_tag(self.host_id, os.getpid())
        self._host_tag = self.tag.split("-", 1)[0]
        #: Lock file path -> the lock this table holds on it.
        self.held: dict[Path, CacheLock] = {}
        self._local: dict[Path, defer.DeferredLock] = {}
        self._pending: set[_Acquisition] = set()
        #: Lock files a publish moved aside (:meth:`removal`), to delete once no lock is held or
        #: waited for (:meth:`_delete_aside`); appended to by pool threads.
        self._aside: deque[Path] = deque()
        #: When a lock was last taken, waited for or released (:meth:`_delete_aside` waits for a pause).
        self._last_busy = 0.0
        self._aside_call: IDelayedCall | None = None

    # -- judging --------------------------------------------------------------------------
    def judge(self, observed: _Observed, now: float, broker: str | None = None) -> str | None:
        """Why a lock file held by someone else may be taken over now, or None to wait.

        ``broker``: the marker of the broker lock the caller holds (:meth:`BrokerLocks.marker`);
        a holder that wrote the same one held that broker lock, so it is gone from the broker
        (dead, or cut off and about to find out): taken over at once.

        Runs in a pool thread (it checks pids); reads only immutable settings.
        """
        age = now - observed.mtime_ns / 1e9
        if not observed.raw.strip():
            # Being created (its content follows in one write, microseconds later) -- or its
            # creator died right then, and nobody will ever write or refresh it.
            if age > EMPTY_GRACE:
                return f"an empty lock file {age:.0f} s old (its creator died before writing it)"
            return None
        holder = observed.holder
        if holder is None:
            return "corrupt lock file (treated as stale)"
        if broker is not None and holder.broker == broker:
            return "this process holds the broker lock its holder held (the holder's broker connection is gone)"
        if holder.host_id == self.host_id:
            if holder.pid == os.getpid():
                if holder.started < PROCESS_STARTED:
                    return f"left by an earlier process that had pid {holder.pid}"
            elif not pid_alive(holder.pid):
                return f"its pid {holder.pid} is dead on this host"
        if age > self.lock_timeout:
            return f"not refreshed for {age:.0f} s (lock_timeout {self.lock_timeout:g} s)"
        return None

    def sweep(self, path: Path) -> list[Path]:
        """Remove the temporary files killed processes left beside ``path`` (blocking; see :func:`_sweep`)."""
        return _sweep(path, self._host_tag, self.lock_timeout)

    # -- acquiring ----------------------------------------------------------------------------
    def acquire(self, key: EntryKey, path: Path, timeout: float | None = None, *,
                then: Callable[[float], Any] | None = None) -> defer.Deferred[CacheLock]:
        """Take the lock of ``key`` (lock file ``path``); fires with a :class:`CacheLock`.

        Waits at most ``timeout`` seconds (default ``wait_timeout``; ``0``: one
        try; ``math.inf``: no limit), then fails with
        :class:`~ion.services.cache.errors.LockTimeoutError` naming the holder.
        Cancelling the Deferred stops the wait; a lock file created meanwhile
        is removed again, so a cancelled acquisition never leaks a lock.

        ``then(now)``: a blocking call made once the lock file is ours, in the pool job that took
        it (the lock's first use: a lookup of the entry); its answer (or what it raised) is the
        lock's :attr:`~CacheLock.then`. It must leave nothing to undo: a cancelled acquisition
        removes the lock file and drops that answer.
        """
        acq = _Acquisition()
        self._pending.add(acq)
        self._last_busy = self.clock.seconds()
        outer: defer.Deferred[CacheLock] = defer.Deferred(lambda _: acq.cancel())
        inner = defer.Deferred.fromCoroutine(
            self._acquire(key, path, self.wait_timeout if timeout is None else float(timeout), acq, then))

        def deliver(result: Any) -> None:
            self._pending.discard(acq)
            if outer.called:  # cancelled while a blocking step ran: undo what it did
                if isinstance(result, CacheLock):
                    self.release(result)
                elif isinstance(result, Failure) and not result.check(defer.CancelledError):
                    self._log.failure("lock of {entry} failed after it was cancelled", result, entry=str(key))
                return
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

        inner.addBoth(deliver)
        return outer

    async def _acquire(self, key: EntryKey, path: Path, timeout: float, acq: _Acquisition,
                       then: Callable[[float], Any] | None = None) -> CacheLock:
        start = self.clock.seconds()
        deadline = start + timeout if math.isfinite(timeout) else math.inf
        local = self._local.get(path)
        if local is None:
            local = self._local[path] = defer.DeferredLock()
        if local.locked and timeout <= 0:
            raise LockTimeoutError(f"the lock of {key} ({path}) is held by another fetch in this process")
        waiting = local.acquire()
        if not waiting.called and math.isfinite(deadline):
            waiting.addTimeout(deadline - start, self.clock)
        acq.waiting = waiting
        try:
            await waiting
        except defer.TimeoutError:
            self._forget_local(path)
            raise LockTimeoutError(
                f"gave up waiting for the lock of {key} after {timeout:g} s: {path} is held by another "
                f"fetch in this process") from None
        except BaseException:
            self._forget_local(path)
            raise
        finally:
            acq.waiting = None
        try:
            hold: BrokerHold | None = None
            if self.broker is not None:
                queue = BrokerLocks.queue_name(key, path, await self._cache_identity())
                hold = await self.broker.acquire(queue, deadline, acq, str(key), timeout)
            try:
                return await self._acquire_file(key, path, timeout, deadline, acq, hold, then)
            except BaseException:
                if hold is not None and self.broker is not None:
                    self.broker.release(hold)
                raise
        except BaseException:
            local.release()
            self._forget_local(path)
            raise

    async def _acquire_file(self, key: EntryKey, path: Path, timeout: float, deadline: float,
                            acq: _Acquisition, hold: BrokerHold | None = None,
                            then: Callable[[float], Any] | None = None) -> CacheLock:
        delay = self.poll_start
        while True:
            if acq.cancelled:
                raise defer.CancelledError()
            marker = hold.marker if hold is not None and not hold.lost else None
            holder = LockHolder(self.host_id, os.getpid(), time.time(), marker)
            attempt: _Attempt = await self.pool.run(
                _try_acquire, path, holder.render().encode(), self.clock.seconds(),
                functools.partial(self.judge, broker=marker), self.method, self.sweep, then)
            self._log_swept(attempt.swept)
            for obs, reason in attempt.taken_over:
                self._log.warn("took over the lock of {entry} ({path}) from {previous}: {reason}",
                               entry=str(key), path=str(path), previous=obs.describe(), reason=reason)
            for obs in attempt.displaced:
                self._log.error("moved the fresh lock {path} of {previous} aside and could not put it back; "
                                "that holder will find its lock lost", path=str(path), previous=obs.describe())
            if attempt.acquired:
                lock = CacheLock(key, path, holder, attempt.dev, attempt.ino, self.clock.seconds())
                lock.then = attempt.then
                if acq.cancelled:
                    await self._remove_file(lock)
                    raise defer.CancelledError()
                self.held[path] = lock
                if hold is not None:
                    lock.broker = hold
                    hold.on_lost = functools.partial(self._broker_lost, lock)
                    if hold.lost:
                        self._broker_lost(lock)
                self._schedule_refresh(lock)
                return lock
            now = self.clock.seconds()
            if now >= deadline:
                who = attempt.observed.describe() if attempt.observed else "another process"
                raise LockTimeoutError(
                    f"gave up waiting for the lock of {key} after {timeout:g} s: {path} is held by {who}")
            pause = min(delay, deadline - now)
            acq.waiting = task.deferLater(self.clock, pause, lambda: None)
            try:
                await acq.waiting
            finally:
                acq.waiting = None
            delay = min(delay * 2, self.poll_max)

    def _forget_local(self, path: Path) -> None:
        local = self._local.get(path)
        if local is not None and not local.locked and not local.waiting:
            del self._local[path]

    async def _cache_identity(self) -> str | None:
        """The id of this table's cache (:func:`cache_identity`, read once); None without a root, or
        if it cannot be read or made (logged: the broker lock is then named by the entry alone)."""
        if self._cache_id is None and self.root is not None:
            try:
                self._cache_id = await self.pool.run(cache_identity, self.root)
            except OSError as exc:
                self._log.warn("cannot read the cache id in {root} ({exc}): broker locks are named by their "
                               "entry alone (hosts with caches of their own then wait for each other)",
                               root=str(self.root), exc=exc)
        return self._cache_id

    # -- holding ------------------------------------------------------------------------------
    def _broker_lost(self, lock: CacheLock) -> None:
        """The connection holding ``lock``'s broker lock was lost: another host may take the lock
        file over at once (it carries the broker lock's marker), so the lock counts as lost."""
        if not lock.held or lock.lost or lock.holder.broker is None:
            return  # an unmarked file (taken after the loss) is judged by the old rules: still ours
        lock.lost = lock.broker_lost = True
        self._log.error("lost the lock of {entry} ({path}): its broker lock went with the connection to the broker",
                        entry=str(lock.key), path=str(lock.path))

    def _schedule_refresh(self, lock: CacheLock) -> None:
        if lock.active and not lock.releasing:
            lock._refresh_call = self.clock.callLater(self.refresh_interval, self._refresh, lock)

    def _refresh(self, lock: CacheLock) -> None:
        lock._refresh_call = None
        if not lock.active:
            return
        d = self.pool.run(_refresh, lock.path, lock._dev, lock._ino, lock._raw, self.clock.seconds())

        def done(ok: bool) -> None:
            if ok or not lock.held or lock.releasing:  # (releasing: its file is being removed by its holder)
                self._schedule_refresh(lock)
                return
            lock.lost = True
            self._log.error("lost the lock of {entry} ({path}): another process took it over "
                            "(not refreshed within lock_timeout?)", entry=str(lock.key), path=str(lock.path))

        def failed(f: Failure) -> None:
            self._log.warn("could not refresh the lock {path}: {err}", path=str(lock.path), err=f.getErrorMessage())
            self._schedule_refresh(lock)

        d.addCallbacks(done, failed)

    def check(self, lock: CacheLock) -> defer.Deferred[bool]:
        """Whether the lock file is still ours (reads it)."""
        if not lock.active:
            return defer.succeed(False)
        return self.pool.run(_owned, lock.path, lock._dev, lock._ino, lock._raw)

    # -- releasing ------------------------------------------------------------------------------
    def owned(self, lock: CacheLock) -> bool:
        """Whether the lock file is still ours (blocking: :meth:`check` in the calling thread, for a pool
        job that checks the lock and then uses it, e.g. a publish)."""
        return _owned(lock.path, lock._dev, lock._ino, lock._raw)

    def removal(self, lock: CacheLock) -> Callable[[], Any]:
        """The blocking removal of ``lock``'s file, for the end of a pool job that needs the lock until
        then (a publish that releases it: one job instead of two). Its outcome goes to
        :meth:`release` (``removed=``); meanwhile the lock is not refreshed. :meth:`keep` undoes this
        when the job ends without calling it.

        The lock file is renamed aside (the lock is free from then on) and that file is deleted
        later, with the others of the deployment, once this table has held and waited for no lock
        for :data:`ASIDE_DELAY`, or when it is closed (:meth:`_delete_aside`). On ext4 without a
        journal every file deleted leaves a free inode that each new file of the next ~30 s walks
        past (``recently_deleted``): a deletion per item made a deployment of many small items
        quadratic in the kernel (a fifth of ion-deploy's CPU at 1,000 items, by ``perf``). Until
        then the file is debris of a live process, named as such
        (``.<lock>.<host>-<pid>.<random>.stale``): never taken for a lock, left alone by other
        processes' sweeps (:func:`_sweep`), and removed by them at once if this process is killed
        first. (A table closed while a publish's removal is under way may leave that one file to
        those sweeps.)
        """
        lock.releasing = True
        if lock._refresh_call is not None and lock._refresh_call.active():
            lock._refresh_call.cancel()
        lock._refresh_call = None
        if lock.lost and not lock.broker_lost:
            return lambda: _NOT_OURS  # the file is the new holder's now
        return functools.partial(_removed_or_failure, lock.path, lock._dev, lock._ino, lock._raw, self.tag,
                                 self._aside.append)

    def _delete_aside(self, *, idle_only: bool = True) -> defer.Deferred[None]:
        """Delete the lock files :meth:`removal` moved aside, in one pool job: once this table has
        held and waited for no lock for :data:`ASIDE_DELAY` seconds (``idle_only``: a deployment has
        ended; checked again then, on the clock), or at once when :data:`ASIDE_KEPT` of them wait,
        or when not ``idle_only`` (``release_all``). Never fails (problems are logged)."""
        if not self._aside:
            return defer.succeed(None)
        if idle_only and len(self._aside) < ASIDE_KEPT:
            if self.held or self._pending:
                return defer.succeed(None)  # (the release that leaves the table idle comes back here)
            idle_for = self.clock.seconds() - self._last_busy
            if idle_for < ASIDE_DELAY:
                if self._aside_call is None or not self._aside_call.active():
                    self._aside_call = self.clock.callLater(ASIDE_DELAY - idle_for, self._delete_aside)
                return defer.succeed(None)
        if self._aside_call is not None and self._aside_call.active():
            self._aside_call.cancel()
        self._aside_call = None
        paths: list[Path] = []
        while True:  # (pool threads may append meanwhile: popped one by one, none lost)
            try:
                paths.append(self._aside.popleft())
            except IndexError:
                break

        def done(failed: list[Path]) -> None:
            for path in failed:
                self._log.warn("could not delete {path}, a lock file released and moved aside "
                               "(another process's sweep removes it)", path=str(path))

        def failed(f: Failure) -> None:
            self._log.failure("deleting the lock files moved aside", f)

        return self.pool.run(_unlink_each, paths).addCallbacks(done, failed)

    def keep(self, lock: CacheLock) -> None:
        """The job of a :meth:`removal` ended without removing the file: the lock is held as before."""
        if lock.releasing:
            lock.releasing = False
            self._schedule_refresh(lock)

    def _removed(self, lock: CacheLock, outcome: Any) -> None:
        if isinstance(outcome, BaseException):
            self._log.failure("could not remove the lock file {path}", Failure(outcome), path=str(lock.path))
        elif outcome != "removed" and outcome != _NOT_OURS and not lock.lost:
            self._log.warn("the lock {path} of {entry} was no longer ours at release ({outcome})",
                           path=str(lock.path), entry=str(lock.key), outcome=outcome)

    def _remove_file(self, lock: CacheLock, tidy: Callable[[], Any] | None = None) -> defer.Deferred[Any]:
        """Remove the lock file (if still ours), then ``tidy()`` in the same pool job; fires with what
        ``tidy`` raised (None: nothing)."""
        if lock.lost and not lock.broker_lost:  # the file is the new holder's now
            return self.pool.run(_call_caught, tidy) if tidy is not None else defer.succeed(None)
        d = self.pool.run(_remove_then, lock.path, lock._dev, lock._ino, lock._raw, self.tag, tidy)

        def done(outcome: tuple[Any, BaseException | None]) -> BaseException | None:
            self._removed(lock, outcome[0])
            return outcome[1]

        return d.addCallback(done)

    def release(self, lock: CacheLock, *, tidy: Callable[[], Any] | None = None,
                removed: Any = None) -> defer.Deferred[None]:
        """Release ``lock``: remove its file (if still ours), then let the next waiter in.

        Never fails (problems are logged); releasing twice does nothing.

        :param tidy: a blocking call run right after the file's removal, in the same pool job (the
            folders the lock file left empty); what it raises is logged.
        :param removed: the outcome of a :meth:`removal` already run (the file is not removed again).
        """
        if not lock.held:
            return defer.succeed(None)
        lock.held = False
        if lock._refresh_call is not None and lock._refresh_call.active():
            lock._refresh_call.cancel()
        lock._refresh_call = None
        if self.held.get(lock.path) is lock:
            del self.held[lock.path]
        if removed is not None:
            self._removed(lock, removed)
            d: defer.Deferred[Any] = defer.succeed(None)
        else:
            d = self._remove_file(lock, tidy)

            def tidied(problem: BaseException | None) -> None:
                if problem is not None:
                    self._log.warn("could not remove the empty folders above {path}: {exc}", path=str(lock.path),
                                   exc=problem)

            def failed(f: Failure) -> None:
                self._log.failure("could not remove the lock file {path}", f, path=str(lock.path))

            d.addCallbacks(tidied, failed)
        if lock.broker is not None and self.broker is not None:
            hold, broker = lock.broker, self.broker
            d.addBoth(lambda _: broker.release(hold))  # after the file: a waiter that gets it finds none
        result: defer.Deferred[None] = defer.Deferred()

        def hand_over(_: Any) -> None:
            local = self._local.get(lock.path)
            if local is not None and local.locked:
                local.release()
            self._forget_local(lock.path)
            self._last_busy = self.clock.seconds()
            self._delete_aside()  # (the last lock of a deployment released: the files moved aside go soon)
            result.callback(None)

        d.addBoth(hand_over)
        return result

    def release_all(self) -> defer.Deferred[Any]:
        """Stop pending acquisitions and release every held lock (terminate, drain)."""
        for acq in list(self._pending):
            acq.cancel()
        releases = [self.release(lock) for lock in list(self.held.values())]
        return defer.DeferredList([*releases, self._delete_aside(idle_only=False)])

    def in_use(self, path: Path) -> bool:
        """Whether this table holds the lock file ``path``, or a fetch of this process waits for it."""
        return path in self._local or path in self.held

    def _log_swept(self, swept: list[Path]) -> None:
        for path in swept:
            self._log.info("removed {path}, a temporary file of a lock left by a process that died", path=str(path))

    def remove_if_stale(self, path: Path, *, entry: str | None = None) -> defer.Deferred[bool]:
        """Remove the lock file ``path`` if :meth:`judge` says it may be taken over, and the
        temporary files killed processes left beside it (:meth:`sweep`); fires with whether the
        lock file was removed.

        ``entry``: the entry the lock belongs to, when it is met on the way to serving that entry
        (a cache hit: whoever held the lock died after publishing it, or while checking it). The
        removal is then logged as a warning, like a takeover; for clear and prune it is routine.

        Race-free like a takeover: the file is renamed aside and removed only if it is the very
        file judged (device, inode, content, mtime). A lock this table holds or waits for is left alone.
        """
        if self.in_use(path):
            return defer.succeed(False)
        now = self.clock.seconds()

        def blocking() -> tuple[bool, str | None, _Observed | None, list[Path]]:
            swept = self.sweep(path)
            obs = _observe(path)
            if obs is None:
                return False, None, None, swept
            reason = self.judge(obs, now)
            if reason is None:
                return False, None, obs, swept
            outcome = _remove_if(path, obs.dev, obs.ino, obs.raw, obs.mtime_ns, tag=self.tag)
            return outcome == "removed", reason, obs, swept

        def done(result: tuple[bool, str | None, _Observed | None, list[Path]]) -> bool:
            removed, reason, obs, swept = result
            self._log_swept(swept)
            if removed and obs is not None:
                if entry is not None:
                    self._log.warn("removed the lock {path} of {previous} left on the published entry {entry}: "
                                   "{reason}", path=str(path), previous=obs.describe(), entry=entry, reason=reason)
                else:
                    self._log.info("removed the stale lock {path} of {previous}: {reason}", path=str(path),
                                   previous=obs.describe(), reason=reason)
            return removed

        return self.pool.run(blocking).addCallback(done)
