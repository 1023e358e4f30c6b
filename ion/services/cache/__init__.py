"""The Cache service of the dependency deployer (DESIGN §8).

- :mod:`~ion.services.cache.core`: :class:`Cache`, messaging-independent
  (lookup, locks, staging, atomic publish, verify, repair, prune, clear).
- :mod:`~ion.services.cache.locks`: the entry locks (in-process and lock files).
- :mod:`~ion.services.cache.entry`: keys, file metadata, the ``.entry`` file.
- :mod:`~ion.services.cache.errors`: :class:`CacheError` and its subclasses.
- :mod:`~ion.services.cache.service`: ``CacheService`` and ``CacheClient``
  (imported from there, so the core needs no container).
"""

from ion.services.cache.core import DEFAULT_LOCK_TIMEOUT, Cache, default_root, sha256_file
from ion.services.cache.entry import EntryInfo, EntryKey, EntryReport, FileMeta, PruneReport, repo_id
from ion.services.cache.errors import (
    CacheError,
    CorruptEntryError,
    EntryNotFoundError,
    InvalidKeyError,
    LockError,
    LockNotHeldError,
    LockTimeoutError,
    OutsideCacheError,
    UnknownLockError,
)
from ion.services.cache.locks import CacheLock, LockHolder, resolve_host_id

__all__ = [
    "Cache", "CacheLock", "LockHolder", "EntryKey", "EntryInfo", "EntryReport", "FileMeta", "PruneReport",
    "repo_id", "default_root", "sha256_file", "resolve_host_id", "DEFAULT_LOCK_TIMEOUT",
    "CacheError", "CorruptEntryError", "EntryNotFoundError", "InvalidKeyError", "LockError",
    "LockNotHeldError", "LockTimeoutError", "OutsideCacheError", "UnknownLockError",
]
