"""Jobs that survive their container (issue #17 §4), in the job table: a record with ``resume`` data
whose owner is gone is claimed by exactly one table on the same folder, which runs the parts not
finished; ``takeovers`` says who took it from whom; the number of takeovers is bounded.

The tables share one :class:`JobStore` folder (records written at once: no pool), a ``task.Clock``
measures the grace, and ``owner_alive`` is a set of the owners still alive.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from ion.core.jobs import JobStatus, JobStore, JobTable

OWNERS = {name: {"container": name, "host": "h", "pid": i, "process": f"{name}.1"}
          for i, name in enumerate(("a", "b", "c", "d", "e"), start=1)}


class World:
    """Tables on one folder and one clock; ``alive`` names the owners still running."""

    def __init__(self, folder: Path, grace: float = 2.0) -> None:
        self.clock = task.Clock()
        self.store = JobStore(folder)
        self.alive = set(OWNERS)
        self.grace = grace
        #: (table's owner, job id, parts already finished) per resume call.
        self.resumed: list[tuple[str, str, list[str]]] = []
        #: The work Deferred each resume handed out, by owner.
        self.work: dict[str, defer.Deferred[Any]] = {}

    def table(self, name: str) -> JobTable:
        async def resume(job_id: str, record: Mapping[str, Any]) -> defer.Deferred[Any]:
            self.resumed.append((name, job_id, sorted(record.get("results") or {})))
            self.work[name] = defer.Deferred()
            return self.work[name]

        return JobTable(self.clock, store=self.store, owner=OWNERS[name], resume=resume,
                        owner_alive=lambda owner: owner.get("container") in self.alive,
                        takeover_grace=self.grace)

    def on_disk(self, job_id: str) -> dict[str, Any]:
        return dict(json.loads(self.store.path(job_id).read_text()))


def fired(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def start_job(world: World, table: JobTable) -> str:
    """A job of three parts with resume data, ``p1`` finished, the rest running."""
    job = table.start("deploy", defer.Deferred(), total=3, job_id="a.1/j1",
                      resume={"items": ["p1", "p2", "p3"], "caller": "alice"})
    table.partial(job.job_id, "p1", {"state": "downloaded"})
    return job.job_id


def test_a_dead_owners_job_is_taken_over_after_the_grace_and_finishes_the_rest(tmp_path: Path) -> None:
    """Two scans ``takeover_grace`` apart judge the owner gone, then the job is resumed with its finished
    parts kept; its record names the new owner and the takeover; the end merges the resumed parts."""
    world = World(tmp_path)
    owner, other = world.table("a"), world.table("b")
    job_id = start_job(world, owner)
    assert fired(other.scan()) == []  # alive: nothing to take over
    world.alive.discard("a")  # its container died (the table is never used again)
    assert fired(other.scan()) == [] and world.resumed == []  # judged gone once: not yet
    world.clock.advance(2)
    assert fired(other.scan()) == [job_id]
    assert world.resumed == [("b", job_id, ["p1"])]
    record = world.on_disk(job_id)
    assert record["owner"] == OWNERS["b"] and record["state"] == "PARTIAL"
    assert record["takeovers"] == [{"from": OWNERS["a"], "by": OWNERS["b"], "at": 2.0}]
    assert record["resume"] == {"items": ["p1", "p2", "p3"], "caller": "alice"}
    other.partial(job_id, "p2", {"state": "cached"})
    world.work["b"].callback({"p2": {"state": "cached"}, "p3": {"state": "downloaded"}})
    status = other.status(job_id)
    assert (status["state"], sorted(status["results"])) == ("FINISHED", ["p1", "p2", "p3"])
    assert status["takeovers"][0]["from"] == OWNERS["a"]
    assert world.on_disk(job_id)["state"] == "FINISHED"
    assert fired(world.table("c").scan()) == []  # ended: nothing left to take over


def test_an_owner_seen_alive_again_keeps_its_job(tmp_path: Path) -> None:
    """Judged gone once, then alive (a connection blip): the grace starts over, nobody claims."""
    world = World(tmp_path)
    job_id = start_job(world, world.table("a"))
    other = world.table("b")
    world.alive.discard("a")
    fired(other.scan())
    world.alive.add("a")
    world.clock.advance(2)
    fired(other.scan())
    world.alive.discard("a")
    world.clock.advance(1)
    assert fired(other.scan()) == [] and world.resumed == []
    assert world.on_disk(job_id)["owner"] == OWNERS["a"]


def test_exactly_one_of_several_instances_takes_a_job_over(tmp_path: Path) -> None:
    """Three tables notice at once: one claim file wins; the others answer the record that names it."""
    world = World(tmp_path, grace=0)
    job_id = start_job(world, world.table("a"))
    world.alive.discard("a")
    tables = [world.table(name) for name in ("b", "c", "d")]
    taken = [fired(t.scan()) for t in tables]
    assert taken == [[job_id], [], []] and [r[0] for r in world.resumed] == ["b"]
    assert world.store.claim_path(job_id, 1).exists()
    # job_status asked of a loser: the record as the winner wrote it.
    answer = fired(tables[2].lookup(job_id))
    assert answer["from_record"] is True and answer["takeovers"][0]["by"] == OWNERS["b"]
    assert "resume" not in answer


def test_a_claim_race_between_two_claimers_has_one_winner(tmp_path: Path) -> None:
    """Both read the record before either claimed: the second claim of the same takeover fails."""
    store = JobStore(tmp_path)
    assert fired(store.claim("x.1/j", 1, OWNERS["b"])) is True
    assert fired(store.claim("x.1/j", 1, OWNERS["c"])) is False
    assert json.loads(store.claim_path("x.1/j", 1).read_text()) == OWNERS["b"]
    assert [p.name for p in tmp_path.iterdir()] == [store.claim_path("x.1/j", 1).name]  # no temp file left


def test_a_claimer_that_died_before_writing_the_record_does_not_block_the_job(tmp_path: Path) -> None:
    """A claim file of a dead claimer (it died between its claim and its record): the next number is claimed."""
    world = World(tmp_path, grace=0)
    job_id = start_job(world, world.table("a"))
    world.alive -= {"a", "b"}
    fired(world.store.claim(job_id, 1, OWNERS["b"]))
    assert fired(world.table("c").scan()) == [job_id]
    assert world.store.claim_path(job_id, 2).exists() and world.on_disk(job_id)["owner"] == OWNERS["c"]


def test_a_claimer_that_backs_out_leaves_the_job_to_the_next(tmp_path: Path, monkeypatch: Any) -> None:
    """An instance that claimed a takeover and then backs out (it began to drain while it read the record
    back; or the record it had read was stale) gives its claim back: the job is not ended by a
    resume hook that is gone, and another instance takes it over (never RUNNING forever)."""
    world = World(tmp_path, grace=0)
    job_id = start_job(world, world.table("a"))
    world.alive.discard("a")
    draining = world.table("b")
    load = world.store.load

    def load_while_draining(job: str) -> Any:
        draining.resume = None  # slc_drain: a stopping instance takes nothing over
        return load(job)

    monkeypatch.setattr(world.store, "load", load_while_draining)
    assert fired(draining.scan()) == []
    monkeypatch.setattr(world.store, "load", load)
    record = world.on_disk(job_id)
    assert record["state"] == "PARTIAL" and record["owner"] == OWNERS["a"] and job_id not in draining.jobs
    assert fired(world.table("c").scan()) == [job_id]
    assert world.on_disk(job_id)["owner"] == OWNERS["c"] and [r[0] for r in world.resumed] == ["c"]


def test_job_status_of_a_dead_owners_job_takes_it_over(tmp_path: Path) -> None:
    """``lookup`` (job_status) of a resumable record whose owner is gone claims it and answers the job
    as now run here; a record without resume data still answers LOST_IN_SPACE."""
    world = World(tmp_path, grace=0)
    owner = world.table("a")
    job_id = start_job(world, owner)
    plain = owner.start("deploy", defer.Deferred(), total=1, job_id="a.1/plain")
    world.alive.discard("a")
    other = world.table("b")
    answer = fired(other.lookup(job_id))
    assert (answer["state"], list(answer["results"])) == ("PARTIAL", ["p1"])
    assert answer["takeovers"][0]["by"] == OWNERS["b"] and "from_record" not in answer
    lost = fired(other.lookup(plain.job_id))
    assert (lost["status"], lost["died"]) == (JobStatus.LOST_IN_SPACE, True)


def test_takeovers_are_bounded(tmp_path: Path) -> None:
    """Each owner dies in turn: three takeovers resume the job, the fourth ends it REMOTE_ERROR saying why."""
    world = World(tmp_path, grace=0)
    job_id = start_job(world, world.table("a"))
    for dead, taker in (("a", "b"), ("b", "c"), ("c", "d")):
        world.alive.discard(dead)
        assert fired(world.table(taker).scan()) == [job_id]
    world.alive.discard("d")
    last = world.table("e")
    assert fired(last.scan()) == [job_id]
    assert [r[0] for r in world.resumed] == ["b", "c", "d"]
    status = last.status(job_id)
    assert status["state"] == "REMOTE_ERROR" and "died 4 times" in status["error"]
    assert [t["by"]["container"] for t in status["takeovers"]] == ["b", "c", "d", "e"]
    assert list(status["results"]) == ["p1"]
    assert world.on_disk(job_id)["state"] == "REMOTE_ERROR"


def test_a_table_without_resume_takes_nothing_over(tmp_path: Path) -> None:
    """No resume hook (takeover off, or a draining instance): scan does nothing, lookup says LOST_IN_SPACE."""
    world = World(tmp_path, grace=0)
    job_id = start_job(world, world.table("a"))
    world.alive.discard("a")
    table = world.table("b")
    table.resume = None
    assert fired(table.scan()) == []
    assert fired(table.lookup(job_id))["state"] == "LOST_IN_SPACE"
    assert not world.store.claim_path(job_id, 1).exists()


def test_remove_takes_the_claim_files_too(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    fired(store.save("x.1/j", {"job": "x.1/j"}))
    fired(store.claim("x.1/j", 1, OWNERS["b"]))
    fired(store.claim("x.1/j2", 1, OWNERS["b"]))
    fired(store.remove("x.1/j"))
    assert [p.name for p in tmp_path.iterdir()] == [store.claim_path("x.1/j2", 1).name]


def test_a_lookup_while_this_table_is_taking_the_job_over_claims_nothing_more(tmp_path: Path) -> None:
    """Between its claim and the job running here (its resume hook still starting), a ``lookup`` or a
    scan of the same table must not take its own claim for a dead claimer's and claim the next takeover."""
    world = World(tmp_path, grace=0)
    job_id = start_job(world, world.table("a"))
    world.alive.discard("a")
    starting: defer.Deferred[None] = defer.Deferred()
    table = world.table("b")
    plain_resume = table.resume
    assert plain_resume is not None

    async def slow_resume(job: str, record: Mapping[str, Any]) -> defer.Deferred[Any]:
        await starting
        return await plain_resume(job, record)

    table.resume = slow_resume
    scanning = table.scan()
    assert not scanning.called and world.store.claim_path(job_id, 1).exists()
    answer = fired(table.lookup(job_id))
    assert answer["owner"] == OWNERS["a"] and answer["from_record"] is True
    assert fired(table.scan()) == []
    assert not world.store.claim_path(job_id, 2).exists()
    starting.callback(None)
    assert fired(scanning) == [job_id] and [r[0] for r in world.resumed] == ["b"]
    assert world.on_disk(job_id)["owner"] == OWNERS["b"]


def _owner_and_other(tmp_path: Path) -> tuple[World, JobTable, JobTable, str, Any, defer.Deferred[Any]]:
    """A world (no grace) with tables "a" and "b", a job started by "a", its Job and work Deferred."""
    world = World(tmp_path, grace=0)
    owner, other = world.table("a"), world.table("b")
    job_id = start_job(world, owner)
    job = owner.jobs[job_id]
    assert job.deferred is not None
    return world, owner, other, job_id, job, job.deferred


def test_an_owner_that_lost_its_job_to_a_takeover_stops_writing_its_record(tmp_path: Path) -> None:
    """An owner judged gone while it still ran (its broker connection lost, not its process): once another
    table took the job over, its writes leave the new owner's record as it is, it forgets the job (status
    and lookup answer that record), and its work is cancelled (the new owner runs every part not finished
    at its takeover), its end not written."""
    world, owner, other, job_id, job, work = _owner_and_other(tmp_path)
    world.alive.discard("a")
    assert fired(other.scan()) == [job_id]
    world.alive.add("a")  # it ran all along
    taken = world.on_disk(job_id)
    owner.partial(job_id, "p2", {"state": "downloaded"})  # its next write: refused
    assert world.on_disk(job_id) == taken
    assert job_id not in owner.jobs and not work.called
    world.clock.advance(0)  # (cancelled on the next turn: the finding may come inside the work's callbacks)
    assert work.called and job.error is not None and job.error.startswith("CancelledError")  # its end: not written
    assert world.on_disk(job_id) == taken
    answer = fired(owner.lookup(job_id))
    assert answer["from_record"] is True and answer["owner"] == OWNERS["b"] and answer["state"] == "PARTIAL"
    assert owner.superseded(job_id) and not other.superseded(job_id)  # (its work keeps what it did)
    world.work["b"].callback({"p2": {"state": "cached"}, "p3": {"state": "cached"}})
    record = world.on_disk(job_id)
    assert record["state"] == "FINISHED" and record["owner"] == OWNERS["b"]
    assert record["results"]["p2"] == {"state": "cached"}


def test_a_write_after_a_claim_is_carried_over_and_the_next_one_refused(tmp_path: Path) -> None:
    """The old owner's write that lands after a claim but before the taker read the record is written
    (nothing on disk says taken over yet) and so is resumed from; once the taker's record is there, the
    old owner's next write is refused."""
    world = World(tmp_path, grace=0)
    owner, other = world.table("a"), world.table("b")
    job_id = start_job(world, owner)
    world.alive.discard("a")
    fired(world.store.claim(job_id, 1, OWNERS["b"]))  # b claimed; its record is not written yet
    owner.partial(job_id, "p2", {"state": "downloaded"})
    assert world.on_disk(job_id)["owner"] == OWNERS["a"] and "p2" in world.on_disk(job_id)["results"]
    fired(world.store.unclaim(job_id, 1))  # (b backs out of this try; its scan claims afresh)
    assert fired(other.scan()) == [job_id] and world.resumed == [("b", job_id, ["p1", "p2"])]
    owner.partial(job_id, "p3", {"state": "downloaded"})
    assert world.on_disk(job_id)["owner"] == OWNERS["b"] and "p3" not in world.on_disk(job_id)["results"]
    assert job_id not in owner.jobs


def test_a_malformed_takeovers_list_on_disk_does_not_stop_the_owners_writes(tmp_path: Path) -> None:
    """A record whose ``takeovers`` is not a list (a hand edit, another tool) is no takeover: written over."""
    world = World(tmp_path)
    owner = world.table("a")
    job_id = start_job(world, owner)
    record = world.on_disk(job_id)
    record["takeovers"] = 7
    world.store.path(job_id).write_text(json.dumps(record))
    owner.partial(job_id, "p2", {"state": "cached"})
    assert world.on_disk(job_id)["results"]["p2"] == {"state": "cached"} and job_id in owner.jobs


def test_a_superseded_job_is_remembered_for_the_retention(tmp_path: Path) -> None:
    """``superseded(job)`` answers True from the moment a write found the takeover, for ``retention`` seconds."""
    world = World(tmp_path, grace=0)
    owner, other = world.table("a"), world.table("b")
    job_id = start_job(world, owner)
    world.alive.discard("a")
    fired(other.scan())
    assert not owner.superseded(job_id)  # not known until its next write
    owner.partial(job_id, "p2", {"state": "downloaded"})
    assert owner.superseded(job_id)
    world.clock.advance(owner.retention + 1)
    owner.expire()
    assert not owner.superseded(job_id)


def test_taken_over_reads_the_record_itself(tmp_path: Path) -> None:
    """``taken_over(job)`` does not wait for a write to find the takeover: it reads the record (the Deploy
    service asks it before switching a deployment back), and from then on the job is superseded here."""
    world = World(tmp_path, grace=0)
    owner, other = world.table("a"), world.table("b")
    job_id = start_job(world, owner)
    assert fired(defer.ensureDeferred(owner.taken_over(job_id))) is False and job_id in owner.jobs
    world.alive.discard("a")
    fired(other.scan())
    assert not owner.superseded(job_id)
    assert fired(defer.ensureDeferred(owner.taken_over(job_id))) is True
    assert owner.superseded(job_id) and job_id not in owner.jobs
    assert fired(defer.ensureDeferred(other.taken_over(job_id))) is False  # the new owner's own job
    assert fired(defer.ensureDeferred(owner.taken_over("no such job"))) is False


def test_an_owner_finds_its_job_taken_over_in_its_own_scan(tmp_path: Path) -> None:
    """The owner need not write to find out: its scan reads the record, sees the takeover, forgets the job
    and cancels its work; a job of its own that nobody took over is left running."""
    world, owner, other, job_id, job, work = _owner_and_other(tmp_path)
    assert fired(owner.scan()) == [] and job_id in owner.jobs and not work.called  # its own, not taken over
    world.alive.discard("a")
    taken_by_b = fired(other.scan())
    world.alive.add("a")
    assert taken_by_b == [job_id] and not owner.superseded(job_id)
    assert fired(owner.scan()) == []  # not taken over (b runs it): found superseded
    assert owner.superseded(job_id) and job_id not in owner.jobs
    world.clock.advance(0)
    assert work.called and job.error is not None and job.error.startswith("CancelledError")
    assert world.on_disk(job_id)["owner"] == OWNERS["b"]


def test_an_owner_finds_the_takeover_even_once_the_new_owner_has_ended_the_job(tmp_path: Path) -> None:
    """The owner frozen until the new owner has finished the job: the record is no longer among the
    running ones, and the owner's scan still reads it (its own runs' records are read on their own)."""
    world = World(tmp_path, grace=0)
    owner, other = world.table("a"), world.table("b")
    job_id = start_job(world, owner)
    world.alive.discard("a")
    assert fired(other.scan()) == [job_id]
    world.work["b"].callback({"p2": {"state": "downloaded"}, "p3": {"state": "downloaded"}})
    assert world.on_disk(job_id)["state"] == "FINISHED"
    world.alive.add("a")
    fired(owner.scan())
    assert owner.superseded(job_id) and job_id not in owner.jobs


def test_a_run_superseded_here_does_not_make_a_later_run_of_the_job_here_superseded(tmp_path: Path) -> None:
    """a runs the job, b takes it over, b dies and a takes it over again: a's first run is superseded
    (it keeps what it did), its second is not (it switches back on failure and publishes progress)."""
    world = World(tmp_path, grace=0)
    a, b = world.table("a"), world.table("b")
    job_id = start_job(world, a)
    world.alive.discard("a")
    assert fired(b.scan()) == [job_id]
    world.alive.add("a")
    fired(a.scan())
    assert a.superseded(job_id, 0) and a.superseded(job_id)
    world.alive.discard("b")
    assert fired(a.scan()) == [job_id] and len(a.jobs[job_id].takeovers) == 2
    assert a.superseded(job_id, 0) and not a.superseded(job_id, 2)
    assert fired(defer.ensureDeferred(a.taken_over(job_id, 0))) is True  # (the first run: keep)
    assert fired(defer.ensureDeferred(a.taken_over(job_id, 2))) is False  # (this run: its own)
    assert fired(defer.ensureDeferred(a.taken_over(job_id))) is False
