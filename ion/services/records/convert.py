# -*- test-case-name: tests.services.records.test_convert -*-
"""The deployer's records to and from their protobuf messages (``deployer.proto``, package ``ion.deployer``).

A message is read back into the dict form a plain-dict client sends
(``*_to_wire``), so it goes through the same validation
(:meth:`~ion.services.records.deployer.FetchRequest.from_wire`, the deploy
parser): a message is only another spelling of that dict. Importing this
module registers the ``ion.deployer`` types, so content of those types can be
decoded (:mod:`ion.core.messaging.message`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ion.services.records import deployer_pb2 as pb
from ion.services.records.deployer import DeploymentItem, FetchRequest, RepositoryURL

__all__ = [
    "pb",
    "repository_to_pb",
    "item_to_pb",
    "item_to_wire",
    "request_to_pb",
    "request_to_wire",
    "result_to_pb",
    "result_to_wire",
    "deploy_request_to_pb",
    "deploy_request_to_wire",
    "item_result_to_pb",
    "item_result_to_wire",
    "summary_to_pb",
    "summary_to_wire",
    "job_status_to_pb",
    "job_status_to_wire",
]


def repository_to_pb(url: RepositoryURL) -> Any:
    """The ``ion.deployer.Repository`` of a repository (its URL as sent: a ``file:`` URL absolute)."""
    return pb.Repository(url=url.wire_url, scheme=url.scheme, location=url.location, prefix=url.prefix)


def _set_sha256(msg: Any, sha256: str | Mapping[str, str] | None) -> None:
    if isinstance(sha256, str):
        msg.digest = sha256
    elif sha256 is not None:
        msg.files.digests.update(sha256)


def _sha256(msg: Any) -> str | dict[str, str] | None:
    which = msg.WhichOneof("sha256")
    if which == "digest":
        return str(msg.digest)
    if which == "files":
        return dict(msg.files.digests)
    return None


def _flags(msg: Any, names: tuple[str, ...]) -> dict[str, bool]:
    return {name: bool(getattr(msg, name)) for name in names if msg.HasField(name)}


def item_to_pb(item: DeploymentItem) -> Any:
    """The ``ion.deployer.Item`` of an item."""
    msg = pb.Item(repository=repository_to_pb(item.repository), name=item.name, version=item.version,
                  platform=item.platform, destination=str(item.destination), link=item.link, unpack=item.unpack,
                  keep_updated=item.keep_updated, position=item.position)
    _set_sha256(msg, item.sha256)
    return msg


def item_to_wire(msg: Any) -> dict[str, Any]:
    """An ``ion.deployer.Item`` as the dict of :meth:`DeploymentItem.to_dict` (to be checked as one)."""
    out: dict[str, Any] = {"name": msg.name, "version": msg.version, "platform": msg.platform,
                           "destination": msg.destination, "sha256": _sha256(msg), "position": msg.position}
    if msg.HasField("repository"):
        out["url"] = msg.repository.url
    out.update(_flags(msg, ("link", "unpack", "keep_updated")))
    return out


def request_to_pb(request: FetchRequest, *, job: str | None = None, item: str | None = None) -> Any:
    """The ``ion.deployer.FetchRequest`` of a request (``job``/``item``: for the progress events)."""
    msg = pb.FetchRequest(repository=repository_to_pb(request.repository), platform=request.platform,
                          name=request.name, version=request.version, unpack=request.unpack,
                          keep_updated=request.keep_updated, label=request.label, job=job or "", item=item or "")
    _set_sha256(msg, request.sha256)
    return msg


def request_to_wire(msg: Any) -> dict[str, Any]:
    """An ``ion.deployer.FetchRequest`` as the dict a plain-dict client sends (to be checked as one)."""
    out: dict[str, Any] = {"platform": msg.platform, "name": msg.name, "version": msg.version,
                           "sha256": _sha256(msg), "position": msg.label}
    if msg.HasField("repository"):
        out["url"] = msg.repository.url
    out.update(_flags(msg, ("unpack", "keep_updated")))
    for key in ("base_dir", "job", "item"):
        if getattr(msg, key):
            out[key] = getattr(msg, key)
    return out


def result_to_pb(wire: Mapping[str, Any]) -> Any:
    """The ``ion.deployer.FetchResult`` of a fetch's answer (:meth:`FetchResult.to_wire`)."""
    msg = pb.FetchResult(state=wire["state"], path=wire["path"], files=wire["files"], links=wire["links"],
                         content=wire["content"], key=pb.EntryKey(**wire["key"]), size=wire["size"],
                         fetched_at=wire["fetched_at"], stamp=wire["stamp"], warnings=wire["warnings"])
    if wire.get("url") is not None:
        msg.url = wire["url"]
    return msg


def result_to_wire(msg: Any) -> dict[str, Any]:
    """An ``ion.deployer.FetchResult`` as the dict :meth:`FetchResult.to_wire` answers."""
    key = msg.key
    return {"state": msg.state, "path": msg.path, "files": list(msg.files), "links": dict(msg.links),
            "content": list(msg.content),
            "key": {"repo_id": key.repo_id, "platform": key.platform, "name": key.name, "version": key.version,
                    "unpack": key.unpack},
            "size": int(msg.size), "url": msg.url if msg.HasField("url") else None,
            "fetched_at": float(msg.fetched_at), "stamp": msg.stamp, "warnings": list(msg.warnings)}


def deploy_request_to_pb(source: str, items: list[DeploymentItem], *, file: str | None = None,
                         host: str | None = None, file_sha256: str | None = None, partial: bool = False) -> Any:
    """The ``ion.deployer.DeployRequest`` of a deployment read where the caller runs (``file``,
    ``host``, ``file_sha256``: the deployment file it was read from, which names its generations;
    ``partial``: keep each item placed whatever the others do)."""
    return pb.DeployRequest(source=source, items=[item_to_pb(item) for item in items], file=file or "",
                            host=host or "", file_sha256=file_sha256 or "", partial=partial)


def deploy_request_to_wire(msg: Any) -> dict[str, Any]:
    """An ``ion.deployer.DeployRequest`` as the dict a plain-dict client sends (to be checked as one)."""
    out: dict[str, Any] = {"source": msg.source, "items": [item_to_wire(item) for item in msg.items],
                           "partial": msg.partial}
    for key in ("file", "host", "file_sha256"):
        if getattr(msg, key):
            out[key] = getattr(msg, key)
    return out


def item_result_to_pb(wire: Mapping[str, Any]) -> Any:
    """The ``ion.deployer.ItemResult`` of an item's outcome (``ItemResult.to_wire``; a durable
    record written by another version may lack keys: they read as empty)."""
    msg = pb.ItemResult(item=str(wire.get("item") or ""), position=str(wire.get("position") or ""),
                        state=str(wire.get("state") or ""), already=bool(wire.get("already")),
                        destination=str(wire.get("destination") or ""),
                        names=[str(n) for n in wire.get("names") or ()], link=bool(wire.get("link")))
    for key in ("reason", "entry"):
        if wire.get(key) is not None:
            setattr(msg, key, str(wire[key]))
    return msg


def item_result_to_wire(msg: Any) -> dict[str, Any]:
    """An ``ion.deployer.ItemResult`` as the dict ``ItemResult.to_wire`` answers."""
    return {"item": msg.item, "position": msg.position, "state": msg.state, "already": msg.already,
            "reason": msg.reason if msg.HasField("reason") else None, "destination": msg.destination,
            "entry": msg.entry if msg.HasField("entry") else None, "names": list(msg.names), "link": msg.link}


def summary_to_pb(wire: Mapping[str, Any]) -> Any:
    """The ``ion.deployer.DeploySummary`` of op ``deploy``'s answer."""
    return pb.DeploySummary(source=wire["source"], ok=wire["ok"],
                            items=[item_result_to_pb(item) for item in wire["items"]])


def summary_to_wire(msg: Any) -> dict[str, Any]:
    """An ``ion.deployer.DeploySummary`` as the dict op ``deploy`` answers to a plain-dict client."""
    return {"source": msg.source, "ok": msg.ok, "items": [item_result_to_wire(item) for item in msg.items]}


_OWNER_KEYS = ("container", "host", "pid", "process")


def job_status_to_pb(wire: Mapping[str, Any]) -> Any:
    """The ``ion.deployer.JobStatus`` of a deploy job's record (``ion.core.jobs``: in memory or durable)."""
    msg = pb.JobStatus(job=str(wire["job"]), status=pb.JobState.Name(int(wire["status"])),
                       cancelled=[str(c) for c in wire.get("cancelled") or ()],
                       from_record=bool(wire.get("from_record")), died=bool(wire.get("died")))
    for key in ("kind", "total", "error", "created", "ended"):
        if wire.get(key) is not None:
            setattr(msg, key, wire[key])
    for part, result in (wire.get("results") or {}).items():
        if isinstance(result, Mapping):
            msg.results[str(part)].CopyFrom(item_result_to_pb(result))
    owner = wire.get("owner")
    if isinstance(owner, Mapping):
        msg.owner.CopyFrom(_owner_to_pb(owner))
    for takeover in wire.get("takeovers") or ():
        if isinstance(takeover, Mapping):
            msg.takeovers.append(pb.JobTakeover(from_owner=_owner_to_pb(takeover.get("from") or {}),
                                                by_owner=_owner_to_pb(takeover.get("by") or {}),
                                                at=float(takeover.get("at") or 0.0)))
    return msg


def _owner_to_pb(owner: Mapping[str, Any]) -> Any:
    return pb.JobOwner(**{k: owner[k] for k in _OWNER_KEYS if owner.get(k) is not None})


def _owner_to_wire(owner: Any) -> dict[str, Any]:
    return {k: getattr(owner, k) for k in _OWNER_KEYS}


def job_status_to_wire(msg: Any) -> dict[str, Any]:
    """An ``ion.deployer.JobStatus`` as the dict op ``job_status`` answers to a plain-dict client."""
    out: dict[str, Any] = {"job": msg.job, "status": int(msg.status), "state": pb.JobState.Name(msg.status),
                           "results": {part: item_result_to_wire(r) for part, r in msg.results.items()},
                           "cancelled": list(msg.cancelled)}
    for key in ("kind", "total", "error", "created", "ended"):
        out[key] = getattr(msg, key) if msg.HasField(key) else None
    if msg.from_record:
        out["from_record"] = True
    if msg.died:
        out["died"] = True
    if msg.HasField("owner"):
        out["owner"] = _owner_to_wire(msg.owner)
    if msg.takeovers:
        out["takeovers"] = [{"from": _owner_to_wire(t.from_owner), "by": _owner_to_wire(t.by_owner), "at": t.at}
                            for t in msg.takeovers]
    return out
