"""Errors of the Cache service, under one root: :class:`CacheError`.

Each class carries the response code an op answers with when it escapes
(DESIGN §4: 4xx, the caller's request cannot be done as asked). They derive
from :class:`~ion.core.exceptions.ApplicationError` -- itself an
:class:`~ion.core.exceptions.IonError` -- so that an ``op_*`` letting one
escape answers with that code and the class name, with nothing to translate;
the core :class:`~ion.services.cache.core.Cache` still knows nothing of
messaging. :class:`~ion.services.cache.service.CacheClient` raises the same
classes again on the caller's side (:data:`ERRORS_BY_NAME`).
"""

from __future__ import annotations

from typing import ClassVar

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
    "ERRORS_BY_NAME",
]


class CacheError(ApplicationError):
    """Root of every Cache error; ``code`` is the response code of the error reply."""

    code_default: ClassVar[int] = 400

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message, type(self).code_default if code is None else code)

    def __str__(self) -> str:
        return self.message


class InvalidKeyError(CacheError):
    """Raised for an entry key, URL, relative path or argument the cache cannot use
    (an empty or ``..`` component, a version ending in ``.lock``, an unknown URL scheme)."""


class EntryNotFoundError(CacheError):
    """Raised when no complete entry exists for a key (none at all, or one without its ``.entry``)."""

    code_default = 404


class CorruptEntryError(CacheError):
    """Raised when an entry's ``.entry`` cannot be read or does not describe the entry,
    or when staged content does not match the file list given to ``publish``."""

    code_default = 422


class OutsideCacheError(CacheError):
    """Raised when a path given to the cache (a staging folder) is not where the cache keeps it."""

    code_default = 403


class LockError(CacheError):
    """Base of the lock errors: the entry's lock is not (or no longer) the caller's."""

    code_default = 409


class LockTimeoutError(LockError):
    """Raised when a lock could not be had within the wait timeout; names the holder."""


class LockNotHeldError(LockError):
    """Raised when an operation needs the entry's lock and the caller does not hold it
    (never took it, released it, or it was taken over after ``lock_timeout`` without refresh)."""


class UnknownLockError(LockError):
    """Raised by the service for a lock token it did not hand out (or already released)."""

    code_default = 404


#: Class name -> class, so a client can raise on its side what the service raised.
ERRORS_BY_NAME: dict[str, type[CacheError]] = {
    cls.__name__: cls
    for cls in (CacheError, InvalidKeyError, EntryNotFoundError, CorruptEntryError, OutsideCacheError,
                LockError, LockTimeoutError, LockNotHeldError, UnknownLockError)
}
