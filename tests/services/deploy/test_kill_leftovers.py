"""What an ``ion-deploy`` killed with SIGKILL leaves in the cache, and the rerun that must clear it (issue 12).

The kill moments are replayed exactly: the files a process killed there leaves
are written into a real cache (filled by a real ``ion-deploy`` run), naming a
real dead pid (a child that has exited) of the same host id, then ``ion-deploy``
runs again (a subprocess: ``task.react`` would stop the test's reactor) and must
succeed and leave no lock file, no temporary file of one and no staging folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from ion.services.cache.entry import ENTRY_FILE, LOCK_SUFFIX
from ion.services.cache.locks import debris_tag

from .scenario_support import files_named, ion_deploy_process

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE_REPO = ROOT / "examples" / "repo"
HOST = "host-kill-test"


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def ion_deploy(tmp_path: Path, deployment: Path) -> subprocess.CompletedProcess[str]:
    return ion_deploy_process(tmp_path, str(deployment), "--json", ION_HOST_ID=HOST)


def lock_litter(cache: Path) -> list[str]:
    """Lock files, their temporary and moved-aside files, anywhere in the cache."""
    return sorted(str(p.relative_to(cache)) for p in files_named(cache, f"*{LOCK_SUFFIX}*"))


def test_rerun_after_kills_at_each_moment_leaves_no_lock(tmp_path: Path) -> None:
    """Four entries, each left as a SIGKILL at one moment leaves it, by a dead pid of this host:

    - ``hello-tools``: killed between publish and the release: complete entry, whole lock file;
    - ``greetings``: killed between creating its lock file and writing it (a minute ago): complete
      entry (a prune or a keep_updated check was locking it), empty lock file;
    - ``motd 1.0``: lock_method link, killed before removing the content file: complete entry, the
      lock file and its hard-linked ``.tmp``, and a lock file it had renamed aside (``.stale``);
    - ``motd 1.1``: killed mid-fetch: incomplete entry (no ``.entry``), its lock file, its staging folder.

    The rerun serves the first three from the cache, fetches the fourth again, and leaves none of it.
    """
    shutil.copytree(EXAMPLE_REPO, tmp_path / "repo")
    shutil.copytree(tmp_path / "repo/noarch/motd/1.0", tmp_path / "repo/noarch/motd/1.1")
    items = [
        {"name": "hello-tools", "version": "1.0", "platform": "noarch", "destination": "deployed/tools"},
        {"name": "greetings", "version": "2.1", "platform": "noarch", "destination": "deployed/share", "link": False},
        {"name": "motd", "version": "1.0", "platform": "noarch", "destination": "deployed/etc"},
        {"name": "motd", "version": "1.1", "platform": "noarch", "destination": "deployed/etc-next"},
    ]
    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps([{"url": "file:repo", "items": items}]))
    first = ion_deploy(tmp_path, deployment)
    assert first.returncode == 0, first.stderr
    cache = tmp_path / "cache"
    assert lock_litter(cache) == []

    pid = dead_pid()
    tag = debris_tag(HOST, pid)
    holder = f"{HOST}::{pid}::{time.time() - 5:.6f}".encode()

    def folder(name: str, version: str) -> Path:
        (found,) = cache.glob(f"*/noarch/{name}/{version}")
        return found

    # Killed between publish and release.
    (folder("hello-tools", "1.0").with_name("1.0.lock")).write_bytes(holder)
    # Killed between creating the lock file and writing it, a minute ago.
    empty = folder("greetings", "2.1").with_name("2.1.lock")
    empty.write_bytes(b"")
    os.utime(empty, (time.time() - 60, time.time() - 60))
    # lock_method link, killed before removing its content file; and a lock it had renamed aside.
    motd = folder("motd", "1.0")
    tmp = motd.with_name(f".1.0.lock.{tag}.00112233aabb.tmp")
    tmp.write_bytes(holder)
    os.link(tmp, motd.with_name("1.0.lock"))
    motd.with_name(f".1.0.lock.{tag}.445566778899.stale").write_bytes(f"{HOST}::{os.getppid()}::1.0".encode())
    # Killed mid-fetch: no .entry, its lock, its staging folder.
    (folder("motd", "1.1") / ENTRY_FILE).unlink()
    folder("motd", "1.1").with_name("1.1.lock").write_bytes(holder)
    staging = cache / "staging" / f"{tag.split('-')[0]}-{pid}-{int(time.time() * 1000)}-aabbccddeeff"
    (staging / "part").mkdir(parents=True)
    (staging / "part" / "half.bin").write_bytes(b"x" * 1000)
    assert len(lock_litter(cache)) == 6

    rerun = ion_deploy(tmp_path, deployment)
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads(rerun.stdout)
    assert result["ok"], result
    states = {(r["name"], r["version"]): r["state"] for r in result["items"]}
    assert states == {("hello-tools", "1.0"): "cached", ("greetings", "2.1"): "cached",
                      ("motd", "1.0"): "cached", ("motd", "1.1"): "downloaded"}, states
    assert lock_litter(cache) == [], rerun.stderr
    assert not (cache / "staging").exists() or list((cache / "staging").iterdir()) == []
    assert (folder("motd", "1.1") / ENTRY_FILE).is_file()
    # Each lock of the dead pid was judged as such, and the empty one as its creator's death.
    assert rerun.stderr.count(f"pid {pid} is dead on this host") == 3, rerun.stderr
    assert "creator died before writing it" in rerun.stderr, rerun.stderr
