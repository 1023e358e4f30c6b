"""The Deploy core: every item of a deployment fetched (bounded in parallel) and put in place.

Messaging-independent: it is given a ``fetch`` function (the Fetch core in
process, or a ``FetchClient`` through the services) and a pool for blocking
work. One failed item never stops the others; the result lists each item's
state:

- ``cached``: the cache had it; ``downloaded``: fetched now; ``updated``:
  refetched because the remote changed (``keep_updated``);
- ``failed``, with the reason;
- ``cancelled``: the deployment was cancelled (``Deferred.cancel()``, e.g. its
  service stopping) before the item was in place;
- ``rolled back``: it was switched in, then back to its previous version
  because another item failed or was cancelled (all or nothing, below).

and whether its destination was already right (``already``).

**All or nothing** (the default): each item is placed two-phase
(``place(pending=True)``: its names switched in, its previous version kept
aside). When every item is in place, each switch is committed (the previous
versions removed); when any item failed or was cancelled, every item this
deployment switched is switched back (the last first), so each destination
holds its previous generation whole, files and manifests; an item whose
fetch ends after a failure is not switched in at all (``rolled back`` too,
unless it was in place already). ``partial=True`` keeps the item-by-item behaviour: each item committed as it is placed, the
others left as they are. A deployer killed between the switches and their
commit leaves each item whole, in its new or its previous version (the
previous one removed by the next placement of the item).

**Cancellation.** Cancelling the Deferred of :meth:`Deployer.deploy` cancels
every fetch not finished yet (through ``fetch``'s Deferred: the Fetch core
then releases its lock and removes its staging folders); an item already
being placed is left to finish (placement is local and short, and a half
placed destination is worse than a late stop). The Deferred then fires
normally, once those fetches have cleaned up, with every item's result:
the finished ones as they are, the others ``cancelled``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core.exceptions import ApplicationError
from ion.core.safefs import WalkCache, lies_in
from ion.core.threads import run_short
from ion.services.deploy.place import PlacementError, Switch, Target, commit, place, placed_already, undo
from ion.services.deploy.settings import DeploySettings
from ion.services.deploy.spec import Deployment, DeploymentItem

__all__ = ["Deployer", "ItemResult", "FetchFunction", "ProgressFunction", "check_allowed", "AccessRefused",
           "CANCELLED_REASON", "ROLLED_BACK"]

_log = Logger()

T = TypeVar("T")

#: The reason of an item whose deployment was cancelled before it was in place.
CANCELLED_REASON = "cancelled before it was in place (the deployment was stopped)"
#: The state of an item switched back to its previous version (all or nothing).
ROLLED_BACK = "rolled back"

#: ``progress(item, phase, info)`` — phase is ``fetch``, ``bytes``, ``place``, ``done``, ``failed``, ``cancelled``,
#: ``rolled back``.
ProgressFunction = Callable[[DeploymentItem, str, Mapping[str, Any]], None]


class FetchFunction(Protocol):
    """Brings one item into the cache; fires with ``{"state", "path", "names", "stamp"}``.

    ``state`` is ``cached``, ``downloaded`` or ``updated``; ``path`` the cache
    entry folder; ``names`` its top-level names; ``stamp`` what identifies the
    entry's content (e.g. its fetch time).
    """

    def __call__(self, item: DeploymentItem,
                 progress: Callable[[str, Mapping[str, Any]], None]) -> defer.Deferred[dict[str, Any]]: ...


class AccessRefused(ApplicationError):
    """A path outside the roots a service may use (403)."""

    code = 403


def _resolved(path: Path) -> Path:
    """``path`` with symlinks resolved as far as it exists (and ``..`` folded)."""
    return Path(os.path.realpath(path))


def check_allowed(path: Path, roots: Iterable[str | Path], what: str) -> Path:
    """Refuse a path that is not under one of ``roots`` once symlinks are resolved.

    :return: the realpath of the root it is under (where a write to it starts its walk).
    :raises AccessRefused: naming the path and the roots it missed.
    """
    root_paths = [Path(r) for r in roots]
    real = _resolved(path)
    for root in root_paths:
        real_root = _resolved(root)
        if lies_in(real, real_root):
            return real_root
    allowed = ", ".join(str(r) for r in root_paths) or "none configured"
    raise AccessRefused(f"{what} {path} (resolved: {real}) is outside the allowed roots ({allowed})")


@dataclass
class ItemResult:
    """The outcome of one item."""

    item: DeploymentItem
    state: str
    already: bool = False
    reason: str | None = None
    entry: str | None = None
    names: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.state not in ("failed", "cancelled", ROLLED_BACK)

    @property
    def cancelled(self) -> bool:
        """The item was cancelled before it was in place."""
        return self.state == "cancelled"

    def to_wire(self) -> dict[str, Any]:
        return {
            "item": self.item.label, "position": self.item.position, "state": self.state,
            "already": self.already, "reason": self.reason, "destination": str(self.item.destination),
            "entry": self.entry, "names": list(self.names), "link": self.item.link,
        }


def resolve_targets(destinations: list[Path]) -> list[Target]:
    """Each destination's realpath now, walked from ``/`` at write time (blocking)."""
    return [Target.resolve(destination) for destination in destinations]


class Deployer:
    """Runs deployments.

    :param fetch: brings an item into the cache (see :class:`FetchFunction`).
    :param pool: runs blocking calls (placement) off the reactor.
    :param max_parallel: items fetched at once.
    :param cache_root: the cache's root folder: a destination in it is refused
        (published entries are never written by a deployment).
    """

    def __init__(self, fetch: FetchFunction, pool: Any, *, max_parallel: int = DeploySettings.max_parallel,
                 cache_root: Path | None = None) -> None:
        self.fetch = fetch
        self.pool = pool
        self.max_parallel = max(1, int(max_parallel))
        self.cache_root = cache_root

    def deploy(self, deployment: Deployment, *, progress: ProgressFunction | None = None,
               on_result: Callable[[ItemResult], None] | None = None,
               targets: list[Target] | None = None, partial: bool = False,
               keep: Callable[[], Awaitable[bool]] | None = None) -> defer.Deferred[list[ItemResult]]:
        """Deploy every item; fires with one :class:`ItemResult` per item, in file order.

        :param targets: one per item, in order: where each destination was checked
            (resolved) and the root its walk starts from at write time (the Deploy
            service's allowed roots). None: each destination's realpath now, walked
            from ``/`` (``ion-deploy`` in process): a folder swapped for a link
            during the fetch is refused either way, never followed.
        :param partial: keep each item placed whatever the others do; by default
            (all or nothing) a failed or cancelled item switches back every item this
            deployment switched (``rolled back``); ``on_result`` is called again for those.
        :param keep: asked (awaited), all or nothing, when the deployment did not end whole: True
            commits what it switched in, as a partial deployment would, instead of switching it back
            (the Deploy service: its job was taken over by another instance, which counts the items
            finished here as done and runs the rest).
        """
        if targets is None:
            # realpath may block (a slow or network filesystem): resolved in the pool, then deployed.
            resolved = self.pool.run(resolve_targets, [item.destination for item in deployment.items])
            return resolved.addCallback(lambda found: self.deploy(deployment, progress=progress, on_result=on_result,
                                                                  targets=found, partial=partial, keep=keep))
        if len(targets) != len(deployment.items):
            raise ValueError("one target per item")
        semaphore = defer.DeferredSemaphore(self.max_parallel)
        # The folders above the destinations, each walked to once in this deployment (then each
        # placement, check and commit walks from its destination's parent; no link followed, as ever).
        walks = WalkCache()
        fetches: dict[tuple[Any, ...], _Shared] = {}
        # Items placed into one destination are placed one after the other (they
        # may share manifest files and names); different destinations in parallel.
        placing: dict[Path, defer.DeferredLock] = {}
        # All or nothing: what each item switched in, in the order switched (committed or undone at the end).
        switched: list[tuple[int, Switch]] = []
        # All or nothing: the items that did not deploy so far (once one has, no other is switched in).
        failures: list[str] = []

        def report(item: DeploymentItem, phase: str, info: Mapping[str, Any]) -> None:
            if progress is not None:
                try:
                    progress(item, phase, info)
                except Exception:
                    _log.failure("progress callback failed")

        def fetch_once(item: DeploymentItem) -> defer.Deferred[dict[str, Any]]:
            # The same dependency named by several items is fetched once; the
            # others wait on that one fetch (no lock polling, no extra time).
            key = (item.repository.url, item.platform, item.name, item.version, item.unpack,
                   item.keep_updated, str(item.sha256))
            shared = fetches.get(key)
            if shared is None:
                report(item, "fetch", {})
                shared = fetches[key] = _Shared(
                    semaphore.run(self.fetch, item, lambda phase, info: report(item, phase, info)))
            return shared.wait()

        async def one(index: int, item: DeploymentItem, target: Target) -> ItemResult:
            try:
                fetched = await fetch_once(item)
                lock = placing.setdefault(target.path, defer.DeferredLock())
                await lock.acquire()
            except defer.CancelledError:
                result = ItemResult(item, "cancelled", reason=CANCELLED_REASON)
            except Exception as exc:
                result = ItemResult(item, "failed", reason=_reason(exc))
            else:
                try:
                    result, switch = await _despite_cancel(defer.ensureDeferred(
                        self._place(item, target, fetched, report, pending=not partial,
                                    hold_back=None if partial else failures, walks=walks)))
                    if switch is not None:
                        switched.append((index, switch))
                finally:
                    lock.release()
            if not result.ok and result.state != ROLLED_BACK:
                failures.append(f"{item.label}: {result.state}")
            phase = "done" if result.ok else result.state if result.state in ("cancelled", ROLLED_BACK) else "failed"
            report(item, phase, result.to_wire())
            if on_result is not None:
                on_result(result)
            return result

        def settled(outcome: Any) -> Any:
            # A cancelled run ends only when the fetches it cancelled have cleaned up
            # (locks released, staging removed): the caller may stop the reactor next.
            pending = [shared.source for shared in fetches.values() if not shared.fired]
            if not pending:
                return outcome
            return defer.DeferredList(pending, consumeErrors=True).addCallback(lambda _: outcome)

        def finish(outcome: Any) -> Any:
            # Every item has ended (a placement under way was let finish): keep all, or switch all back.
            if not switched:
                return outcome
            work = defer.ensureDeferred(self._finish(outcome, switched, report, on_result, keep))
            return defer.ensureDeferred(_despite_cancel(work))

        def close_walks(outcome: Any) -> Any:
            walks.close()  # (a walk still under way keeps its folders open until it ends)
            return outcome

        results = defer.gatherResults([defer.ensureDeferred(one(index, item, target)) for index, (item, target)
                                       in enumerate(zip(deployment.items, targets, strict=True))])
        return results.addBoth(finish).addBoth(settled).addBoth(close_walks)

    async def _finish(self, outcome: Any, switched: list[tuple[int, Switch]], report: ProgressFunction,
                      on_result: Callable[[ItemResult], None] | None,
                      keep: Callable[[], Awaitable[bool]] | None = None) -> Any:
        """Commit every switch when every item is in place, or when ``keep()`` says so (see
        :meth:`deploy`); else switch each back, the last first, and make its item's result
        ``rolled back`` (or ``failed``, saying so, where that failed)."""
        results: list[ItemResult] | None = None if isinstance(outcome, Failure) else list(outcome)
        whole = results is not None and all(r.ok for r in results)
        if not whole and keep is not None and await self._asked_to_keep(keep):
            _log.warn("a deployment that did not end whole keeps the {n} item(s) it switched in: its caller "
                      "says they are another's to keep (a job taken over by another instance)", n=len(switched))
            whole = True
        if whole:
            # In at most max_parallel pool jobs, each committing its share of the switches in turn (a
            # job per switch cost more on the reactor than the commit); two in one destination take
            # its lock in turn.
            switches = [switch for _, switch in switched]
            size = -(-len(switches) // self.max_parallel)
            chunks = [switches[i:i + size] for i in range(0, len(switches), size)]
            jobs = [self.pool.run(commit, chunk[0]).addCallback(lambda problems: [problems]) if len(chunk) == 1
                    else self.pool.run(_commit_each, chunk) for chunk in chunks]
            for ok, done in await defer.DeferredList(jobs, consumeErrors=True):
                for problems in done if ok else [done]:
                    if isinstance(problems, Failure):
                        _log.failure("committing a placement failed", problems)
                        continue
                    for problem in problems:
                        _log.warn("{problem} (the next placement removes it)", problem=problem)
            return outcome
        why = "the deployment did not end"
        if results is not None:
            bad = [r for r in results if not r.ok and r.state != ROLLED_BACK]
            why = (f"{len(bad)} item(s) of this deployment did not deploy "
                   f"({', '.join(f'{r.item.label}: {r.state}' for r in bad[:3])}{', ...' if len(bad) > 3 else ''})")
        for index, switch in reversed(switched):
            item_result = results[index] if results is not None else None
            try:
                await self.pool.run(undo, switch)
            except Exception as exc:
                _log.error("cannot switch {dest} back: {exc}", dest=str(switch.destination), exc=_reason(exc))
                if item_result is None:
                    continue
                new = ItemResult(item_result.item, "failed", reason=f"{why}, and switching it back to its "
                                 f"previous version failed: {_reason(exc)}; it holds the new version",
                                 entry=item_result.entry, names=item_result.names)
            else:
                if item_result is None:
                    continue
                new = ItemResult(item_result.item, ROLLED_BACK, reason=f"switched back to its previous version: "
                                 f"{why} (all or nothing; a partial deployment keeps what was placed)",
                                 entry=item_result.entry, names=item_result.names)
            assert results is not None
            results[index] = new
            report(new.item, new.state if new.state == ROLLED_BACK else "failed", new.to_wire())
            if on_result is not None:
                on_result(new)
        return results if results is not None else outcome

    @staticmethod
    async def _asked_to_keep(keep: Callable[[], Awaitable[bool]]) -> bool:
        """``keep()``'s answer; False (all or nothing, as ever) if it cannot say."""
        try:
            return bool(await keep())
        except Exception:
            _log.failure("asking whether to keep a deployment's switches failed; switching them back")
            return False

    async def _place(self, item: DeploymentItem, target: Target, fetched: Mapping[str, Any],
                     report: ProgressFunction, *, pending: bool, hold_back: list[str] | None = None,
                     walks: WalkCache | None = None) -> tuple[ItemResult, Switch | None]:
        """Place one fetched item (two-phase when ``pending``): its result and its switch, if any.

        ``hold_back`` (all or nothing): the items that did not deploy so far; if there are
        any, an item not in place already is not switched in (``rolled back``, saying why).
        """
        entry = Path(fetched["path"])
        names = list(fetched.get("names") or [])
        report(item, "place", {"destination": str(item.destination)})
        how = dict(link=item.link, platform=item.platform, name=item.name, version=item.version,
                   entry_stamp=str(fetched.get("stamp") or ""))
        try:
            placed = None
            if fetched.get("state", "cached") == "cached" or hold_back:
                # Most items of a warm deploy are in place already: a short check, with the others'.
                # (A fetched one goes straight to place(), which finds it in place as well, under
                # the destination's lock: one pool job, not two. Not when one that is not in place
                # must be held back, below.)
                placed = await run_short(self.pool, placed_already, entry, names, target.path, root=target.root,
                                         walks=walks, **how)
            if placed is None and hold_back:
                return ItemResult(item, ROLLED_BACK, entry=str(entry), reason=(
                    f"not switched in: {len(hold_back)} item(s) of this deployment did not deploy "
                    f"({', '.join(hold_back[:3])}{', ...' if len(hold_back) > 3 else ''}); its previous version "
                    f"stays (all or nothing; a partial deployment keeps what was placed)")), None
            if placed is None:
                placed = await self.pool.run(place, entry, names, target.path, root=target.root,
                                             cache_root=self.cache_root, pending=pending, walks=walks, **how)
        except PlacementError as exc:
            return ItemResult(item, "failed", reason=str(exc), entry=str(entry)), None
        except Exception as exc:
            _log.failure("placing {item} failed", item=item.label)
            return ItemResult(item, "failed", reason=_reason(exc), entry=str(entry)), None
        return ItemResult(item, str(fetched.get("state", "cached")), already=placed.already,
                          entry=str(entry), names=tuple(placed.names)), placed.switch


def _commit_each(switches: list[Switch]) -> list[list[str] | Failure]:
    """In a pool thread: :func:`commit` each switch in turn; each one's problems, or its Failure."""
    outcomes: list[list[str] | Failure] = []
    for switch in switches:
        try:
            outcomes.append(commit(switch))
        except Exception:
            outcomes.append(Failure())
    return outcomes


class _Shared:
    """One Deferred's outcome, handed to any number of waiters, early or late.

    Cancelling a waiter withdraws it; when the last waiter is withdrawn before
    the outcome, the work itself is cancelled (its locks and staging released).
    """

    def __init__(self, d: defer.Deferred[Any]) -> None:
        self._waiters: list[defer.Deferred[Any]] = []
        self._outcome: Any = None
        self.fired = False
        d.addBoth(self._fire)
        #: Fires (with None) once the work has ended, however.
        self.source: defer.Deferred[Any] = d

    def _fire(self, outcome: Any) -> None:
        self.fired, self._outcome = True, outcome
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            self._hand(w)

    def _hand(self, w: defer.Deferred[Any]) -> None:
        if isinstance(self._outcome, Failure):
            w.errback(self._outcome)
        else:
            w.callback(self._outcome)

    def _withdraw(self, w: defer.Deferred[Any]) -> None:
        if w in self._waiters:
            self._waiters.remove(w)
        if not self._waiters and not self.fired:
            self.source.cancel()

    def wait(self) -> defer.Deferred[Any]:
        w: defer.Deferred[Any] = defer.Deferred(self._withdraw)
        if self.fired:
            self._hand(w)
        else:
            self._waiters.append(w)
        return w


def _fire_unless_called(_: Any, waiter: defer.Deferred[None]) -> None:
    if not waiter.called:
        waiter.callback(None)


async def _despite_cancel(d: defer.Deferred[T]) -> T:
    """``d``'s result; a cancel of the awaiting coroutine is ignored and ``d`` awaited to its end."""
    outcome: list[Any] = []

    def keep(result: Any) -> None:
        outcome.append(result)

    d.addBoth(keep)
    while not outcome:
        waiter: defer.Deferred[None] = defer.Deferred()
        d.addBoth(_fire_unless_called, waiter)
        try:
            await waiter
        except defer.CancelledError:
            _log.info("a deployment was cancelled while an item was being placed; letting it finish")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    result: T = outcome[0]
    return result


def _reason(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return f"{message}"
