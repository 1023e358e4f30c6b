"""``ion-deploy`` (ion.services.deploy.cli): in-process checks of arguments and files, end-to-end runs.

``task.react`` stops the reactor, so runs that deploy go through a subprocess
(``python -m ion.services.deploy.cli``), each with its own cache folder and a
copy of ``examples/repo`` in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from ion.services.deploy.cli import parse_duration
from tests.services.deploy.scenario_support import ion_deploy_process, run_main

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE_REPO = ROOT / "examples" / "repo"
SAMPLE = [
    {"name": "hello-tools", "version": "1.0", "platform": "noarch", "destination": "deployed/tools"},
    {"name": "greetings", "version": "2.1", "platform": "noarch", "destination": "deployed/share", "link": False},
    {"name": "motd", "version": "1.0", "platform": "noarch", "destination": "deployed/etc"},
]


def write_deployment(tmp_path: Path, items: list[dict[str, Any]], name: str = "deployment.json") -> Path:
    """A deployment file in ``tmp_path`` naming the repository copy ``tmp_path/repo``."""
    if not (tmp_path / "repo").exists():
        shutil.copytree(EXAMPLE_REPO, tmp_path / "repo")
    path = tmp_path / name
    path.write_text(json.dumps([{"url": "file:repo", "items": items}], indent=1))
    return path


def entries(tmp_path: Path, name: str) -> list[str]:
    """Versions of ``name`` with a complete entry in the test cache."""
    return sorted(p.parent.name for p in (tmp_path / "cache").glob(f"*/noarch/{name}/*/.entry"))


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    return write_deployment(tmp_path, SAMPLE)


# -- in process: arguments and deployment files ----------------------------------------------------------
def test_durations() -> None:
    """--older-than takes seconds or unit durations, and refuses anything else."""
    assert parse_duration("90") == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("1h30m") == 5400
    assert parse_duration("7d") == 7 * 86400
    for bad in ("soon", "5x", "-3", "1h tomorrow", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_bad_arguments_exit_2_with_every_problem() -> None:
    """Unusable arguments: exit 2, one 'Error:' line per problem, no traceback."""
    code, out, err = run_main("--jobs", "0", "--keep", "x")
    assert code == 2 and out == ""
    assert "Error: --jobs must be at least 1, not 0" in err
    assert "Error: --keep takes a whole number, not 'x'" in err
    assert "Error: give a DEPLOYMENT.json file" in err
    assert "Traceback" not in err


def test_keep_without_prune_is_refused() -> None:
    """--keep and --older-than only go with --prune."""
    code, _out, err = run_main("--verify", "--keep", "1")
    assert code == 2 and "--keep and --older-than go with --prune" in err


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    """Invalid JSON: exit 2 naming the file, line and column; --json still prints a JSON result."""
    path = tmp_path / "broken.json"
    path.write_text('[{"url": "file:repo",\n "items": [}]')
    code, out, err = run_main(str(path), "--json")
    assert code == 2
    assert f"Error: {path}: invalid JSON at line 2" in err
    result = json.loads(out)
    assert result["ok"] is False and "invalid JSON" in result["errors"][0]


# -- end to end ------------------------------------------------------------------------------------------
def test_cold_then_warm_deploy(tmp_path: Path, sample: Path) -> None:
    """A cold run downloads and places everything; a warm one reports every item already deployed."""
    cold = ion_deploy_process(tmp_path, str(sample))
    assert cold.returncode == 0, cold.stderr
    assert (tmp_path / "deployed/tools").is_dir()
    motd = tmp_path / "deployed/etc/motd.txt"
    assert motd.is_symlink() and motd.read_text()
    share = list((tmp_path / "deployed/share").iterdir())
    assert share and not any(p.is_symlink() for p in share if p.name != ".ion-deploy")
    assert cold.stdout.count("downloaded") >= 3 and "All 3 items deployed" in cold.stdout
    assert "Traceback" not in cold.stderr

    warm = ion_deploy_process(tmp_path, str(sample))
    assert warm.returncode == 0, warm.stderr
    rows = [line for line in warm.stdout.splitlines() if line.startswith("noarch/")]
    assert len(rows) == 3 and all("cached" in r and "Already deployed" in r for r in rows)
    assert "Already deployed: all 3 items" in warm.stdout


def test_json_output(tmp_path: Path, sample: Path) -> None:
    """--json prints only a JSON document on stdout, with each item's state."""
    result = ion_deploy_process(tmp_path, str(sample), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["cache"] == str(tmp_path / "cache")
    assert [(i["name"], i["state"]) for i in data["items"]] == [
        ("hello-tools", "downloaded"), ("greetings", "downloaded"), ("motd", "downloaded")]
    again = json.loads(ion_deploy_process(tmp_path, str(sample), "--json").stdout)
    assert all(i["state"] == "cached" and i["already"] for i in again["items"])


def test_missing_version_fails_that_item_only_with_partial(tmp_path: Path) -> None:
    """A version folder that does not exist: exit 1, the reason names where it looked; with --partial the
    others are deployed, without it (all or nothing) they are switched back: rolled back, counted so."""
    items = [dict(SAMPLE[0]), dict(SAMPLE[1], version="9.9"), dict(SAMPLE[2])]
    path = write_deployment(tmp_path, items)
    whole = ion_deploy_process(tmp_path, str(path), "--json")
    assert whole.returncode == 1
    states = {i["name"]: i for i in json.loads(whole.stdout)["items"]}
    assert states["hello-tools"]["state"] == "rolled back" and states["motd"]["state"] == "rolled back"
    assert "greetings" in states["motd"]["reason"]
    assert not (tmp_path / "deployed/etc/motd.txt").exists()  # nothing was there before: nothing is
    plain = ion_deploy_process(tmp_path, str(path))
    assert plain.returncode == 1 and "0 of 3 items deployed; 1 failed; 2 rolled back" in plain.stdout
    result = ion_deploy_process(tmp_path, str(path), "--json", "--partial")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    states = {i["name"]: i for i in data["items"]}
    assert {states["hello-tools"]["state"], states["motd"]["state"]} <= {"downloaded", "cached"}
    assert states["greetings"]["state"] == "failed"
    assert str(tmp_path / "repo/noarch/greetings/9.9") in states["greetings"]["reason"]
    assert (tmp_path / "deployed/etc/motd.txt").exists()
    plain = ion_deploy_process(tmp_path, str(path), "--partial")
    assert plain.returncode == 1 and "2 of 3 items deployed; 1 failed" in plain.stdout


def test_clear_first(tmp_path: Path, sample: Path) -> None:
    """-c empties the cache before deploying, so everything is downloaded again."""
    assert ion_deploy_process(tmp_path, str(sample)).returncode == 0
    result = ion_deploy_process(tmp_path, str(sample), "-c", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["clear"]["removed"]) == 3
    assert [i["state"] for i in data["items"]] == ["downloaded"] * 3


def test_verify_then_repair(tmp_path: Path, sample: Path) -> None:
    """--verify reports good entries, then a flipped byte as bad (exit 1); -r repairs and the deploy refetches."""
    assert ion_deploy_process(tmp_path, str(sample)).returncode == 0
    good = ion_deploy_process(tmp_path, "--verify")
    assert good.returncode == 0, good.stderr
    assert "verify: 3 entries, 3 good, 0 bad" in good.stdout

    cached = next((tmp_path / "cache").glob("*/noarch/motd/1.0/motd.txt"))
    data = bytearray(cached.read_bytes())
    data[0] ^= 0x01
    os.chmod(cached, 0o644)
    cached.write_bytes(bytes(data))
    bad = ion_deploy_process(tmp_path, "--verify")
    assert bad.returncode == 1
    assert "noarch/motd/1.0: bad" in bad.stdout and "1 bad" in bad.stdout

    repaired = ion_deploy_process(tmp_path, str(sample), "-r", "--json")
    assert repaired.returncode == 0, repaired.stderr
    result = json.loads(repaired.stdout)
    assert [r["action"] for r in result["repair"] if r["status"] == "bad"] == ["quarantined"]
    states = {i["name"]: i["state"] for i in result["items"]}
    assert states == {"hello-tools": "cached", "greetings": "cached", "motd": "downloaded"}
    assert ion_deploy_process(tmp_path, "--verify").returncode == 0


def rot(path: Path) -> None:
    """Flip one byte of ``path`` as bit rot does: same size, same mtime (only a re-hash sees it)."""
    st = os.stat(path)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(path, st.st_mode)


def test_verify_used_heals_a_bad_entry_before_placing_it(tmp_path: Path, sample: Path) -> None:
    """Without --verify-used a rotten entry passes the size and mtime checks and is served as today; with
    it, the entries the deployment uses are re-hashed, the bad one quarantined and fetched again, and the
    good bytes deployed (the others stay cached)."""
    assert ion_deploy_process(tmp_path, str(sample)).returncode == 0
    good = (tmp_path / "repo/noarch/motd/1.0/motd.txt").read_bytes()
    rot(next((tmp_path / "cache").glob("*/noarch/motd/1.0/motd.txt")))
    deployed = tmp_path / "deployed/etc/motd.txt"
    assert deployed.read_bytes() != good

    plain = ion_deploy_process(tmp_path, str(sample), "--json")
    assert plain.returncode == 0, plain.stderr
    data = json.loads(plain.stdout)
    assert [i["state"] for i in data["items"]] == ["cached"] * 3 and "healed" not in data
    assert deployed.read_bytes() != good

    healed = ion_deploy_process(tmp_path, str(sample), "--verify-used", "--json")
    assert healed.returncode == 0, healed.stderr
    data = json.loads(healed.stdout)
    assert {i["name"]: i["state"] for i in data["items"]} == {"hello-tools": "cached", "greetings": "cached",
                                                             "motd": "downloaded"}
    [fixed] = data["healed"]
    assert "motd.txt" in fixed["problems"] and fixed["state"] == "downloaded" and Path(fixed["moved_to"]).is_dir()
    assert "was bad" in healed.stderr and "quarantined, fetching it again" in healed.stderr
    assert deployed.read_bytes() == good
    assert ion_deploy_process(tmp_path, "--verify").returncode == 0
    again = ion_deploy_process(tmp_path, str(sample), "--verify-used", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["healed"] == []


def test_verify_used_needs_a_deployment_and_no_broker(tmp_path: Path) -> None:
    """--verify-used checks what a deployment run in this process uses: refused alone and with --broker."""
    code, _out, err = run_main("--verify-used", "--verify")
    assert code == 2 and "--verify-used checks the entries a deployment uses" in err
    code, _out, err = run_main(str(tmp_path / "d.json"), "--verify-used", "--broker", "amqp://x", "-s", "s")
    assert code == 2 and "with --broker the Cache service's periodic verification heals them" in err


def test_prune_keep_one(tmp_path: Path) -> None:
    """--prune --keep 1 keeps the most recently used version of a dependency and removes the older."""
    newer = tmp_path / "repo/noarch/motd/1.1"
    write_deployment(tmp_path, [])
    newer.mkdir()
    (newer / "motd.txt").write_text("a newer message of the day\n")
    first = write_deployment(tmp_path, [SAMPLE[2]], "v1.json")
    second = write_deployment(tmp_path, [dict(SAMPLE[2], version="1.1")], "v2.json")
    assert ion_deploy_process(tmp_path, str(first)).returncode == 0
    assert ion_deploy_process(tmp_path, str(second)).returncode == 0
    assert entries(tmp_path, "motd") == ["1.0", "1.1"]
    result = ion_deploy_process(tmp_path, "--prune", "--keep", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert [e["key"]["version"] for e in json.loads(result.stdout)["prune"]["removed"]] == ["1.0"]
    assert entries(tmp_path, "motd") == ["1.1"]
    assert (tmp_path / "deployed/etc/motd.txt").read_text() == "a newer message of the day\n"


def test_one_job_at_a_time(tmp_path: Path, sample: Path) -> None:
    """--jobs 1 deploys every item, one fetch at a time."""
    result = ion_deploy_process(tmp_path, str(sample), "--jobs", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert [i["state"] for i in json.loads(result.stdout)["items"]] == ["downloaded"] * 3


@pytest_twisted.ensureDeferred
async def test_through_a_running_system(amqp_url: str, tmp_path: Path) -> None:
    """--broker sends the deployment to the Deploy service of a running system on RabbitMQ."""
    from twisted.internet import utils

    from ion.testing import ContainerFactory

    sample = write_deployment(tmp_path, SAMPLE)
    factory = ContainerFactory(broker_url=amqp_url)
    try:
        container = await factory(sysname="clisys", config={
            "ion.services.cache": {"root": str(tmp_path / "service-cache"), "host_id": "test-host"},
            "ion.services.unpack": {"allowed_roots": [str(tmp_path / "service-cache")]},
            "ion.services.deploy": {"allowed_destinations": [str(tmp_path)],
                                    "allowed_file_repositories": [str(tmp_path)]},
        })
        await container.app_manager.start_app("deploy")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        # Plain output (not a terminal): the job's progress as lines, from the services' events.
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "ion.services.deploy.cli", str(sample), "--broker", amqp_url, "-s", "clisys"],
            env=env, path=str(tmp_path))
        text = out.decode()
        assert code == 0, err.decode() + text
        assert "noarch/motd/1.0: downloading motd.txt" in text, text
        assert sorted(line.split("] ")[1] for line in text.splitlines() if line.startswith("[")) == [
            "noarch/greetings/2.1: downloaded", "noarch/hello-tools/1.0: downloaded", "noarch/motd/1.0: downloaded"]
        assert (tmp_path / "deployed/etc/motd.txt").resolve().is_relative_to((tmp_path / "service-cache").resolve())
        # A comma list (a cluster's nodes): a node that is down is passed over for the next one.
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "ion.services.deploy.cli", str(sample), "--broker",
                             f"amqp://guest:down@127.0.0.1:1/,{amqp_url}", "-s", "clisys", "--json"],
            env=env, path=str(tmp_path))
        assert code == 0, err.decode()
        data = json.loads(out)
        assert [(i["state"], i["already"]) for i in data["items"]] == [("cached", True)] * 3
        assert data["broker"].startswith("amqp://guest:***@127.0.0.1:1/,") and "down" not in out.decode()
    finally:
        await factory.teardown()


def test_staging_left_by_a_dead_deployer_of_this_host_is_removed(tmp_path: Path, sample: Path) -> None:
    """A deployer killed mid-download leaves its staging folder; the next ion-deploy of that host removes it
    (a live process's folder, or another host's recent one, stays)."""
    import hashlib
    import subprocess as sp

    from ion.services.cache.locks import resolve_host_id

    proc = sp.Popen(["true"])
    proc.wait()
    tag = hashlib.sha256(resolve_host_id().encode()).hexdigest()[:8]
    staging = tmp_path / "cache" / "staging"
    dead = staging / f"{tag}-{proc.pid}-1700000000000-abcdef"
    live = staging / f"{tag}-{os.getpid()}-1-abcdef"
    other = staging / "0000ffff-1-1700000000000-abcdef"
    for folder in (dead, live, other):
        (folder / "part").mkdir(parents=True)
    done = ion_deploy_process(tmp_path, str(sample))
    assert done.returncode == 0, done.stderr
    assert not dead.exists() and live.exists() and other.exists()


# -- version, the repository in --verify, no empty folders after a failed fetch ------------------------
def test_version_from_the_package_metadata() -> None:
    """--version prints the installed distribution's version (nothing else needed), --json too."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        expected = version("ioncore")
    except PackageNotFoundError:
        expected = "unknown (not installed)"
    code, out, err = run_main("--version")
    assert (code, err) == (0, "") and out == f"ion-deploy (ioncore) {expected}\n"
    code, out, _err = run_main("--version", "--json")
    assert code == 0 and json.loads(out) == {"ok": True, "version": expected}


def test_verify_names_the_repository_of_each_entry(tmp_path: Path) -> None:
    """One version of one dependency from two repositories sharing a cache: --verify tells the lines apart."""
    items = [dict(SAMPLE[2])]
    first = write_deployment(tmp_path, items)
    shutil.copytree(EXAMPLE_REPO, tmp_path / "mirror")
    second = tmp_path / "mirror.json"
    second.write_text(json.dumps([{"url": "file:mirror", "items": [dict(SAMPLE[2], destination="deployed/etc2")]}]))
    assert ion_deploy_process(tmp_path, str(first)).returncode == 0
    assert ion_deploy_process(tmp_path, str(second)).returncode == 0
    lines = [line for line in ion_deploy_process(tmp_path, "--verify").stdout.splitlines() if line.endswith(": good")]
    assert sorted(lines) == sorted([f"verify: {tmp_path / 'repo/noarch/motd/1.0'}: good",
                                    f"verify: {tmp_path / 'mirror/noarch/motd/1.0'}: good"])


def empty_folders(root: Path) -> list[str]:
    """Every empty folder under ``root`` (relative), except ``staging/``: the cache's own work folder,
    shared by every fetch, that a successful fetch leaves empty as well."""
    found = []
    for folder, dirs, files in os.walk(root):
        if not dirs and not files and Path(folder) not in (root, root / "staging"):
            found.append(os.path.relpath(folder, root))
    return sorted(found)


def test_a_failed_fetch_from_a_file_repository_leaves_no_empty_folder(tmp_path: Path) -> None:
    """A version missing from a file: repository, and a file that fails its sha256 (after downloading
    into staging): the items fail, the cache holds no empty <repo>/<platform>/<name>/ or staging folder."""
    items = [dict(SAMPLE[1], version="9.9"), dict(SAMPLE[2], sha256="0" * 64)]
    result = ion_deploy_process(tmp_path, str(write_deployment(tmp_path, items)), "--json")
    assert result.returncode == 1
    assert [i["state"] for i in json.loads(result.stdout)["items"]] == ["failed", "failed"]
    cache = tmp_path / "cache"
    assert cache.is_dir() and empty_folders(cache) == []
    assert not list((cache / "staging").iterdir()) if (cache / "staging").exists() else True


def test_a_failed_fetch_from_an_http_404_leaves_no_empty_folder(tmp_path: Path) -> None:
    """A version folder a real HTTP server (``http.server``, autoindex) answers with a 404: that item
    fails, the one beside it is deployed, and no empty folder is left in the cache."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    shutil.copytree(EXAMPLE_REPO, tmp_path / "repo")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "repo"))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        path = tmp_path / "http.json"
        path.write_text(json.dumps([{"url": url, "items": [dict(SAMPLE[1], version="9.9"), dict(SAMPLE[2])]}]))
        result = ion_deploy_process(tmp_path, str(path), "--json", "--partial")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert result.returncode == 1, result.stderr
    items = {i["name"]: i for i in json.loads(result.stdout)["items"]}
    assert items["greetings"]["state"] == "failed" and "404" in items["greetings"]["reason"]
    assert items["motd"]["state"] == "downloaded"
    assert empty_folders(tmp_path / "cache") == []
    assert not list((tmp_path / "cache").glob("*/noarch/greetings"))


def test_broker_needs_the_system_name_and_a_real_broker() -> None:
    """Without -s no running Deploy service can be reached (a container's system is its own id unless named);
    memory:// would be this command's own broker. Both are usage errors (2), not a 404 later."""
    code, _, err = run_main("d.json", "--broker", "amqp://127.0.0.1:1/")
    assert code == 2 and "--broker needs -s/--sysname" in err
    code, _, err = run_main("d.json", "--broker", "memory://", "-s", "x")
    assert code == 2 and "without --broker, ion-deploy deploys in its own process" in err


def test_ion_deploy_and_the_cache_service_find_the_same_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With both $ION_CACHE_DIR and a configured root, the command and the services use the configured root."""
    from ion.services.cache.core import configured_root
    from ion.services.deploy.cli import _cache_root, _parser
    from ion.testing import test_config

    monkeypatch.setenv("ION_CACHE_DIR", str(tmp_path / "env"))
    config = test_config({"ion.services.cache": {"root": str(tmp_path / "configured")}})
    args = _parser().parse_args(["d.json"])
    assert _cache_root(args, config) == configured_root(config) == tmp_path / "configured"
    assert _cache_root(args, test_config()) == configured_root(test_config()) == tmp_path / "env"
    args = _parser().parse_args(["d.json", "--cache-dir", str(tmp_path / "flag")])
    assert _cache_root(args, config) == tmp_path / "flag"


def test_an_unreachable_broker_is_exit_69(tmp_path: Path) -> None:
    """--broker naming a broker that cannot be reached: one Error line, exit 69 (EX_UNAVAILABLE), as
    twistd cc and the ion command exit."""
    done = ion_deploy_process(tmp_path, "--verify", "--broker", "amqp://guest:guest@127.0.0.1:1/", "-s", "x")
    assert done.returncode == 69, done.stderr
    assert "Error: cannot connect to broker at 127.0.0.1:1" in done.stderr and "Traceback" not in done.stderr


# -- in process: the pools ------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_the_cache_and_the_placements_have_a_pool_of_their_own(sample: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """ion-deploy in process: the cache's and the placements' file work runs in a pool of
    ``FILES_THREADS`` threads (few threads handing the GIL over), the transfers in a pool of
    ``--jobs`` threads; every item deploys."""
    from twisted.internet import reactor

    from ion.services.deploy import cli
    from ion.services.deploy import core as deploy_core
    from ion.services.deploy.spec import load_deployment
    from ion.services.fetch import core as fetch_core

    seen: dict[str, Any] = {}
    real_deployer, real_fetcher = deploy_core.Deployer.__init__, fetch_core.Fetcher.__init__

    def deployer(self: Any, fetch: Any, pool: Any, **kwargs: Any) -> None:
        seen["placements"] = pool
        real_deployer(self, fetch, pool, **kwargs)

    def fetcher(self: Any, cache: Any, unpack: Any, **kwargs: Any) -> None:
        seen["cache"], seen["transfers"] = cache.pool, kwargs["pool"]
        real_fetcher(self, cache, unpack, **kwargs)

    monkeypatch.setattr(deploy_core.Deployer, "__init__", deployer)
    monkeypatch.setattr(fetch_core.Fetcher, "__init__", fetcher)
    monkeypatch.chdir(tmp_path)
    args = cli._parser().parse_args([str(sample), "--cache-dir", str(tmp_path / "cache"), "--jobs", "5", "--json"])
    cli._check_args(args)
    result: dict[str, Any] = {}
    with open(os.devnull, "w") as devnull:
        code = await cli._run_local(reactor, args, load_deployment(sample), cli.Output(devnull, sys.stderr,
                                                                                     as_json=True), result)
    assert code == cli.EXIT_OK and {row["state"] for row in result["items"]} == {"downloaded"}
    files, transfers = seen["placements"], seen["transfers"]
    assert seen["cache"] is files and files.name == "ion-files" and files.maxthreads == cli.FILES_THREADS
    assert transfers is not files and transfers.maxthreads >= 5
