"""Writing below a root without following symbolic links (DESIGN §10).

A path checked once (``realpath`` under an allowed root) and written later can
have been swapped in between: a folder replaced by a symlink to somewhere
else, and every write after that lands there. The cure is to never resolve a
path by name again after the check: open the root once, then walk each
further component with ``O_NOFOLLOW`` relative to its parent's descriptor,
and do every write (``mkdir``, create, ``rename``, ``symlink``, ``unlink``,
removal of a tree) with the ``dir_fd`` forms of :mod:`os`, relative to a
descriptor so opened. A component that turns out to be a symlink is refused
(:class:`SymlinkRefused`), never followed.

:class:`SafeDir` is one such directory descriptor; its methods are the
primitives (walk, mkdir -p, atomic write of a small file, copy of a tree,
removal of a tree, an ``flock`` on a file in it, the atomic exchange of two
names). Linux (and other systems whose :mod:`os` has the ``dir_fd`` forms)
only. Blocking: call from a thread.

**Exchange.** :meth:`SafeDir.exchange` swaps two names in one step
(``renameat2(RENAME_EXCHANGE)``, Linux 3.15+: ext4, xfs, btrfs, tmpfs,
overlayfs...), so a folder can be replaced without a moment where its name is
missing, which two renames cannot do (a folder cannot be renamed over a
folder that is not empty). Where the kernel or the filesystem lacks it (NFS,
older kernels, other systems) it answers False and the caller falls back (see
:mod:`ion.services.deploy.place`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from ion.core.tokens import random_hex

__all__ = ["SafeDir", "SymlinkRefused", "WalkCache", "lies_in", "relative_parts", "RENAME_EXCHANGE"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY_CHUNK = 1 << 20
#: ``renameat2``'s flag that swaps the two names (linux/fs.h).
RENAME_EXCHANGE = 1 << 1
#: The errors that mean "this kernel or filesystem cannot exchange": the caller falls back.
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)
#: ``SYS_renameat2`` by machine, for a C library without the wrapper (glibc < 2.28, some musl).
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276, "i386": 353, "i686": 353, "armv7l": 382,
                  "ppc64le": 357, "s390x": 347, "riscv64": 276}


class SymlinkRefused(OSError):
    """A path component that must be a real folder or file is a symbolic link: refused, not followed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.ELOOP, "is a symbolic link and was refused (not followed)", str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return f"{self.path} is a symbolic link and was refused (not followed)"


def lies_in(path: str | os.PathLike[str], top: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``top`` or lies below it. Both must be absolute and normalized already
    (realpaths): compared as strings, component by component (``/a/bc`` is not in ``/a/b``).

    (``top in path.parents`` made a ``Path`` per parent: a few per cent of a deploy of many
    small items.)
    """
    p, t = os.fspath(path), os.fspath(top)
    return p == t or p.startswith(t if t.endswith("/") else t + "/")


def relative_parts(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> tuple[str, ...]:
    """The components of ``path`` below ``root``, both absolute, compared lexically (``..`` folded first).

    :raises ValueError: ``path`` is not ``root`` or below it.
    """
    # Plain string work: this runs for every item of a warm deploy.
    p = os.path.normpath(os.fspath(path))
    r = os.path.normpath(os.fspath(root))
    if not p.startswith("/") or not r.startswith("/"):
        raise ValueError(f"{path} and {root} must be absolute")
    if p == r:
        return ()
    prefix = r if r.endswith("/") else r + "/"
    if not p.startswith(prefix):
        raise ValueError(f"{path} is not below {root}")
    return tuple(p[len(prefix):].split("/"))


class SafeDir:
    """A directory opened below a root without following any symlink after the root itself.

    Owns its descriptor: use it as a context manager (or call :meth:`close`).
    Names given to its methods are single components of this folder.

    :param fd: an ``O_DIRECTORY`` descriptor, now owned by this object.
    :param path: the folder's path, for messages only (nothing is resolved by it).
    """

    def __init__(self, fd: int, path: str | os.PathLike[str]) -> None:
        self.fd = fd
        self._path = os.fspath(path)
        #: True when the walk that opened it made this very folder (it was missing): it holds
        #: nothing but what was put there since.
        self.created = False

    @property
    def path(self) -> Path:
        """The folder's path, for messages (as it was walked; nothing is resolved by it)."""
        return Path(self._path)

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open_root(cls, root: str | os.PathLike[str]) -> SafeDir:
        """Open ``root`` itself (trusted: resolved by the caller; symlinks in it are followed)."""
        return cls(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), root)

    @classmethod
    def open_below(cls, root: str | os.PathLike[str], path: str | os.PathLike[str], *,
                   create: bool = False, mode: int = 0o777) -> SafeDir:
        """Open the folder ``path`` by walking from ``root`` without following symlinks.

        :param create: make missing folders (``mkdir -p``). A missing ``root`` is
            made too, walking to it from ``/`` without following links either.
        :raises SymlinkRefused: a component below ``root`` is a symlink.
        :raises ValueError: ``path`` is not below ``root``.
        """
        parts = relative_parts(path, root)
        try:
            top = cls.open_root(root)
        except FileNotFoundError:
            if not create or os.path.normpath(os.fspath(root)) == "/":
                raise
            return cls.open_below("/", path, create=True, mode=mode)
        with top:
            return top.walk(parts, create=create, mode=mode)

    def walk(self, parts: tuple[str, ...] | list[str], *, create: bool = False, mode: int = 0o777) -> SafeDir:
        """A new :class:`SafeDir` for the folder ``parts`` below this one, no symlink followed.

        :param create: make missing folders with ``mode`` (less the umask); the result's
            :attr:`created` says whether its own folder was made.
        :raises SymlinkRefused: naming the first component that is a symlink.
        :raises OSError: a component is missing (without ``create``), not a folder, or unreadable.
        """
        path = self._path.rstrip("/")
        if not parts:
            return SafeDir(os.dup(self.fd), path or "/")
        # The first component is opened relative to this descriptor itself (no dup of it).
        fd, own, made = self.fd, False, False
        try:
            for part in parts:
                if part in ("", ".", "..") or "/" in part:
                    raise ValueError(f"{part!r} is not a single path component")
                path = f"{path}/{part}"
                child, made = self._open_child(fd, part, path, create, mode)
                if own:
                    os.close(fd)
                fd, own = child, True
        except BaseException:
            if own:
                os.close(fd)
            raise
        found = SafeDir(fd, path or "/")
        found.created = made
        return found

    def open_dir(self, name: str, *, create: bool = False, mode: int = 0o777) -> SafeDir:
        """The folder ``name`` in this one (see :meth:`walk`)."""
        return self.walk((name,), create=create, mode=mode)

    @staticmethod
    def _open_child(fd: int, part: str, path: str, create: bool, mode: int) -> tuple[int, bool]:
        """The folder ``part`` of ``fd`` opened (made first if missing and ``create``), and whether
        this call made it."""
        made = False
        while True:
            try:
                return os.open(part, _DIR_FLAGS, dir_fd=fd), made
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                    made = True
                except FileExistsError:
                    pass  # made by someone else meanwhile: open it (or find what it is)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(fd, part):
                    raise SymlinkRefused(path) from None
                raise OSError(exc.errno, exc.strerror, str(path)) from None

    # -- looking -----------------------------------------------------------------------------------
    def lstat(self, name: str) -> os.stat_result | None:
        """``name``'s own status (a link is not followed), or None if it does not exist."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        """True if ``name`` exists here (a link counts, dangling or not)."""
        return self.lstat(name) is not None

    def is_link(self, name: str) -> bool:
        """True if ``name`` is a symlink."""
        st = self.lstat(name)
        return st is not None and stat.S_ISLNK(st.st_mode)

    def readlink(self, name: str) -> str | None:
        """Where the symlink ``name`` points; None if it is missing or not a symlink."""
        try:
            return os.readlink(name, dir_fd=self.fd)
        except (FileNotFoundError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or exc.errno == errno.EINVAL:
                return None
            raise

    def listdir(self) -> list[str]:
        """The names in this folder."""
        with os.scandir(self.fd) as it:
            return [e.name for e in it]

    def read_bytes(self, name: str, limit: int = 1 << 20) -> bytes | None:
        """The content of the regular file ``name`` (up to ``limit`` bytes); None if it is missing.

        :raises SymlinkRefused: ``name`` is a symlink.
        """
        try:
            fd = self.open_file(name, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(self.path / name))
            chunks: list[bytes] = []
            left = limit
            while left > 0:
                chunk = os.read(fd, min(left, 65536))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def realpath(self) -> Path:
        """Where this folder really is now (``/proc/self/fd``; the path it was opened by elsewhere)."""
        try:
            real = os.readlink(f"/proc/self/fd/{self.fd}")
        except OSError:
            return Path(os.path.realpath(self.path))
        return Path(real)

    def identity(self) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of this folder."""
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    # -- writing ---------------------------------------------------------------------------------
    def mkdir(self, name: str, mode: int = 0o777) -> None:
        """Make the folder ``name`` here."""
        os.mkdir(name, mode, dir_fd=self.fd)

    def symlink(self, target: str | os.PathLike[str], name: str) -> None:
        """Make the symlink ``name`` here, pointing at ``target``."""
        os.symlink(target, name, dir_fd=self.fd)

    def rename(self, src: str, dst: str, *, into: SafeDir | None = None) -> None:
        """Rename ``src`` (here) to ``dst`` (here or in ``into``), failing if ``dst`` is a non-empty folder."""
        os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=(into or self).fd)

    def replace(self, src: str, dst: str, *, into: SafeDir | None = None) -> None:
        """Rename ``src`` over ``dst`` (atomically replacing a file or link)."""
        os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=(into or self).fd)

    def exchange(self, a: str, b: str, *, into: SafeDir | None = None) -> bool:
        """Swap ``a`` (here) and ``b`` (here or in ``into``) in one step: each name always exists.

        Both must exist; either may be a file, a link or a folder (neither is followed).
        ``renameat2(RENAME_EXCHANGE)`` on both descriptors.

        :return: True once swapped; False where this kernel or filesystem cannot exchange
            (``EINVAL``, ``ENOSYS``, ``EOPNOTSUPP``): nothing changed, the caller falls back.
        :raises OSError: any other failure (a name missing, no permission...), naming ``a``.
        """
        call = _renameat2()
        if call is None:
            return False
        if call(self.fd, os.fsencode(a), (into or self).fd, os.fsencode(b), RENAME_EXCHANGE) == 0:
            return True
        err = ctypes.get_errno()
        if err in _NO_EXCHANGE:
            return False
        raise OSError(err, os.strerror(err), str(self.path / a))

    def unlink(self, name: str, *, missing_ok: bool = True) -> None:
        """Remove the file or link ``name``."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove(self, name: str) -> None:
        """Remove ``name``, a file, a link (never what it points to) or a whole tree, read-only parts included."""
        st = self.lstat(name)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            self.unlink(name)
            return
        _rmtree_at(self.fd, name, self.path / name)

    def open_file(self, name: str, flags: int, mode: int = 0o666) -> int:
        """``os.open`` of ``name`` here, never through a symlink (``O_NOFOLLOW``: :class:`SymlinkRefused`);
        a descriptor the caller closes."""
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SymlinkRefused(self.path / name) from None
            raise

    def create_file(self, name: str, mode: int = 0o666) -> int:
        """A new file ``name`` here (``O_CREAT|O_EXCL|O_NOFOLLOW``), open for writing; the caller closes it."""
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                       dir_fd=self.fd)

    def write_atomic(self, name: str, data: bytes, mode: int = 0o666, *, mtime: float | None = None) -> None:
        """Write ``name`` whole or not at all: a new temp file beside it, renamed over it.

        The temp name starts with ``.`` and ends ``.tmp``; ``mode`` is less the umask;
        ``mtime`` (epoch seconds) sets the file's times.
        """
        tmp = f".{name}.{random_hex(8)}.tmp"
        fd = self.create_file(tmp, mode)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if mtime is not None:
                    os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
            self.replace(tmp, name)
        except BaseException:
            self.unlink(tmp)
            raise

    def copy_tree(self, src: str | os.PathLike[str], name: str) -> None:
        """Copy ``src`` (a file, link or tree, walked without following links) to the new ``name`` here.

        Links are copied as links; files and folders keep their mode and times.
        ``name`` must not exist.
        """
        src_path = Path(src)
        with SafeDir.open_root(src_path.parent) as parent:
            _copy_at(parent.fd, src_path.name, self.fd, name, src_path)

    def second_name(self, name: str, other: str) -> None:
        """Give the file or link ``name`` the new name ``other`` too (here), so that it survives a rename
        over ``name``: a hard link (a link is copied as a link); where a hard link is refused, a copy."""
        st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, "a folder has no second name", str(self.path / name))
        if not stat.S_ISLNK(st.st_mode):
            try:
                os.link(name, other, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
                return
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.EXDEV, errno.EACCES):
                    raise
        _copy_at(self.fd, name, self.fd, other, self.path / name)

    def try_lock(self, name: str, *, shared: bool = False, create: bool = True) -> int | None:
        """An ``flock`` on the file ``name`` here (never followed), without waiting.

        :return: the descriptor that holds it (closing it releases the lock), or None when
            another holder's lock conflicts (or, without ``create``, the file is missing).
        """
        try:
            fd = self.open_file(name, os.O_RDONLY | os.O_NONBLOCK | (os.O_CREAT if create else 0), 0o666)
        except FileNotFoundError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file; cannot lock it", str(self.path / name))
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def locked(self, name: str, timeout: float = 300.0, *, new: bool = False) -> Iterator[bool]:
        """Hold an exclusive ``flock`` on the file ``name`` here (made if missing, never followed).

        Opened read-only (anyone who may read the folder can lock it) and non-blocking
        (a FIFO planted at the name cannot hang the open; it is refused as not a file).
        Waits at most ``timeout`` seconds for another holder (polling, in the calling
        thread), then fails with ``EWOULDBLOCK``: a holder that hangs (or a local user
        who holds the lock on purpose) cannot keep a pool thread for ever.

        Yields whether this call made the file, locked before anyone else could see it
        (so nobody ever held this lock before): only with ``new``, for a folder just made,
        where it is missing (an unnamed file, locked, then linked to the name, which fails
        if the name exists; where the filesystem has no unnamed files, never). Otherwise False.
        """
        fd = self._create_locked(name) if new else -1
        if fd >= 0:
            try:
                yield True
            finally:
                os.close(fd)  # releases the lock
            return
        fd = self.open_file(name, os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK, 0o666)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file; cannot lock it", str(self.path / name))
            deadline = time.monotonic() + timeout
            pause = 0.005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise OSError(errno.EWOULDBLOCK, f"still locked by another placement after {timeout:g} s",
                                      str(self.path / name)) from None
                    time.sleep(pause)  # a pool thread, never the reactor's
                    pause = min(pause * 2, 0.25)
            yield False
        finally:
            os.close(fd)  # releases the lock

    def _create_locked(self, name: str) -> int:
        """The new file ``name`` here, locked (exclusive ``flock``) before it has its name: its
        descriptor; -1 if the name exists, or where unnamed files cannot be made or linked."""
        tmpfile = getattr(os, "O_TMPFILE", 0)
        if not tmpfile or os.link not in os.supports_dir_fd:
            return -1
        try:
            fd = os.open(".", os.O_WRONLY | tmpfile | os.O_CLOEXEC, 0o666, dir_fd=self.fd)
        except OSError:
            return -1  # EOPNOTSUPP (the filesystem), EISDIR or EINVAL (the kernel)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else can see it: never busy
            # linkat(AT_FDCWD, "/proc/self/fd/N", dir, name, AT_SYMLINK_FOLLOW): fails if the name exists.
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=self.fd, follow_symlinks=True)
        except OSError:
            os.close(fd)
            return -1
        return fd

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the descriptor (again: no-op)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SafeDir:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafeDir({self._path!r}, fd={self.fd})"


class WalkCache:
    """The folders above the destinations of one deployment, each walked to once (thread-safe).

    :meth:`open_below` answers what :meth:`SafeDir.open_below` would, but walks to the
    path's parent only the first time (from the root, following no link) and keeps that
    descriptor; later walks of paths in that folder start there. A folder swapped for a
    link after that first walk is never followed: the kept descriptor names the folder
    that was walked to (wherever it has been moved), and what is below it is walked
    following no link, as ever. At most ``limit`` folders are kept (beyond, walks go from
    the root). :meth:`realpath` remembers the folders it resolved, the same way.

    Its owner closes it once nothing uses it any more (:meth:`close`; a walk under way
    keeps the descriptors open until it ends).
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._dirs: dict[tuple[str, str], SafeDir] = {}
        self._real: dict[str, str] = {}
        self._users = 0
        self._closed = False

    def open_below(self, root: str | os.PathLike[str], path: str | os.PathLike[str], *,
                   create: bool = False, mode: int = 0o777) -> SafeDir:
        """:meth:`SafeDir.open_below` of ``path`` below ``root``: a new :class:`SafeDir`, its own to close."""
        parts = relative_parts(path, root)
        if not parts:
            return SafeDir.open_below(root, path, create=create, mode=mode)
        top = os.fspath(root)
        key = (top, "/".join(parts[:-1]))
        parent = self._enter(key)
        spare: SafeDir | None = None
        try:
            if parent is None:
                found = SafeDir.open_below(top, os.path.join(top, *parts[:-1]), create=create, mode=mode)
                parent, kept = self._keep(key, found)
                if not kept:
                    spare = found  # not kept (over the limit, or closed): closed after this walk
            return parent.walk(parts[-1:], create=create, mode=mode)
        finally:
            if spare is not None:
                spare.close()
            self._leave()

    def _enter(self, key: tuple[str, str]) -> SafeDir | None:
        with self._lock:
            self._users += 1
            return self._dirs.get(key)

    def _keep(self, key: tuple[str, str], found: SafeDir) -> tuple[SafeDir, bool]:
        """The folder to walk from (``found``, now kept if it may be, or the one another thread kept
        meanwhile), and whether it is kept (else the caller closes it after its walk)."""
        with self._lock:
            kept = self._dirs.get(key)
            if kept is None and not self._closed and len(self._dirs) < self.limit:
                self._dirs[key] = kept = found
        if kept is None:
            return found, False
        if kept is not found:
            found.close()
        return kept, True

    def _leave(self) -> None:
        with self._lock:
            self._users -= 1
            done = self._closed and self._users == 0
            dirs = list(self._dirs.values()) if done else []
            if done:
                self._dirs.clear()
        for d in dirs:
            d.close()

    def realpath(self, path: str | os.PathLike[str]) -> str:
        """``os.path.realpath(path)`` of an absolute path, each folder above it resolved once (one
        ``lstat`` for each name below one resolved already)."""
        p = os.fspath(path)
        if not p.startswith("/") or ".." in p.split("/"):
            return os.path.realpath(p)  # (a ".." after a link is not folded away lexically)
        p = os.path.normpath(p)
        with self._lock:
            hit = self._real.get(p)
        if hit is not None:
            return hit
        parent, name = os.path.split(p)
        if not name or parent == p:
            return os.path.realpath(p)
        try:
            st = os.lstat(p)
        except OSError:
            return os.path.realpath(p)  # missing (resolved as far as it exists), or unreadable
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(p)
        else:
            real = os.path.join(self.realpath(parent), name)
        with self._lock:
            self._real[p] = real
        return real

    def close(self) -> None:
        """Close the kept descriptors (once no walk uses them); later walks go from the root."""
        with self._lock:
            self._closed = True
            done = self._users == 0
            dirs = list(self._dirs.values()) if done else []
            if done:
                self._dirs.clear()
        for d in dirs:
            d.close()

    def __enter__(self) -> WalkCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_renameat2_call: list[Any] = []


def _renameat2() -> Any:
    """``renameat2(olddirfd, old, newdirfd, new, flags)`` of the C library (or its raw system call);
    None where neither is known (not Linux, or an unknown machine without the wrapper)."""
    if _renameat2_call:
        return _renameat2_call[0]
    call: Any = None
    try:
        libc: Any = ctypes.CDLL(None, use_errno=True)
    except OSError:
        libc = None
    if libc is not None and hasattr(libc, "renameat2"):
        call = libc.renameat2
        call.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        call.restype = ctypes.c_int
    elif libc is not None:
        call = _syscall_renameat2(libc)
    _renameat2_call.append(call)
    return call


def _syscall_renameat2(libc: Any) -> Any:
    """``renameat2`` through ``syscall(SYS_renameat2, ...)``, for a C library without the wrapper
    (glibc before 2.28); None off Linux or on a machine whose number is not known here."""
    number = _SYS_RENAMEAT2.get(platform.machine())
    if platform.system() != "Linux" or number is None or not hasattr(libc, "syscall"):
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long

    def call(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> int:
        return int(syscall(ctypes.c_long(number), ctypes.c_int(olddirfd), ctypes.c_char_p(old),
                           ctypes.c_int(newdirfd), ctypes.c_char_p(new), ctypes.c_uint(flags)))

    return call


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _rmtree_at(dir_fd: int, name: str, path: Path) -> None:
    """Remove the folder ``name`` of ``dir_fd`` and all below it, by descriptors (no link followed)."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a link or file meanwhile: just that
            os.unlink(name, dir_fd=dir_fd)
            return
        if exc.errno != errno.EACCES:
            raise
        # An unreadable folder (a copy of a read-only tree): made ours again through an O_PATH
        # descriptor, which names that very folder (a link in its place would have failed above).
        handle = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.chmod(f"/proc/self/fd/{handle}", stat.S_IRWXU)
        finally:
            os.close(handle)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)  # a read-only folder of a copy
        with os.scandir(fd) as it:
            children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for child, is_dir in children:
            if is_dir:
                _rmtree_at(fd, child, path / child)
            else:
                try:
                    os.unlink(child, dir_fd=fd)
                except FileNotFoundError:
                    pass
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _copy_at(src_dir: int, src_name: str, dst_dir: int, dst_name: str, src_path: Path) -> None:
    """Copy ``src_name`` of ``src_dir`` to the new ``dst_name`` of ``dst_dir``, by descriptors."""
    st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src_name, dir_fd=src_dir), dst_name, dir_fd=dst_dir)
        return
    if stat.S_ISDIR(st.st_mode):
        sfd = os.open(src_name, _DIR_FLAGS, dir_fd=src_dir)
        try:
            os.mkdir(dst_name, 0o700, dir_fd=dst_dir)
            dfd = os.open(dst_name, _DIR_FLAGS, dir_fd=dst_dir)
            try:
                with os.scandir(sfd) as it:
                    children = sorted(e.name for e in it)
                for child in children:
                    _copy_at(sfd, child, dfd, child, src_path / child)
                _copy_mode_and_times(dfd, st)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        return
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "neither a file, a folder nor a link; not copied", str(src_path))
    sfd = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        dfd = os.open(dst_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=dst_dir)
        try:
            _copy_data(sfd, dfd)
            _copy_mode_and_times(dfd, st)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _copy_mode_and_times(fd: int, st: os.stat_result) -> None:
    """Give the copy open as ``fd`` the mode and times of the original (``st``)."""
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_data(src: int, dst: int) -> None:
    """All of ``src`` into ``dst`` (in the kernel where it can)."""
    try:
        while True:
            n = os.sendfile(dst, src, None, _COPY_CHUNK)
            if n == 0:
                return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS) or os.lseek(dst, 0, os.SEEK_CUR) != 0:
            raise
    while True:
        chunk = os.read(src, _COPY_CHUNK)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]
