"""Which cache entries to evict: one chooser for ``Cache.prune`` and the reaper (DESIGN §8 ``prune``).

:class:`EvictionPolicy` is pure (no I/O): it picks from the rows of a
:func:`~ion.services.cache.store.scan`. Removing what it picked is
:meth:`Cache.evict <ion.services.cache.core.Cache.evict>`, under each entry's lock.
``Cache.prune(older_than, keep)`` is the policy ``max_age=older_than, keep=keep``;
the reaper's :class:`~ion.services.cache.reaper.ReapPolicy` adds ``max_bytes``,
``min_idle`` and the live link records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ion.services.cache.store import FoundEntry

__all__ = ["EvictionPolicy"]


def _age_key(f: FoundEntry) -> tuple[float, float]:
    assert f.info is not None
    return (f.info.last_used, f.info.fetched_at)


@dataclass(frozen=True)
class EvictionPolicy:
    """What to evict, by last use.

    :ivar max_age: entries unused for longer than this many seconds go (None: no age limit).
    :ivar keep: at most this many versions of each dependency (repository, platform,
        name, unpack) stay, most recently used first (None: all).
    :ivar max_bytes: least recently used entries go while the complete entries
        together are larger (None: no limit).
    :ivar min_idle: an entry used within this many seconds never goes (None: no such guard).
    """

    max_age: float | None = None
    keep: int | None = None
    max_bytes: int | None = None
    min_idle: float | None = None

    def choose(self, complete: list[FoundEntry], now: float,
               linked: Mapping[Path, int] | None = None) -> list[FoundEntry]:
        """The complete entries the policy evicts, least recently used first.

        ``linked`` maps an entry folder to its number of live link records; a
        linked entry never goes.
        """
        linked = linked or {}

        def eligible(f: FoundEntry) -> bool:
            assert f.info is not None
            if linked.get(f.path):
                return False
            return self.min_idle is None or now - f.info.last_used >= self.min_idle

        chosen: dict[Path, FoundEntry] = {}
        if self.max_age is not None:
            for f in complete:
                assert f.info is not None
                if now - f.info.last_used > self.max_age and eligible(f):
                    chosen[f.path] = f
        if self.keep is not None:
            groups: dict[tuple[str, str, str, bool], list[FoundEntry]] = {}
            for f in complete:
                groups.setdefault(f.key.dependency, []).append(f)
            for group in groups.values():
                group.sort(key=_age_key, reverse=True)
                for f in group[self.keep:]:
                    if eligible(f):
                        chosen[f.path] = f
        if self.max_bytes is not None:
            sizes = {f.path: f.info.size if f.info is not None else 0 for f in complete}
            total = sum(size for path, size in sizes.items() if path not in chosen)
            for f in sorted(complete, key=_age_key):
                if total <= self.max_bytes:
                    break
                if f.path in chosen or not eligible(f):
                    continue
                chosen[f.path] = f
                total -= sizes[f.path]
        return sorted(chosen.values(), key=_age_key)

    def targets(self, found: list[FoundEntry], now: float,
                linked: Mapping[Path, int] | None = None) -> list[FoundEntry]:
        """What an eviction round removes from a scan: the chosen complete entries and every
        incomplete one, in scan order (the input of :meth:`Cache.evict`)."""
        chosen = {f.path for f in self.choose([f for f in found if f.info is not None], now, linked)}
        return [f for f in found if f.path in chosen or f.info is None]
