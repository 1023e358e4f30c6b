# -*- test-case-name: tests.services.unpack.test_service -*-
"""The Unpack service: :mod:`ion.services.unpack.core` over messages.

``res/apps/unpack.app`` starts it. From any process::

    client = UnpackClient(proc)
    found = yield client.detect("/cache/staging/x/dep-1.0.tgz")
    # {"format": "tar.gz", "archive": True, "claimed": "tar.gz", "reason": "..."}
    done = yield client.unpack("/cache/staging/x/dep-1.0.tgz", "/cache/staging/x/tree")
    # {"format": "tar.gz", "kept": False, "members": 12, "bytes": 40960}

Extraction runs in the container's blocking pool, never on the reactor. A
request may name only paths under the configured ``allowed_roots`` (symlinks
resolved; default the deploy cache root), since anyone on the bus can send one.

Errors: a malformed request is a 400, a path outside the roots a 403; an
archive that is unsafe, over a limit or corrupt is a 422 whose ``error`` is the
core's class name (``UnsafeArchiveError``, ``ArchiveLimitError``,
``CorruptArchiveError``) and whose message names the member, limit or cause; a
target that cannot be written is a 500 (``TargetError``). The core's
:class:`~ion.services.unpack.core.UnpackError` s are
:class:`~ion.core.exceptions.ApplicationError` s: the ops let them escape.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.internet import defer

from ion.core.exceptions import ApplicationError
from ion.core.safefs import SafeDir, SymlinkRefused
from ion.core.security import control, narrow_limit, narrow_roots
from ion.core.service import ServiceClient, ServiceProcess
from ion.services.unpack import core
from ion.services.unpack.core import Limits, UnpackSettings

__all__ = ["UnpackService", "UnpackClient", "default_allowed_roots"]

#: Seconds an UnpackClient call waits for its answer unless configured (``rpc_timeout``).
DEFAULT_CLIENT_TIMEOUT = UnpackSettings.rpc_timeout


def default_allowed_roots(config: Any = None) -> list[Path]:
    """The deploy cache root (DESIGN §8): config ``ion.services.cache.root`` if set, else
    the cache's default (``$ION_CACHE_DIR``, else ``~/.cache/ion/deploy``).

    :param config: the container's :class:`~ion.core.config.Config`, if any.
    """
    from ion.services.cache.core import configured_root

    return [configured_root(config)]


class UnpackService(ServiceProcess):
    """Detects and safely extracts archives (config section ``ion.services.unpack``)."""

    service_name = "unpack"
    version = "0.1.0"

    @defer.inlineCallbacks
    def slc_init(self) -> Any:
        # Security bounds: the container's config, narrowed (never widened) by app config and spawnargs.
        self.limits = Limits.from_config(lambda key, default: self.bounded_config(key, narrow_limit, default))
        # Resolved once (in the pool: realpath): a root that is itself a symlink is the operator's choice.
        self.allowed_roots = yield self.container.blocking.run(self._allowed_roots)

    def _allowed_roots(self) -> list[Path]:
        roots = self.bounded_config("allowed_roots", narrow_roots,
                                    [str(p) for p in default_allowed_roots(self.container.config)])
        return [Path(os.path.realpath(Path(r).expanduser())) for r in roots]

    # -- requests ------------------------------------------------------------------------
    @staticmethod
    def _path(content: Any, key: str) -> str:
        """The request's ``key``: an absolute path (checked on the reactor, no file system access).

        :raises ApplicationError: 400 for a malformed request.
        """
        if not isinstance(content, dict):
            raise ApplicationError(f"the request must be a dict with {key!r}, not {type(content).__name__}")
        value = content.get(key)
        if not isinstance(value, str) or not value:
            raise ApplicationError(f"the request needs {key!r}: a path (string)")
        if "\x00" in value or not os.path.isabs(value):
            raise ApplicationError(f"{key} {value!r} must be an absolute path")
        return value

    def _allowed(self, key: str, value: str, *, below: bool = False) -> Path:
        """``value`` with symlinks resolved, if it lies under an allowed root (strictly
        ``below`` one if asked). Touches the file system: runs in the blocking pool.

        :raises ApplicationError: 403 naming the roots.
        """
        resolved = Path(os.path.realpath(value))
        if not any(resolved.is_relative_to(root) and not (below and resolved == root)
                   for root in self.allowed_roots):
            roots = ", ".join(str(r) for r in self.allowed_roots) or "none"
            raise ApplicationError(f"{key} {value} (resolved {resolved}) is outside the allowed roots ({roots})",
                                   code=403)
        return resolved

    def _detect(self, path: str) -> core.Detection:
        checked = self._allowed("path", path)
        fd = self._checked_file("path", checked)
        try:
            return core.detect(checked, archive_fd=fd)
        finally:
            os.close(fd)

    def _root_of(self, path: Path) -> Path:
        """The deepest allowed root ``path`` lies in (checked by :meth:`_allowed`)."""
        return max((r for r in self.allowed_roots if path.is_relative_to(r)), key=lambda r: len(r.parts))

    @contextmanager
    def _walked(self, key: str, path: Path) -> Iterator[SafeDir]:
        """The folder of ``path`` (checked: inside an allowed root), walked to from that root without
        following links. A link met there since the check (a folder on the way, or what the caller
        opens in it) is refused with a 403, never gone through."""
        try:
            with SafeDir.open_below(self._root_of(path), path.parent) as parent:
                yield parent
        except SymlinkRefused as exc:
            raise ApplicationError(f"{key} {path}: {exc}; it changed since it was checked", code=403) from None

    def _checked_file(self, key: str, path: Path) -> int:
        """``path`` (checked: inside an allowed root) opened through :meth:`_walked`: a descriptor
        the caller closes."""
        if path == self._root_of(path):  # (a root is a folder to work in, not a file to read)
            raise core.ArchiveAccessError("cannot open archive: not a regular file", archive=path)
        try:
            with self._walked(key, path) as parent:
                return parent.open_file(path.name, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise core.ArchiveAccessError(f"cannot open archive: {exc.strerror or exc}", archive=path) from None

    def _unpack(self, archive: str, target: str) -> core.UnpackResult:
        archive_path = self._allowed("archive", archive)
        target_path = self._allowed("target", target, below=True)
        archive_fd = self._checked_file("archive", archive_path)
        try:
            return self._unpack_checked(archive_path, archive_fd, target_path)
        finally:
            os.close(archive_fd)

    def _unpack_checked(self, archive_path: Path, archive_fd: int, target_path: Path) -> core.UnpackResult:
        detection = core.detect(archive_path, archive_fd=archive_fd)
        if detection.format is None:  # kept as it is: the target is not touched
            return core.UnpackResult(detection, None)
        # Written through a descriptor of the target walked to from its allowed root without following
        # links: a folder on the way swapped for a link after the check is refused, never written
        # through. (The target is made if missing; its parent must exist.)
        try:
            with self._walked("target", target_path) as parent:
                folder = parent.open_dir(target_path.name, create=True)
        except OSError as exc:
            raise core.TargetError(f"cannot use target {target_path}: {exc.strerror or exc}",
                                   archive=archive_path) from None
        with folder:
            return core.UnpackResult(detection, core.extract(archive_path, target_path, self.limits,
                                                             format=detection.format, target_fd=folder.fd,
                                                             archive_fd=archive_fd))

    async def op_detect(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Whether ``{path}`` is an archive: ``{format, archive, claimed, reason}``."""
        path = self._path(content, "path")
        found = await self.container.blocking.run(self._detect, path)
        return {
            "format": found.format.value if found.format else None,
            "archive": found.is_archive,
            "claimed": found.claimed.value if found.claimed else None,
            "reason": found.reason,
        }

    @control("unpack.unpack", audited=False)
    async def op_unpack(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Extract ``{archive, target}``: ``{format, kept: false, members, bytes}``, or
        ``{format: null, kept: true, reason}`` for a file that is no archive (left alone)."""
        archive = self._path(content, "archive")
        target = self._path(content, "target")
        result = await self.container.blocking.run(self._unpack, archive, target)
        if result.extracted is None:
            return {"format": None, "kept": True, "reason": result.detection.reason}
        self._log.debug("{pid}: unpacked {archive} ({kind}, {members} members, {bytes} bytes)", pid=self.id,
                        archive=archive, kind=result.extracted.format.value,
                        members=len(result.extracted.members), bytes=result.extracted.total_bytes)
        return {
            "format": result.extracted.format.value,
            "kept": False,
            "members": len(result.extracted.members),
            "bytes": result.extracted.total_bytes,
        }


class UnpackClient(ServiceClient):
    """Calls the unpack service.

    Failures arrive as :class:`~ion.core.exceptions.ReceivedApplicationError`
    (4xx; ``remote_error`` is the core error's class name) or
    :class:`~ion.core.exceptions.ReceivedContainerError` (5xx): its callers rely on
    these, so it lists no ``errors`` (with ``errors = (UnpackError,)`` it would raise
    the core's classes again).
    """

    service_name = "unpack"
    #: A system service: its answers are taken from the system's operators only.
    trusted = True

    def _timeout(self, timeout: float | None) -> float:
        if timeout is not None:
            return timeout
        return self.proc.container.config.settings(UnpackSettings).rpc_timeout

    @defer.inlineCallbacks
    def detect(self, path: str | os.PathLike[str], timeout: float | None = None) -> Any:
        """``{format, archive, claimed, reason}`` for the file at ``path``."""
        content, _headers = yield self.rpc_send("detect", {"path": os.fspath(path)},
                                                timeout=self._timeout(timeout))
        return content

    @defer.inlineCallbacks
    def unpack(self, archive: str | os.PathLike[str], target: str | os.PathLike[str],
               timeout: float | None = None) -> Any:
        """Extract ``archive`` into ``target``: ``{format, kept, members, bytes}``.

        :param timeout: seconds to wait (default: config ``ion.services.unpack.rpc_timeout``, 900).
        """
        content, _headers = yield self.rpc_send(
            "unpack", {"archive": os.fspath(archive), "target": os.fspath(target)}, timeout=self._timeout(timeout))
        return content
