"""All or nothing (issue #17 §2): a name is never missing, and a failed deployment leaves the previous generation.

Real folders, real ``renameat2`` exchanges, real threads and a real SIGKILL: the
fallback without exchange is forced by making :meth:`SafeDir.exchange` answer
False (what it answers on a filesystem without ``RENAME_EXCHANGE``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from ion.core.exceptions import ReceivedApplicationError
from ion.core.safefs import SafeDir
from ion.core.threads import SynchronousPool
from ion.services.deploy.core import ROLLED_BACK, Deployer
from ion.services.deploy.place import (
    MANIFEST_DIR,
    PlacementError,
    commit,
    is_reserved,
    manifest_path,
    place,
    placed_already,
    undo,
)
from ion.services.deploy.spec import load_deployment, parse_deployment
from tests.services.deploy.scenario_support import item, write_deployment

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(params=["exchange", "symlink switch"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test twice: with the filesystem's exchange, and with the fallback (no exchange)."""
    if request.param == "symlink switch":
        monkeypatch.setattr(SafeDir, "exchange", lambda self, a, b, *, into=None: False)
    return str(request.param)


def make_entry(base: Path, version: str, files: dict[str, str]) -> Path:
    entry = base / "cache" / version
    for rel, text in files.items():
        (entry / rel).parent.mkdir(parents=True, exist_ok=True)
        (entry / rel).write_text(text)
    return entry


def put(entry: Path, dest: Path, names: list[str], *, link: bool = False, version: str = "1.0",
        pending: bool = False, name: str = "tool") -> Any:
    return place(entry, names, dest, link=link, platform="linux", name=name, version=version,
                 entry_stamp=f"stamp-{version}", pending=pending)


def snapshot(dest: Path) -> dict[str, str]:
    """Every file below ``dest`` (through the links it holds) with its content, and the links to folders
    outside it as ``-> target``; the placer's own hidden names (and the lock files) left out."""
    out: dict[str, str] = {}
    for top, dirs, files in os.walk(dest, followlinks=True):
        for f in files:
            path = Path(top) / f
            out[str(path.relative_to(dest))] = path.read_text()
        for d in dirs:
            path = Path(top) / d
            if path.is_symlink() and not os.readlink(path).startswith("."):
                out[str(path.relative_to(dest))] = "-> " + os.readlink(path)
    return {k: v for k, v in out.items()
            if not any(is_reserved(part) and part != MANIFEST_DIR for part in Path(k).parts)
            and Path(k).name not in (".lock", ".pending")}


def visible(dest: Path) -> list[str]:
    """The names a user sees at ``dest`` (the placer's own hidden names left out)."""
    return sorted(n for n in os.listdir(dest) if not is_reserved(n) and n != MANIFEST_DIR)


def leftovers(dest: Path) -> list[str]:
    """The placer's temporary names at ``dest`` (a versioned folder a link names is no leftover)."""
    current = {os.readlink(dest / n) for n in visible(dest) if (dest / n).is_symlink()}
    return sorted(n for n in os.listdir(dest) if is_reserved(n) and n != MANIFEST_DIR and n not in current)


V1 = {"tool/README": "tool 1\n", "tool/bin/tool": "one", "notes.txt": "notes 1\n", "old-only": "gone in 2"}
V2 = {"tool/README": "tool 2\n", "tool/bin/tool": "two", "notes.txt": "notes 2\n", "tool/share/new": "new"}


# -- placement, two-phase ----------------------------------------------------------------------------------
@pytest.mark.parametrize("link", [False, True])
def test_undo_restores_the_previous_generation_files_and_manifest(tmp_path: Path, mode: str, link: bool) -> None:
    """A pending switch undone leaves the destination as the previous placement left it, to the byte;
    committed, it holds the new version and none of the old one's set-aside names."""
    v1, v2 = make_entry(tmp_path, "1", V1), make_entry(tmp_path, "2", V2)
    dest = tmp_path / "out"
    put(v1, dest, ["tool", "notes.txt", "old-only"], link=link)
    before = snapshot(dest)
    manifest = manifest_path(dest, "linux", "tool").read_bytes()
    placed = put(v2, dest, ["tool", "notes.txt"], link=link, version="2.0", pending=True)
    assert placed.switch is not None and placed.removed == ["old-only"]
    assert (dest / "tool/README").read_text() == "tool 2\n" and not (dest / "old-only").exists()
    undo(placed.switch)
    assert snapshot(dest) == before
    assert manifest_path(dest, "linux", "tool").read_bytes() == manifest
    assert leftovers(dest) == []
    again = put(v2, dest, ["tool", "notes.txt"], link=link, version="2.0", pending=True)
    assert commit(again.switch) == []
    assert (dest / "tool/README").read_text() == "tool 2\n" and (dest / "tool/share/new").exists()
    assert visible(dest) == ["notes.txt", "tool"] and leftovers(dest) == []
    assert json.loads(manifest_path(dest, "linux", "tool").read_text())["version"] == "2.0"


def test_undo_of_a_first_placement_removes_it_and_its_manifest(tmp_path: Path, mode: str) -> None:
    v1 = make_entry(tmp_path, "1", V1)
    dest = tmp_path / "out"
    placed = put(v1, dest, ["tool", "notes.txt"], pending=True)
    undo(placed.switch)
    assert visible(dest) == [] and leftovers(dest) == []
    assert not manifest_path(dest, "linux", "tool").exists()


def test_a_copied_folder_is_exchanged_in_place(tmp_path: Path) -> None:
    """With the exchange, a copied folder replaces a folder in place (no link); the old one waits aside."""
    v1, v2 = make_entry(tmp_path, "1", V1), make_entry(tmp_path, "2", V2)
    dest = tmp_path / "out"
    put(v1, dest, ["tool"])
    placed = put(v2, dest, ["tool"], version="2.0", pending=True)
    assert not (dest / "tool").is_symlink() and (dest / "tool/README").read_text() == "tool 2\n"
    waiting = [n for n in os.listdir(dest) if n.startswith(".tool.ion-old-")]
    assert len(waiting) == 1 and (dest / waiting[0] / "README").read_text() == "tool 1\n"
    commit(placed.switch)
    assert leftovers(dest) == []


def test_without_exchange_a_copied_folder_becomes_a_link_to_its_version(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback: the name turns into a symlink to ``.<name>.ion-ver-*`` beside it, switched by one
    rename from then on; a placement finding it so is in place already, and old versions go."""
    monkeypatch.setattr(SafeDir, "exchange", lambda self, a, b, *, into=None: False)
    v1, v2 = make_entry(tmp_path, "1", V1), make_entry(tmp_path, "2", V2)
    dest = tmp_path / "out"
    put(v1, dest, ["tool"])
    assert not (dest / "tool").is_symlink()  # first placement: nothing to switch from
    put(v2, dest, ["tool"], version="2.0")
    target = os.readlink(dest / "tool")
    assert target.startswith(".tool.ion-ver-") and (dest / "tool/README").read_text() == "tool 2\n"
    assert placed_already(v2, ["tool"], dest, link=False, platform="linux", name="tool", version="2.0",
                          entry_stamp="stamp-2.0") is not None
    assert put(v2, dest, ["tool"], version="2.0").already
    put(v1, dest, ["tool"], version="1.0")
    assert os.readlink(dest / "tool") != target and (dest / "tool/README").read_text() == "tool 1\n"
    assert leftovers(dest) == [] and len([n for n in os.listdir(dest) if ".ion-ver-" in n]) == 1


def test_a_failing_name_switches_back_the_item_own_names(tmp_path: Path, mode: str) -> None:
    """Two-phase, a name that cannot be placed (missing from the entry) puts back the names of the item
    already switched, and the manifest: the item is whole in its previous version."""
    v1, v2 = make_entry(tmp_path, "1", V1), make_entry(tmp_path, "2", V2)
    dest = tmp_path / "out"
    put(v1, dest, ["tool", "notes.txt"])
    before = snapshot(dest)
    with pytest.raises(PlacementError, match="missing"):
        put(v2, dest, ["notes.txt", "tool", "missing"], version="2.0", pending=True)
    assert snapshot(dest) == before and leftovers(dest) == []


def test_a_live_switch_keeps_its_previous_version_from_the_leftover_sweep(tmp_path: Path, mode: str) -> None:
    """Another placement of the item sweeps what dead placers left, but not the previous version a
    pending switch keeps (it holds ``.pending``): that switch can still be undone."""
    v1, v2 = make_entry(tmp_path, "1", V1), make_entry(tmp_path, "2", V2)
    dest = tmp_path / "out"
    put(v1, dest, ["tool"])
    placed = put(v2, dest, ["tool"], version="2.0", pending=True)
    kept = leftovers(dest)
    assert kept
    (dest / ".tool.ion-new-deadbeef").mkdir()  # a killed placer's copy: removable any time
    # Another deployment of the same version places it again (a pending switch is not in place yet).
    assert not put(v2, dest, ["tool"], version="2.0").already
    assert leftovers(dest) == kept
    with pytest.raises(PlacementError, match="changed since"):
        undo(placed.switch)  # what the other deployment placed stays
    assert (dest / "tool/README").read_text() == "tool 2\n"
    put(v1, dest, ["tool"])  # no switch pending now: the next placement sweeps the rest
    assert (dest / "tool/README").read_text() == "tool 1\n" and leftovers(dest) == []


def test_a_pending_placement_is_not_in_place_for_another_deployment(tmp_path: Path, mode: str) -> None:
    """A switch waiting for its commit or undo is not "already deployed" for another deployment of the
    same version: that one places it again, so the first one's undo cannot take away what the other
    reported in place (and recorded as a generation); once committed, it is in place for everyone."""
    v1, v2 = make_entry(tmp_path, "1", V1), make_entry(tmp_path, "2", V2)
    dest = tmp_path / "out"
    how = {"link": False, "platform": "linux", "name": "tool", "version": "2.0", "entry_stamp": "stamp-2.0"}
    put(v1, dest, ["tool", "notes.txt"])
    first = put(v2, dest, ["tool", "notes.txt"], version="2.0", pending=True)
    assert placed_already(v2, ["tool", "notes.txt"], dest, **how) is None
    second = put(v2, dest, ["tool", "notes.txt"], version="2.0")
    assert not second.already
    with pytest.raises(PlacementError, match="changed since"):
        undo(first.switch)
    assert (dest / "tool/README").read_text() == "tool 2\n" and (dest / "notes.txt").read_text() == "notes 2\n"
    assert placed_already(v2, ["tool", "notes.txt"], dest, **how) is not None
    # Committed: in place for the next deployment, and its manifest says so.
    third = put(v1, dest, ["tool", "notes.txt"], pending=True)
    assert placed_already(v1, ["tool", "notes.txt"], dest, **dict(how, version="1.0", entry_stamp="stamp-1.0")) \
        is None
    commit(third.switch)
    assert placed_already(v1, ["tool", "notes.txt"], dest, **dict(how, version="1.0", entry_stamp="stamp-1.0")) \
        is not None
    assert put(v1, dest, ["tool", "notes.txt"]).already
    assert "pending" not in json.loads(manifest_path(dest, "linux", "tool").read_text())


def test_an_undo_stopped_half_way_leaves_the_item_to_be_placed_again(tmp_path: Path, mode: str) -> None:
    """An undo that switched some names back and then met one changed since (not switched back) leaves
    the item part old, part new: its manifest must not let the next deployment of the new version take
    it for in place (every name is placed again)."""
    v1, v2 = make_entry(tmp_path, "1", V1), make_entry(tmp_path, "2", V2)
    dest = tmp_path / "out"
    put(v1, dest, ["tool", "notes.txt"])
    placed = put(v2, dest, ["tool", "notes.txt"], version="2.0", pending=True)
    # Someone replaces tool meanwhile (by hand); notes.txt, switched last, is switched back first.
    os.rename(dest / "tool", tmp_path / "aside")
    (dest / "tool").mkdir()
    (dest / "tool/README").write_text("by hand\n")
    with pytest.raises(PlacementError, match="changed since"):
        undo(placed.switch)
    assert (dest / "notes.txt").read_text() == "notes 1\n"
    again = put(v2, dest, ["tool", "notes.txt"], version="2.0")
    assert not again.already
    assert (dest / "notes.txt").read_text() == "notes 2\n" and (dest / "tool/README").read_text() == "tool 2\n"


def test_a_sigkilled_placer_s_set_aside_version_is_removed_by_the_next(tmp_path: Path, mode: str) -> None:
    """A deployer killed (SIGKILL) between its switch and its commit leaves the item whole in its new
    version and the old one at ``.<name>.ion-old-*`` (or a versioned folder); its shared lock died with
    it, so the next placement of the item removes them."""
    v1, v2 = make_entry(tmp_path, "1", V1), make_entry(tmp_path, "2", V2)
    dest = tmp_path / "out"
    put(v1, dest, ["tool"])
    put(v1, dest, ["tool"], version="1.1")  # (without exchange: the name is a link to a version folder now)
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ion.core.safefs import SafeDir\n"
        "from ion.services.deploy.place import place\n"
        "if sys.argv[3] == 'symlink switch':\n"
        "    SafeDir.exchange = lambda self, a, b, *, into=None: False\n"
        "p = place(Path(sys.argv[1]), ['tool'], Path(sys.argv[2]), link=False, platform='linux', name='tool',\n"
        "          version='2.0', entry_stamp='stamp-2.0', pending=True)\n"
        "print('switched', flush=True)\n"
        "time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", script, str(v2), str(dest), mode], stdout=subprocess.PIPE,
                             env=env, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "switched\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (dest / "tool/README").read_text() == "tool 2\n"
    assert leftovers(dest) != []  # the previous version, set aside
    assert put(v2, dest, ["tool"], version="2.0").already
    assert leftovers(dest) == []


# -- the deployer: all or nothing ------------------------------------------------------------------------
class Repo:
    """Fetches by writing a cache entry per version (``tool`` folder, ``notes.txt``); can fail or hold items."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fail: set[str] = set()
        self.held: dict[str, defer.Deferred[None]] = {}

    def fetch(self, item: Any, progress: Any) -> defer.Deferred[dict[str, Any]]:
        gate = self.held.get(item.name) or defer.succeed(None)

        def done(_: object) -> dict[str, Any]:
            if item.name in self.fail:
                raise RuntimeError(f"no {item.label} in the repository")
            entry = self.root / item.name / item.version
            (entry / "tool").mkdir(parents=True, exist_ok=True)
            (entry / "tool" / "README").write_text(f"{item.name} {item.version}\n")
            (entry / "notes.txt").write_text(f"notes of {item.name} {item.version}\n")
            return {"state": "downloaded", "path": str(entry), "names": ["tool", "notes.txt"],
                    "stamp": item.version}

        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        gate.addBoth(lambda _: d.callback(None))
        return d.addCallback(done)


def deployment(tmp_path: Path, version: str, **per_item: Any) -> Any:
    """Four items, two copied into nested destinations and two linked, all at ``version``."""
    items = [{"name": n, "version": per_item.get(n, version), "platform": "linux",
              "destination": str(tmp_path / "dest" / d), "link": link}
             for n, d, link in (("a", "one", False), ("b", "two", True), ("c", "one/c", False), ("d", "four", True))]
    return parse_deployment([{"url": "file:repo", "items": items}], source="d.json", base_dir=tmp_path,
                            cwd=tmp_path, environ={})


def deploy(deployer: Deployer, dep: Any, **kwargs: Any) -> list[Any]:
    out: list[Any] = []
    deployer.deploy(dep, **kwargs).addBoth(out.append)
    assert out and not isinstance(out[0], Exception), out
    return list(out[0])


def test_a_failing_item_in_the_middle_leaves_the_previous_generation_whole(tmp_path: Path, mode: str) -> None:
    """Generation 1 deployed; generation 2 with its second item failing: every item it switched is switched
    back (``rolled back``), and each destination holds generation 1, files and manifests, to the byte."""
    repo = Repo(tmp_path / "cache")
    deployer = Deployer(repo.fetch, SynchronousPool())
    assert all(r.ok for r in deploy(deployer, deployment(tmp_path, "1.0")))
    before = snapshot(tmp_path / "dest")
    repo.fail.add("b")
    results = deploy(deployer, deployment(tmp_path, "2.0"))
    assert [r.state for r in results] == [ROLLED_BACK, "failed", ROLLED_BACK, ROLLED_BACK]
    assert all("linux/b/2.0" in (r.reason or "") for r in results if r.state == ROLLED_BACK)
    # a was switched in, then back; c and d, placed after b failed, were never switched in.
    assert (results[0].reason or "").startswith("switched back")
    assert all((r.reason or "").startswith("not switched in") for r in results[2:])
    assert snapshot(tmp_path / "dest") == before
    for d in ("one", "two", "one/c", "four"):
        assert leftovers(tmp_path / "dest" / d) == []
    # Items in place already are what they are, failure or not.
    same = deploy(deployer, deployment(tmp_path, "1.0", b="2.0"))
    assert [(r.state, r.already) for r in same] == [("downloaded", True), ("failed", False),
                                                    ("downloaded", True), ("downloaded", True)]
    assert snapshot(tmp_path / "dest") == before


def test_a_failing_placement_rolls_back_the_others_and_partial_keeps_them(tmp_path: Path, mode: str) -> None:
    """An item whose placement fails (its names are there but no manifest claims them: foreign) switches
    the others back; with ``partial`` they stay in their new version, as before all or nothing."""
    repo = Repo(tmp_path / "cache")
    deployer = Deployer(repo.fetch, SynchronousPool())
    deploy(deployer, deployment(tmp_path, "1.0"))
    (tmp_path / "dest/one/.ion-deploy/linux.a.json").unlink()
    before = snapshot(tmp_path / "dest")
    results = deploy(deployer, deployment(tmp_path, "2.0"))
    assert [r.state for r in results] == ["failed", ROLLED_BACK, ROLLED_BACK, ROLLED_BACK]
    assert "exists and was not placed" in (results[0].reason or "")
    assert snapshot(tmp_path / "dest") == before
    kept = deploy(deployer, deployment(tmp_path, "2.0"), partial=True)
    assert [r.state for r in kept] == ["failed", "downloaded", "downloaded", "downloaded"]
    assert (tmp_path / "dest/one/tool/README").read_text() == "a 1.0\n"
    assert (tmp_path / "dest/one/c/notes.txt").read_text() == "notes of c 2.0\n"
    assert leftovers(tmp_path / "dest/one/c") == []


def test_a_cancelled_deployment_switches_back_what_it_placed(tmp_path: Path, mode: str) -> None:
    """Cancelled while one item's fetch is held: the items already switched go back, the held one is
    ``cancelled``; on_result hears the new state of each item switched back."""
    repo = Repo(tmp_path / "cache")
    deployer = Deployer(repo.fetch, SynchronousPool())
    deploy(deployer, deployment(tmp_path, "1.0"))
    before = snapshot(tmp_path / "dest")
    repo.held["c"] = defer.Deferred()
    heard: list[tuple[str, str]] = []
    d = deployer.deploy(deployment(tmp_path, "2.0"), on_result=lambda r: heard.append((r.item.name, r.state)))
    assert (tmp_path / "dest/one/tool/README").read_text() == "a 2.0\n"  # switched, waiting for the others
    d.cancel()
    out: list[Any] = []
    d.addBoth(out.append)
    assert [r.state for r in out[0]] == [ROLLED_BACK, ROLLED_BACK, "cancelled", ROLLED_BACK]
    assert snapshot(tmp_path / "dest") == before
    assert ("a", "downloaded") in heard and ("a", ROLLED_BACK) in heard


def test_keep_commits_what_a_deployment_switched_in_whatever_else_happened(tmp_path: Path, mode: str) -> None:
    """``keep()`` True (its job was taken over by another instance, which counts the items finished here as
    done): a cancel or a failure does not switch back what was switched in, it is committed; ``keep()``
    False, or failing, is all or nothing as ever."""
    repo = Repo(tmp_path / "cache")
    deployer = Deployer(repo.fetch, SynchronousPool())
    deploy(deployer, deployment(tmp_path, "1.0"))
    repo.held["c"] = defer.Deferred()
    asked: list[bool] = []

    async def keep() -> bool:
        asked.append(True)
        return True

    d = deployer.deploy(deployment(tmp_path, "2.0"), keep=keep)
    assert asked == []  # asked only at the end
    d.cancel()
    out: list[Any] = []
    d.addBoth(out.append)
    assert [r.state for r in out[0]] == ["downloaded", "downloaded", "cancelled", "downloaded"] and asked == [True]
    assert (tmp_path / "dest/one/tool/README").read_text() == "a 2.0\n"
    assert (tmp_path / "dest/four/notes.txt").read_text() == "notes of d 2.0\n"
    assert (tmp_path / "dest/one/c/notes.txt").read_text() == "notes of c 1.0\n"  # never placed here
    for d_ in ("one", "two", "one/c", "four"):
        assert leftovers(tmp_path / "dest" / d_) == []
    del repo.held["c"]
    assert all(r.already for r in deploy(deployer, deployment(tmp_path, "2.0", c="1.0")))  # committed: in place
    repo.fail.add("b")
    before = snapshot(tmp_path / "dest")

    async def no() -> bool:
        return False

    async def cannot_say() -> bool:
        raise OSError("the job records are unreadable")

    for answer in (no, cannot_say):
        results = deploy(deployer, deployment(tmp_path, "3.0"), keep=answer)
        assert [r.state for r in results] == [ROLLED_BACK, "failed", ROLLED_BACK, ROLLED_BACK]
        assert snapshot(tmp_path / "dest") == before


def test_every_item_in_place_commits_and_leaves_nothing_aside(tmp_path: Path, mode: str) -> None:
    repo = Repo(tmp_path / "cache")
    deployer = Deployer(repo.fetch, SynchronousPool())
    deploy(deployer, deployment(tmp_path, "1.0"))
    results = deploy(deployer, deployment(tmp_path, "2.0"))
    assert [r.state for r in results] == ["downloaded"] * 4
    assert (tmp_path / "dest/one/tool/README").read_text() == "a 2.0\n"
    for d in ("one", "two", "one/c", "four"):
        assert leftovers(tmp_path / "dest" / d) == []


# -- a reader never sees a name missing ---------------------------------------------------------------
@pytest.mark.parametrize("link", [False, True])
def test_a_reader_listing_the_destination_never_sees_a_name_missing(tmp_path: Path, mode: str,
                                                                    link: bool) -> None:
    """A thread lists the destination in a tight loop while deployments switch it between two
    versions again and again (committed, or switched back after a failing item): ``tool`` and
    ``notes.txt`` are there at every listing. (Without exchange the first switch of a real folder
    turns it into a link, with the two renames of old: the reader starts after that one.)"""
    repo = Repo(tmp_path / "cache")
    deployer = Deployer(repo.fetch, SynchronousPool())

    def dep(version: str, fail: bool = False) -> Any:
        repo.fail.clear()
        if fail:
            repo.fail.add("b")
        items = [{"name": "a", "version": version, "platform": "linux", "destination": str(tmp_path / "dest"),
                  "link": link}, {"name": "b", "version": version, "platform": "linux",
                                  "destination": str(tmp_path / "other"), "link": link}]
        return parse_deployment([{"url": "file:repo", "items": items}], source="d.json", base_dir=tmp_path,
                                cwd=tmp_path, environ={})

    deploy(deployer, dep("1.0"))
    deploy(deployer, dep("2.0"))  # (the fallback's one conversion of a real folder to a link)
    dest = tmp_path / "dest"
    stop = tmp_path / "stop-reading"
    # Another process (its own interpreter: no lock shared with the deployer's thread) lists in a tight loop.
    reader = subprocess.Popen([sys.executable, "-c", READER, str(dest), str(stop)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "reading\n"
        for round_ in range(40):
            version = "1.0" if round_ % 2 else "2.0"
            results = deploy(deployer, dep(version, fail=round_ % 5 == 4))
            assert results[0].state in ("downloaded", ROLLED_BACK)
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    listings, missing = out.split("\n", 1)
    assert int(listings) > 1 and missing.strip() == ""
    assert leftovers(dest) == []


#: Lists argv[1] until argv[2] exists; says "reading" after its first listing, then how many it made and
#: every listing that lacked ``tool`` or ``notes.txt``.
READER = """
import os, sys
dest, stop = sys.argv[1], sys.argv[2]
count, missing = 0, []
while True:
    names = os.listdir(dest)
    count += 1
    if "tool" not in names or "notes.txt" not in names:
        missing.append(sorted(names))
    if count == 1:
        print("reading", flush=True)
    if os.path.exists(stop) and count > 1:
        break
print(count)
for names in missing[:20]:
    print(names)
"""


# -- through the Deploy service -------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_the_service_reads_partial_from_a_dict_request_and_refuses_a_non_boolean(
        deploy_system: Any, make_repo: Any, tmp_path: Path) -> None:
    """A plain-dict request's ``partial``: true keeps the items placed beside a failed one; anything but a
    boolean is a 400 naming it, and nothing runs."""
    url, _ = make_repo("file")
    dest = tmp_path / "dest"
    spec = load_deployment(write_deployment(tmp_path / "d.json", url, [
        item("zlib", "1.2", dest / "a"), item("zlib", "9.9", dest / "b")]))
    items = [dict(i.to_dict()) for i in spec.items]
    with pytest.raises(ReceivedApplicationError) as info:
        await deploy_system.rpc_send("deploy", {"source": "d.json", "items": items, "partial": "yes"})
    assert info.value.response_code == 400 and "partial must be true or false" in info.value.message
    assert not (dest / "a").exists()
    content, _ = await deploy_system.rpc_send("deploy", {"source": "d.json", "items": items, "partial": True})
    assert [r["state"] for r in content["items"]] == ["downloaded", "failed"]
    assert (dest / "a/zlib").is_symlink()
    content, _ = await deploy_system.rpc_send("deploy", {"source": "d.json", "items": items})
    assert [r["state"] for r in content["items"]] == ["cached", "failed"]  # in place already: nothing to undo
