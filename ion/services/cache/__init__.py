"""The Cache service of the dependency deployer (DESIGN §8).

- :mod:`~ion.services.cache.core`: :class:`Cache`, messaging-independent
  (lookup, locks, staging, atomic publish, verify, repair, quarantine, prune,
  clear, evict): the async facade that runs the store's operations in the pool.
- :mod:`~ion.services.cache.store`: the store, the blocking file operations on
  the cache tree (scan, ``.entry``, publish by rename, verify of one entry,
  quarantine, remove, staging folders).
- :mod:`~ion.services.cache.eviction`: :class:`EvictionPolicy`, the one chooser
  of what ``prune`` and the reaper evict.
- :mod:`~ion.services.cache.verify`: the periodic, paced verifier.
- :mod:`~ion.services.cache.reaper`: the elected reaper and the link records.
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
