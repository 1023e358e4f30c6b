# -*- test-case-name: tests.services.fetch.test_service -*-
"""The Fetch service: :class:`~ion.services.fetch.core.Fetcher` as an ION op, and its client.

``res/apps/fetch.app`` starts it (after the cache and unpack apps). It keeps
no cache of its own: it locks, stages and publishes through the Cache service
(:class:`~ion.services.fetch.core.RemoteCache`) and extracts through the
Unpack service, so every fetch of the system goes through one set of locks.

Op ``fetch``: content is an item (:class:`~ion.services.records.deployer.DeploymentItem` ``to_dict`` or
:meth:`FetchRequest.to_wire`: ``url, platform, name, version, unpack,
keep_updated, sha256``; optional ``base_dir`` for a relative ``file:`` URL and
``job``/``item`` copied into the progress events). Answer: ``{state: cached |
downloaded | updated, path, files, content, key, size, url, warnings}``. The
content may also be an ``ion.deployer.FetchRequest`` (``encoding: protobuf``,
:mod:`ion.services.records.convert`; FetchClient sends a record so), checked as
the dict it spells and answered with an ``ion.deployer.FetchResult``.

Errors answer with the class name and code of the error (the
:mod:`~ion.services.fetch.errors` classes, their ``url`` and other
``reply_fields`` in the content; an error of the Cache or Unpack service is
passed on with its name and code; a cancelled fetch is ``FetchCancelled``): 400 a bad request,
403 access denied (or a ``file:`` repository outside
``allowed_file_repositories``, or an HTTP repository at a loopback, private or
link-local address: ``AddressNotAllowedError``), 404 version folder or bucket not found, 409
the entry's lock could not be had, 422 checksum mismatch or a bad archive,
502 the repository kept failing (connection dropped, or a 5xx/429, after the
retries), 507 a file could not be written (a full disk: ``WriteError``).

Progress is published as events ``deploy.progress`` (``phase``, ``file``,
``bytes``, ``total``, the entry's ``name``/``version``/``platform`` and the
request's ``job``/``item``), at most every ``progress_interval`` seconds per file.

Config (``ion.services.fetch``): the transfer settings of
:class:`~ion.services.fetch.repository.FetchConfig`, ``max_concurrent``
(fetches handled at once), ``progress_interval``, ``allowed_file_repositories``
(folders a ``file:`` repository may be in, symlinks resolved; None: those of
``ion.services.deploy``, by default none), ``rpc_timeout`` (of the client).
``allowed_networks`` (CIDR strings, default none): the only non-global addresses
an HTTP(S) repository may be reached at (:mod:`~ion.services.fetch.netguard`);
from the container's config, narrowed (never widened) by app config and spawn arguments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from ion.core.exceptions import ReceivedError, RelayedError
from ion.core.security import narrow_networks, narrow_roots
from ion.core.service import ServiceClient, ServiceProcess
from ion.services.fetch.core import Fetcher, FetchProgress, FetchRequest, RemoteCache, remote_unpack
from ion.services.fetch.errors import FetchCancelled, FetchError, InvalidRequestError
from ion.services.fetch.netguard import CONFIG_KEY, AddressGuard
from ion.services.fetch.repository import FetchConfig
from ion.services.records import convert
from ion.services.records import deployer as records
from ion.services.records.deployer import DeploymentItem

__all__ = ["FetchService", "FetchClient", "DEFAULT_CLIENT_TIMEOUT"]

#: Seconds a FetchClient call waits unless configured (``rpc_timeout``): downloads can be long.
DEFAULT_CLIENT_TIMEOUT = FetchConfig.rpc_timeout

#: Buckets of ``ion_fetch_seconds`` (a cache hit takes milliseconds, a download minutes).
_FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Buckets of ``ion_fetch_lock_wait_seconds``.
_WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class FetchService(ServiceProcess):
    """Fetches dependency versions into the cache (DESIGN §8, "Fetch")."""

    service_name = "fetch"
    version = "0.1.0"
    _log = Logger()

    #: One long download must not hold up every other fetch.
    max_concurrent = FetchConfig.max_concurrent
    #: Terminate cancels the fetches in progress at once, in its first phase (see :mod:`ion.core.service`),
    #: while the receivers and the pool still run: a cancelled fetch needs them to release its lock
    #: through the Cache service and to remove its staging folder.
    drain_timeout = 0.0

    @defer.inlineCallbacks
    def slc_init(self) -> Any:
        from ion.services.cache.service import CacheClient
        from ion.services.unpack.service import UnpackClient

        self.fetch_config = FetchConfig.from_config(self.get_config)
        # A security bound (DESIGN §10): the container's config, narrowed but never widened by app
        # config and spawnargs (a spawn that would widen it fails).
        self.address_guard = AddressGuard.from_config(self.bounded_config(CONFIG_KEY, narrow_networks, []))
        self.progress_interval = self.fetch_config.progress_interval
        self.allowed_file_roots = yield self.container.blocking.run(self._file_roots)  # realpath: in the pool
        cache = RemoteCache(CacheClient(self), self.clock)
        self.fetcher = Fetcher(cache, remote_unpack(UnpackClient(self)), pool=self.container.blocking,
                               reactor=self.container.reactor, clock=self.clock, config=self.fetch_config,
                               guard=self.address_guard)

    def _file_roots(self) -> list[Path]:
        # A security bound: the container's config (else that of ion.services.deploy), narrowed
        # but never widened by app config and spawnargs.
        default = self.container.config.container_get("ion.services.deploy", "allowed_file_repositories", None)
        roots = self.bounded_config("allowed_file_repositories", narrow_roots, [] if default is None else default)
        return [Path(os.path.realpath(os.path.expanduser(r))) for r in roots]

    @defer.inlineCallbacks
    def slc_terminate(self) -> Any:
        yield self.fetcher.close()

    # -- helpers -----------------------------------------------------------------------------------
    def _check_file_repository(self, request: FetchRequest) -> None:
        if request.repository.scheme != "file":
            return
        resolved = Path(os.path.realpath(request.repository.location))
        if not any(resolved.is_relative_to(root) for root in self.allowed_file_roots):
            roots = ", ".join(str(r) for r in self.allowed_file_roots) or "none are configured"
            raise InvalidRequestError(
                f"file: repository {request.repository.location} (resolved {resolved}) is outside the folders a "
                f"request may read (allowed_file_repositories: {roots})", url=request.repository.url, code=403)

    def _progress(self, content: Mapping[str, Any], kind: str) -> Any:
        extra = {k: content[k] for k in ("job", "item") if k in content}
        last: dict[str | None, float] = {}
        metrics = self.container.metrics
        fetched = metrics.counter("ion_fetch_bytes", "Bytes downloaded, by repository kind.", ("kind",)).labels(kind)
        done: dict[str | None, int] = {}
        waiting: list[float] = []

        def count(p: FetchProgress) -> None:
            if p.phase == "downloading" and p.done is not None:
                fetched.inc(max(0, p.done - done.get(p.file, 0)))
                done[p.file] = p.done
            if p.phase == "waiting":
                waiting.append(self.clock.seconds())
            elif waiting:  # the lock came: how long it took
                metrics.histogram("ion_fetch_lock_wait_seconds", "Seconds a fetch waited for another's lock on "
                                  "its cache entry, by repository kind.", ("kind",),
                                  buckets=_WAIT_BUCKETS).labels(kind).observe(self.clock.seconds() - waiting.pop())

        def publish(p: FetchProgress) -> None:
            count(p)
            if p.phase == "downloading" and p.done not in (0, p.total):
                now = self.clock.seconds()
                if now - last.get(p.file, -1e9) < self.progress_interval:
                    return
                last[p.file] = now
            event = p.to_wire()
            event.update(extra)
            self.container.publish_event("deploy.progress", event)

        return publish

    def _count(self, kind: str, state: str, seconds: float) -> None:
        metrics = self.container.metrics
        metrics.counter("ion_fetch_results", "Fetches by repository kind and outcome (cached: a cache hit; "
                        "downloaded, updated: a miss; failed; cancelled).", ("kind", "state")).labels(kind, state).inc()
        metrics.histogram("ion_fetch_seconds", "Seconds a fetch took, by repository kind and outcome.",
                          ("kind", "state"), buckets=_FETCH_BUCKETS).labels(kind, state).observe(seconds)
        if state in ("cached", "downloaded", "updated"):
            metrics.counter("ion_cache_lookups", "Cache lookups of fetches: hit (cached) or miss (fetched).",
                            ("result",)).labels("hit" if state == "cached" else "miss").inc()

    # -- ops -----------------------------------------------------------------------------------------
    async def op_fetch(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Have an item's entry in the cache: ``{state, path, files, content, key, size, url, warnings}``."""
        protobuf = isinstance(content, convert.pb.FetchRequest)
        if protobuf:  # an ion.deployer.FetchRequest: read as the dict it spells, checked the same way
            content = convert.request_to_wire(content)
        request = FetchRequest.from_wire(content)
        # realpath may touch slow filesystems: resolve off the reactor thread.
        await self.container.blocking.run(self._check_file_repository, request)
        kind = request.repository.scheme
        started, state = self.clock.seconds(), "failed"
        # The caller may cancel it (FetchClient: when its own Deferred is cancelled or times out).
        d = self.cancellable(msg, self.fetcher.fetch(request, self._progress(content, kind)))
        try:
            result = await d
            state = result.state
        except defer.CancelledError:
            state = "cancelled"
            raise FetchCancelled(f"the fetch of {request.describe()} was cancelled by its caller") from None
        except ReceivedError as exc:  # the Cache or Unpack service refused: pass its answer on
            raise RelayedError(exc) from None
        finally:
            self._count(kind, state, self.clock.seconds() - started)
        # A protobuf request is answered with an ion.deployer.FetchResult, a dict with a dict.
        return convert.result_to_pb(result.to_wire()) if protobuf else result.to_wire()


class FetchClient(ServiceClient):
    """Calls the fetch service; raises the :mod:`~ion.services.fetch.errors` classes the service raised."""

    service_name = "fetch"
    errors = (FetchError,)
    #: A system service: its answers are taken from the system's operators only.
    trusted = True

    def _timeout(self, timeout: float | None) -> float:
        if timeout is not None:
            return timeout
        return self.proc.container.config.settings(FetchConfig).rpc_timeout

    @defer.inlineCallbacks
    def fetch(self, item: DeploymentItem | records.FetchRequest | Mapping[str, Any], *, timeout: float | None = None,
              job: str | None = None, position: str | None = None) -> Any:
        """Have ``item``'s entry in the cache; the service's answer (a dict with ``state`` and ``path``).

        :param job: copied into the progress events, with ``position`` (as ``item``).
        :raises FetchError: (its subclass) as the service raised it; other refusals as
            :class:`~ion.core.exceptions.ReceivedApplicationError` / ``ReceivedContainerError``.
        """
        content: Any
        if isinstance(item, (DeploymentItem, records.FetchRequest)):
            # A record is sent as an ion.deployer.FetchRequest (encoding: protobuf).
            request = FetchRequest.from_item(item) if isinstance(item, DeploymentItem) else item
            content = convert.request_to_pb(request, job=job, item=position)
        else:
            content = dict(item)
            if job is not None:
                content["job"] = job
            if position is not None:
                content["item"] = position
        # Cancelling this call (or its timeout) cancels the download at the service too.
        result, _headers = yield self.cancellable_call("fetch", content, timeout=self._timeout(timeout))
        if isinstance(result, convert.pb.FetchResult):
            return convert.result_to_wire(result)
        return result
