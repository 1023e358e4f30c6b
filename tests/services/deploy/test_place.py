"""Placing a cached entry at its destination: links, copies, cleanup, and refusals."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ion.services.deploy.place import PlacementError, manifest_path, place


def make_entry(root: Path, version: str, files: dict[str, str]) -> Path:
    entry = root / "cache" / version
    for rel, text in files.items():
        path = entry / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (entry / ".entry").write_text("[entry]\n")
    return entry


def put(entry: Path, dest: Path, names: list[str], *, link: bool = True, version: str = "1.0",
        stamp: str = "t1", name: str = "zlib"):
    return place(entry, names, dest, link=link, platform="linux", name=name, version=version, entry_stamp=stamp)


def test_links_each_top_level_name(tmp_path):
    """link:true makes one symlink per top-level name into the cache entry, never .entry."""
    entry = make_entry(tmp_path, "1.0", {"lib/libz.so": "z", "include/zlib.h": "h"})
    dest = tmp_path / "out"
    result = put(entry, dest, ["include", "lib"])
    assert not result.already
    assert os.readlink(dest / "lib") == str(entry / "lib")
    assert (dest / "include" / "zlib.h").read_text() == "h"
    assert not (dest / ".entry").exists()
    assert manifest_path(dest, "linux", "zlib").exists()


def test_second_run_is_already_deployed(tmp_path):
    """Deploying the same entry again changes nothing and says already deployed."""
    entry = make_entry(tmp_path, "1.0", {"lib/a": "a"})
    dest = tmp_path / "out"
    put(entry, dest, ["lib"])
    assert put(entry, dest, ["lib"]).already


def test_copy_then_new_version_removes_stale_names(tmp_path):
    """A copy is a real tree; the next version's copy replaces it and names it lacks are removed."""
    v1 = make_entry(tmp_path, "1.0", {"lib/a": "a1", "old.txt": "o"})
    v2 = make_entry(tmp_path, "2.0", {"lib/a": "a2", "new.txt": "n"})
    dest = tmp_path / "out"
    (dest).mkdir()
    (dest / "mine.txt").write_text("user data")
    put(v1, dest, ["lib", "old.txt"], link=False)
    assert not (dest / "lib").is_symlink() and (dest / "lib" / "a").read_text() == "a1"
    result = put(v2, dest, ["lib", "new.txt"], link=False, version="2.0", stamp="t2")
    assert (dest / "lib" / "a").read_text() == "a2"
    assert result.removed == ["old.txt"] and not (dest / "old.txt").exists()
    assert (dest / "mine.txt").read_text() == "user data"
    assert not [p for p in dest.iterdir() if ".ion-" in p.name and p.name != ".ion-deploy"]


def test_refetched_entry_is_copied_again(tmp_path):
    """A copy is redone when the cache entry's stamp changed (refetched), even at one version."""
    entry = make_entry(tmp_path, "1.0", {"f": "one"})
    dest = tmp_path / "out"
    put(entry, dest, ["f"], link=False, stamp="t1")
    (entry / "f").write_text("two")
    assert not put(entry, dest, ["f"], link=False, stamp="t2").already
    assert (dest / "f").read_text() == "two"


def test_foreign_file_is_refused_not_overwritten(tmp_path):
    """A name at the destination that no deployment placed is refused and left alone."""
    entry = make_entry(tmp_path, "1.0", {"lib/a": "a"})
    dest = tmp_path / "out"
    (dest / "lib").mkdir(parents=True)
    (dest / "lib" / "precious").write_text("keep")
    with pytest.raises(PlacementError, match="was not placed by a deployment"):
        put(entry, dest, ["lib"])
    assert (dest / "lib" / "precious").read_text() == "keep"


def test_dangling_symlink_is_replaced(tmp_path):
    """A dangling link (cache deleted under it) is repaired, not a crash."""
    entry = make_entry(tmp_path, "1.0", {"lib/a": "a"})
    dest = tmp_path / "out"
    dest.mkdir()
    os.symlink(tmp_path / "gone" / "lib", dest / "lib")
    put(entry, dest, ["lib"])
    assert (dest / "lib" / "a").read_text() == "a"


def test_read_only_copy_is_replaced(tmp_path):
    """A read-only file the previous copy put there is replaced by the next version."""
    v1 = make_entry(tmp_path, "1.0", {"tool": "v1"})
    v2 = make_entry(tmp_path, "2.0", {"tool": "v2"})
    dest = tmp_path / "out"
    put(v1, dest, ["tool"], link=False)
    os.chmod(dest / "tool", stat.S_IRUSR)
    put(v2, dest, ["tool"], link=False, version="2.0", stamp="t2")
    assert (dest / "tool").read_text() == "v2"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_destination_is_a_clear_error(tmp_path):
    """A destination folder that cannot be written gives an error naming it."""
    entry = make_entry(tmp_path, "1.0", {"f": "x"})
    dest = tmp_path / "ro"
    dest.mkdir()
    os.chmod(dest, stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(PlacementError, match="cannot write"):
            put(entry, dest, ["f"])
    finally:
        os.chmod(dest, stat.S_IRWXU)


def test_destination_under_a_file_is_a_clear_error(tmp_path):
    """A destination whose parent is a file (cannot be created) gives an error naming it."""
    entry = make_entry(tmp_path, "1.0", {"f": "x"})
    (tmp_path / "afile").write_text("")
    with pytest.raises(PlacementError, match="cannot create destination"):
        put(entry, tmp_path / "afile" / "out", ["f"])


def test_two_items_cannot_claim_one_name(tmp_path):
    """A name another item placed at the same destination is refused, naming that item."""
    a = make_entry(tmp_path, "a", {"lib/x": "a"})
    b = make_entry(tmp_path, "b", {"lib/y": "b"})
    dest = tmp_path / "out"
    put(a, dest, ["lib"], name="alpha")
    with pytest.raises(PlacementError, match="linux.alpha"):
        put(b, dest, ["lib"], name="beta")
    assert os.readlink(dest / "lib") == str(a / "lib")


def test_manifest_cannot_name_paths_outside(tmp_path):
    """A manifest naming '../victim' (written by anyone who can write the destination) never
    makes placement delete outside the destination."""
    import json

    victim = tmp_path / "victim"
    victim.write_text("keep")
    entry = make_entry(tmp_path, "1.0", {"f": "x"})
    dest = tmp_path / "out"
    put(entry, dest, ["f"])
    manifest = manifest_path(dest, "linux", "zlib")
    record = json.loads(manifest.read_text())
    record["names"] = ["f", "../victim", "/etc"]
    record["version"] = "0.9"
    manifest.write_text(json.dumps(record))
    result = put(entry, dest, ["f"], version="1.0")
    assert victim.read_text() == "keep"
    assert result.removed == []


def test_entry_names_must_be_top_level(tmp_path):
    """Names handed to placement are single components; '..' or a path is refused."""
    entry = make_entry(tmp_path, "1.0", {"f": "x"})
    for bad in ("..", "a/b", ""):
        with pytest.raises(PlacementError, match="not a top-level name"):
            put(entry, tmp_path / "out", [bad])


def test_partial_copy_failure_does_not_block_the_destination(tmp_path):
    """After a copy fails midway, the names it did place are still ours: the next run replaces them."""
    entry = make_entry(tmp_path, "1.0", {"a": "A"})
    dest = tmp_path / "out"
    with pytest.raises(PlacementError):
        put(entry, dest, ["a", "missing"], link=False)
    assert (dest / "a").read_text() == "A"
    result = put(entry, dest, ["a"], link=False, stamp="t2")
    assert (dest / "a").read_text() == "A" and not result.already


def test_what_a_killed_placement_left_is_removed_by_the_next(tmp_path):
    """A placer killed between its copy and its swap leaves ``.<name>.ion-new-*`` (or, mid-swap, the set-aside
    ``.<name>.ion-old-*``) in the destination; the next placement of that name, holding the destination's
    lock, removes them, whether it copies again or finds everything in place. Other names' are left alone."""
    entry = make_entry(tmp_path, "1.0", {"tool/README": "tool\n", "tool/bin/tool": "x"})
    dest = tmp_path / "out"
    put(entry, dest, ["tool"], link=False)
    for leftover in (".tool.ion-new-bcf5e5b4/README", ".tool.ion-old-0a1b2c3d/bin/tool", ".other.ion-new-1/x"):
        (dest / leftover).parent.mkdir(parents=True, exist_ok=True)
        (dest / leftover).write_text("half")
    assert put(entry, dest, ["tool"], link=False).already  # in place: only the leftovers go
    assert sorted(p.name for p in dest.iterdir()) == [".ion-deploy", ".other.ion-new-1", "tool"]
    (dest / ".tool.ion-new-ffff0000").mkdir()
    put(make_entry(tmp_path, "2.0", {"tool/README": "tool 2\n"}), dest, ["tool"], link=False, version="2.0",
        stamp="t2")
    assert sorted(p.name for p in dest.iterdir()) == [".ion-deploy", ".other.ion-new-1", "tool"]
    assert (dest / "tool" / "README").read_text() == "tool 2\n"


@pytest.mark.parametrize("pending", [True, False])
@pytest.mark.parametrize("before", [None, "0.9"])
def test_a_placer_killed_amid_its_switch_leaves_names_the_next_one_replaces(tmp_path, pending, before):
    """A placer SIGKILLed after it switched one name of two, before its record was final (no cleanup
    runs), into a new destination or over a previous version: the next placement takes every name for
    ours (recorded before the switch) and places the item whole, never refusing a name as foreign."""
    import ion.services.deploy.place as place_module

    entry = make_entry(tmp_path, "1.0", {"a/f": "A1", "b/f": "B1"})
    dest = tmp_path / "out"
    if before is not None:
        put(make_entry(tmp_path, before, {"a/f": "A0", "b/f": "B0", "c/f": "C0"}), dest, ["a", "b", "c"],
            link=False, version=before, stamp="t0")
    pid = os.fork()
    if pid == 0:  # the placer, killed (no cleanup at all) right after its first name is switched
        real = place_module._swap_in

        def swap_then_die(*args, **kwargs):
            real(*args, **kwargs)
            os._exit(9)

        place_module._swap_in = swap_then_die
        try:
            place(entry, ["a", "b"], dest, link=False, platform="linux", name="zlib", version="1.0",
                  entry_stamp="t1", pending=pending)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 9
    assert (dest / "a" / "f").read_text() == "A1"  # switched before the kill
    result = put(entry, dest, ["a", "b"], link=False, stamp="t1")
    assert not result.already
    assert (dest / "a" / "f").read_text() == "A1" and (dest / "b" / "f").read_text() == "B1"
    assert sorted(p.name for p in dest.iterdir()) == [".ion-deploy", "a", "b"]
    assert put(entry, dest, ["a", "b"], link=False, stamp="t1").already
