"""Errors of the Cache service, under one root: :class:`CacheError`.

Each class carries the response code an op answers with when it escapes
(DESIGN §4: 4xx, the caller's request cannot be done as asked). They derive
from :class:`~ion.core.exceptions.ApplicationError` -- itself an
:class:`~ion.core.exceptions.IonError` -- so that an ``op_*`` letting one
escape answers with that code and the class name, with nothing to translate;
the core :class:`~ion.services.cache.core.Cache` still knows nothing of
messaging. :class:`~ion.services.cache.service.CacheClient` raises the same
classes again on the caller's side (its ``errors``, see :mod:`ion.core.service`).
"""

from __future__ import annotations

from ion.core.exceptions import ApplicationError

__all__ = [
    "CacheError",
    "InvalidKeyError",
    "EntryNotFoundError",
    "CorruptEntryError",
    "OutsideCacheError",
    "LockError",
    "LockTimeoutError",
    "LockNotHeldError",
    "UnknownLockError",
]


class CacheError(ApplicationError):
    """Root of every Cache error; ``code`` is the response code of the error reply."""

    code = 400


class InvalidKeyError(CacheError):
    """Raised for an entry key, URL, relative path or argument the cache cannot use
    (an empty or ``..`` component, a version ending in ``.lock``, an unknown URL scheme)."""


class EntryNotFoundError(CacheError):
    """Raised when no complete entry exists for a key (none at all, or one without its ``.entry``)."""

    code = 404


class CorruptEntryError(CacheError):
    """Raised when an entry's ``.entry`` cannot be read or does not describe the entry,
    or when staged content does not match the file list given to ``publish``."""

    code = 422


class OutsideCacheError(CacheError):
    """Raised when a path given to the cache (a staging folder) is not where the cache keeps it."""

    code = 403


class LockError(CacheError):
    """Base of the lock errors: the entry's lock is not (or no longer) the caller's."""

    code = 409


class LockTimeoutError(LockError):
    """Raised when a lock could not be had within the wait timeout; names the holder."""


class LockNotHeldError(LockError):
    """Raised when an operation needs the entry's lock and the caller does not hold it
    (never took it, released it, or it was taken over after ``lock_timeout`` without refresh)."""


class UnknownLockError(LockError):
    """Raised by the service for a lock token it did not hand out (or already released)."""

    code = 404

