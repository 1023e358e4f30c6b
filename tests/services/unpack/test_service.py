"""The unpack service and client, end to end over the embedded broker."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import pytest_twisted

from ion.core.exceptions import ReceivedApplicationError, ReceivedContainerError
from ion.services.unpack import UnpackClient, UnpackService, core
from ion.testing import client_process
from tests.services.unpack.archives import M, Sandbox, write_tar, write_zip

GOOD = [M("pkg/README", data=b"read me"), M("pkg/run", data=b"#!/bin/sh\n", mode=0o755)]


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path / "root")


def _allow(container, sandbox: Sandbox) -> None:
    """The container's own setting (the command-line layer): the sandbox may be read and written."""
    container.config.set_command_line({"ion.services.unpack": {"allowed_roots": [str(sandbox.root)]}})


async def _client(container, process_factory, sandbox: Sandbox, **spawnargs) -> UnpackClient:
    _allow(container, sandbox)
    # The spawnargs narrow the container's roots (they may never widen them).
    spawnargs.setdefault("allowed_roots", [str(sandbox.root / "archives"), str(sandbox.root / "staging")])
    await process_factory(UnpackService, **spawnargs)
    return UnpackClient(await client_process(container))


@pytest_twisted.ensureDeferred
async def test_unpack_extracts_and_reports(container, process_factory, sandbox):
    """unpack answers {format, kept, members, bytes} and the tree is in the target."""
    client = await _client(container, process_factory, sandbox)
    archive = write_tar(sandbox.archives / "dep.tgz", GOOD, "w:gz")
    sandbox.arm()
    result = await client.unpack(archive, sandbox.target)
    assert result == {"format": "tar.gz", "kept": False, "members": 2, "bytes": 17}
    assert (sandbox.target / "pkg/README").read_bytes() == b"read me"
    assert os.access(sandbox.target / "pkg/run", os.X_OK)
    sandbox.assert_untouched()


@pytest_twisted.ensureDeferred
async def test_detect_reports_the_format_by_content(container, process_factory, sandbox):
    """detect answers the content's format and what the name claimed."""
    client = await _client(container, process_factory, sandbox)
    archive = write_zip(sandbox.archives / "dep.tgz", GOOD)
    found = await client.detect(archive)
    assert found["format"] == "zip" and found["claimed"] == "tar.gz" and found["archive"] is True
    assert "content is zip" in found["reason"]


@pytest_twisted.ensureDeferred
async def test_a_non_archive_is_kept(container, process_factory, sandbox):
    """A plain file is answered {format: null, kept: true} and nothing is written."""
    client = await _client(container, process_factory, sandbox)
    plain = sandbox.archives / "tool.bin"
    plain.write_bytes(b"\x7fELF" + bytes(100))
    sandbox.arm()
    result = await client.unpack(plain, sandbox.target)
    assert result["format"] is None and result["kept"] is True
    assert not sandbox.target.exists()
    sandbox.assert_untouched()


@pytest_twisted.ensureDeferred
async def test_an_unsafe_archive_is_a_422_naming_the_member(container, process_factory, sandbox):
    """An archive with ../ is refused with 422, UnsafeArchiveError and the member's name."""
    client = await _client(container, process_factory, sandbox)
    archive = write_tar(sandbox.archives / "evil.tar", [M("ok", data=b"1"), M("../evil", data=b"pwned")])
    sandbox.arm()
    with pytest.raises(ReceivedApplicationError) as info:
        await client.unpack(archive, sandbox.target)
    err = info.value
    assert err.response_code == 422 and err.remote_error == "UnsafeArchiveError"
    assert "member '../evil' escapes the target" in err.message and "evil.tar" in err.message
    sandbox.assert_untouched()


@pytest_twisted.ensureDeferred
async def test_corrupt_and_over_limit_archives_are_422s(container, process_factory, sandbox):
    """A corrupt archive and one over a configured limit come back as 422s naming the cause."""
    client = await _client(container, process_factory, sandbox, max_members=2)
    corrupt = sandbox.archives / "cut.zip"
    corrupt.write_bytes(write_zip(sandbox.archives / "full.zip", GOOD).read_bytes()[:50])
    many = write_tar(sandbox.archives / "many.tar", [M(f"f{i}", data=b"x") for i in range(5)])
    with pytest.raises(ReceivedApplicationError) as info:
        await client.unpack(corrupt, sandbox.target)
    assert info.value.response_code == 422 and info.value.remote_error == "CorruptArchiveError"
    assert "cut.zip: corrupt archive" in info.value.message
    with pytest.raises(ReceivedApplicationError) as info:
        await client.unpack(many, sandbox.root / "staging" / "other")
    assert info.value.remote_error == "ArchiveLimitError" and "max_members = 2" in info.value.message


@pytest_twisted.ensureDeferred
async def test_paths_outside_the_allowed_roots_are_403(container, process_factory, sandbox):
    """An archive or target outside allowed_roots, also through a symlink, is refused with 403."""
    client = await _client(container, process_factory, sandbox)
    archive = write_tar(sandbox.archives / "dep.tar", GOOD)
    os.symlink(sandbox.root / "outside", sandbox.root / "staging" / "sneaky")
    sandbox.arm()
    for target in (sandbox.root / "outside" / "t", sandbox.root / "staging" / "sneaky" / "t"):
        with pytest.raises(ReceivedApplicationError) as info:
            await client.unpack(archive, target)
        assert info.value.response_code == 403 and "outside the allowed roots" in info.value.message
    with pytest.raises(ReceivedApplicationError) as info:
        await client.unpack(sandbox.root / "outside" / "secret", sandbox.target)
    assert info.value.response_code == 403
    with pytest.raises(ReceivedApplicationError) as info:
        await client.unpack(archive, sandbox.root / "staging")
    assert info.value.response_code == 403  # the root itself is no target
    sandbox.assert_untouched()


@pytest_twisted.ensureDeferred
async def test_a_target_folder_swapped_for_a_link_after_the_check_is_never_written_through(
        container, process_factory, sandbox, monkeypatch):
    """The target's folder is checked inside the allowed roots, then swapped for a link out of them
    before the extraction: the target is walked to from its root without following links, so the
    request is refused (403, the link named) and nothing is written outside."""
    client = await _client(container, process_factory, sandbox)
    archive = write_tar(sandbox.archives / "dep.tar", GOOD)
    folder = sandbox.root / "staging" / "swapped"
    folder.mkdir()
    real_detect = core.detect

    def detect_then_swap(path, **kwargs):
        found = real_detect(path, **kwargs)
        folder.rmdir()
        os.symlink(sandbox.root / "outside", folder)
        return found

    monkeypatch.setattr(core, "detect", detect_then_swap)
    outside = sandbox.root / "outside"
    before = sorted((p.relative_to(outside), p.stat().st_mtime_ns) for p in outside.rglob("*"))
    with pytest.raises(ReceivedApplicationError) as info:
        await client.unpack(archive, folder / "t")
    assert info.value.response_code == 403 and "symbolic link" in info.value.message, info.value.message
    assert sorted((p.relative_to(outside), p.stat().st_mtime_ns) for p in outside.rglob("*")) == before


@pytest_twisted.ensureDeferred
async def test_an_archive_folder_swapped_for_a_link_after_the_check_is_never_read_through(
        container, process_factory, sandbox, monkeypatch):
    """The archive's folder is checked inside the allowed roots, then swapped for a link to a folder
    outside them holding an archive of the same name: the archive is opened by walking to it without
    following links, so the request is refused (403) and nothing of the outside archive is written."""
    client = await _client(container, process_factory, sandbox)
    folder = sandbox.root / "staging" / "incoming"
    folder.mkdir()
    write_tar(folder / "dep.tar", GOOD)
    elsewhere = sandbox.root / "elsewhere"
    elsewhere.mkdir()
    write_tar(elsewhere / "dep.tar", [M("planted.txt", data=b"not from the allowed roots")])
    real_allowed = UnpackService._allowed

    def allowed_then_swap(self, key, value, *, below=False):
        checked = real_allowed(self, key, value, below=below)
        if key == "archive":
            shutil.rmtree(folder)
            os.symlink(elsewhere, folder)
        return checked

    monkeypatch.setattr(UnpackService, "_allowed", allowed_then_swap)
    with pytest.raises(ReceivedApplicationError) as info:
        await client.unpack(folder / "dep.tar", sandbox.target)
    assert info.value.response_code == 403 and "symbolic link" in info.value.message, info.value.message
    assert not sandbox.target.exists()


@pytest_twisted.ensureDeferred
async def test_an_archive_or_detected_file_swapped_for_a_link_after_the_check_is_refused(
        container, process_factory, sandbox, monkeypatch):
    """The archive itself swapped for a link after its check (unpack), and a folder above a file
    swapped for one (detect): both refused with 403, nothing read through the link."""
    client = await _client(container, process_factory, sandbox)
    archive = write_tar(sandbox.archives / "dep.tar", GOOD)
    elsewhere = sandbox.root / "elsewhere"
    elsewhere.mkdir()
    write_tar(elsewhere / "dep.tar", [M("planted.txt", data=b"not from the allowed roots")])
    real_allowed = UnpackService._allowed
    swaps = {"archive": lambda: (archive.unlink(), os.symlink(elsewhere / "dep.tar", archive)),
             "path": lambda: (shutil.rmtree(sandbox.archives / "sub"), os.symlink(elsewhere, sandbox.archives / "sub"))}

    def allowed_then_swap(self, key, value, *, below=False):
        checked = real_allowed(self, key, value, below=below)
        if key in swaps:
            swaps.pop(key)()
        return checked

    monkeypatch.setattr(UnpackService, "_allowed", allowed_then_swap)
    with pytest.raises(ReceivedApplicationError) as info:
        await client.unpack(archive, sandbox.target)
    assert info.value.response_code == 403 and "symbolic link" in info.value.message, info.value.message
    assert not sandbox.target.exists()
    (sandbox.archives / "sub").mkdir()
    write_tar(sandbox.archives / "sub" / "dep.tar", GOOD)
    with pytest.raises(ReceivedApplicationError) as info:
        await client.detect(sandbox.archives / "sub" / "dep.tar")
    assert info.value.response_code == 403 and "symbolic link" in info.value.message, info.value.message


@pytest_twisted.ensureDeferred
async def test_malformed_requests_are_400(container, process_factory, sandbox):
    """Missing keys, relative paths and a missing archive are 400s saying what is wrong."""
    await _client(container, process_factory, sandbox)
    proc = await client_process(container)
    cases = [
        ("unpack", {"target": str(sandbox.target)}, "needs 'archive'"),
        ("unpack", "not a dict", "must be a dict"),
        ("unpack", {"archive": "rel/dep.tgz", "target": str(sandbox.target)}, "must be an absolute path"),
        ("detect", {"path": 42}, "needs 'path'"),
        ("unpack", {"archive": str(sandbox.archives / "gone.tgz"), "target": str(sandbox.target)},
         "cannot open archive"),
    ]
    for op, content, text in cases:
        with pytest.raises(ReceivedApplicationError) as info:
            await proc.rpc_send("unpack", op, content)
        assert info.value.response_code == 400 and text in info.value.message, (op, content)


@pytest_twisted.ensureDeferred
async def test_an_unwritable_target_is_a_500(container, process_factory, sandbox):
    """A target that cannot be made is a container-side failure (500, TargetError)."""
    client = await _client(container, process_factory, sandbox)
    archive = write_tar(sandbox.archives / "dep.tar", GOOD)
    with pytest.raises(ReceivedContainerError) as info:
        await client.unpack(archive, sandbox.root / "staging" / "missing" / "target")
    assert info.value.response_code == 500 and info.value.remote_error == "TargetError"


@pytest_twisted.ensureDeferred
async def test_extraction_runs_in_the_blocking_pool(container, process_factory, sandbox, monkeypatch):
    """The extraction happens on a pool thread, never on the reactor thread."""
    threads: list[threading.Thread] = []
    real = core.extract

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "extract", spy)
    client = await _client(container, process_factory, sandbox)
    archive = write_tar(sandbox.archives / "dep.tar", GOOD)
    await client.unpack(archive, sandbox.target)
    assert threads and threads[0] is not threading.main_thread()
    assert container.blocking.started


@pytest_twisted.ensureDeferred
async def test_the_app_file_starts_the_service(container, sandbox):
    """res/apps/unpack.app starts a working unpack service that reads ion.services.unpack config
    (the app's config narrows the container's limits)."""
    _allow(container, sandbox)
    await container.app_manager.start_app(
        "unpack", config={"ion.services.unpack": {"allowed_roots": [str(sandbox.root)], "max_members": 1}})
    client = UnpackClient(await client_process(container))
    archive = write_tar(sandbox.archives / "dep.tar", GOOD)
    assert (await client.detect(archive))["format"] == "tar"
    with pytest.raises(ReceivedApplicationError) as info:
        await client.unpack(archive, sandbox.target)
    assert "max_members = 1" in info.value.message
    assert (await client.ping())["service"] == "unpack"


@pytest.mark.parametrize("widening", [
    {"allowed_roots": ["/"]},
    {"max_members": 10 ** 9},
    {"max_total_bytes": 2 ** 62},
])
@pytest_twisted.ensureDeferred
async def test_spawnargs_and_app_config_never_widen_a_bound(container, process_factory, sandbox, widening):
    """A spawn (or an app's config) that would widen allowed_roots or a size limit is refused,
    naming the setting; the same values narrowing the bound are taken."""
    from ion.core.exceptions import AppError, ConfigurationError

    _allow(container, sandbox)
    with pytest.raises(ConfigurationError, match="may only be narrowed") as info:
        await process_factory(UnpackService, **widening)
    assert next(iter(widening)) in str(info.value) and "spawnargs" in str(info.value)
    with pytest.raises((AppError, ConfigurationError), match="may only be narrowed"):
        await container.app_manager.start_app("unpack", config={"ion.services.unpack": widening})
    narrow = await process_factory(UnpackService, allowed_roots=[str(sandbox.archives)], max_members=5)
    assert narrow.allowed_roots == [sandbox.archives.resolve()] and narrow.limits.max_members == 5


def test_default_roots_follow_the_cache_root(monkeypatch, tmp_path):
    """Without allowed_roots, requests may use the deploy cache root: its config, else $ION_CACHE_DIR."""
    from ion.services.unpack.service import default_allowed_roots
    from ion.testing import test_config

    monkeypatch.setenv("ION_CACHE_DIR", str(tmp_path / "cache"))
    assert default_allowed_roots() == [tmp_path / "cache"]
    assert default_allowed_roots(test_config()) == [tmp_path / "cache"]
    config = test_config({"ion.services.cache": {"root": str(tmp_path / "configured")}})
    assert default_allowed_roots(config) == [tmp_path / "configured"]


@pytest_twisted.ensureDeferred
async def test_the_default_roots_admit_the_cache_and_nothing_else(container_factory, tmp_path):
    """With allowed_roots unset, a path in the cache's staging is served and one beside it is 403."""
    cache = tmp_path / "cache"
    (cache / "staging").mkdir(parents=True)
    container = await container_factory(config={"ion.services.cache": {"root": str(cache)}})
    await container.spawn(UnpackService)
    client = UnpackClient(await client_process(container))
    inside = write_tar(cache / "staging" / "dep.tar", GOOD)
    assert (await client.detect(inside))["format"] == "tar"
    outside = write_tar(tmp_path / "dep.tar", GOOD)
    with pytest.raises(ReceivedApplicationError) as info:
        await client.detect(outside)
    assert info.value.response_code == 403 and str(cache) in info.value.message
