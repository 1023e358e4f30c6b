"""Every hostile archive of ``archives.py``, unpacked by the real unpack core into a sandbox.

For each case: the precise answer (the error's class and message, the file kept, or
the archive extracted with what it tried defused); nothing outside the target created,
changed or removed (the whole tmp tree is watched, a sentinel ``outside/secret`` sits
next to the staging folder); no more written than the limits allow; no leftovers
where the code promises none; no file descriptor left open.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from ion.services.unpack import Limits, NotAnArchiveError, UnsafeArchiveError, extract, unpack
from tests.hostile.archives import CASES, EXTRACTED, KEPT, Case
from tests.services.unpack.archives import Sandbox


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.id, marks=marks)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _written(target: Path) -> int:
    """Bytes of the regular files under ``target`` (each inode once)."""
    seen: dict[tuple[int, int], int] = {}
    for dirpath, _dirs, names in os.walk(target):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def test_case_ids_are_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_hostile_archive(case: Case, tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path / "box", watch=tmp_path)
    archive = sandbox.archives / case.name
    data = case.build(archive) if callable(case.build) else case.build
    if data is not None:
        archive.write_bytes(data)
    limits = case.limits or Limits()
    sandbox.arm()
    fds = _open_fds()

    if case.expect == KEPT:
        result = unpack(archive, sandbox.target, limits)
        assert result.kept and result.detection.format is None
        assert not sandbox.target.exists()
        assert archive.read_bytes() == data
        with pytest.raises(NotAnArchiveError):
            extract(archive, sandbox.target, limits)
        assert not sandbox.target.exists()
    elif case.expect == EXTRACTED:
        if case.format is not None:
            extract(archive, sandbox.target, limits, format=case.format)
        else:
            assert not unpack(archive, sandbox.target, limits).kept
        for name, content, mode in case.files:
            path = sandbox.target / name
            assert path.read_bytes() == content
            assert oct(stat.S_IMODE(path.lstat().st_mode)) == oct(mode), name
    else:
        assert isinstance(case.expect, type)
        with pytest.raises(case.expect) as info:
            if case.format is not None:
                extract(archive, sandbox.target, limits, format=case.format)
            else:
                unpack(archive, sandbox.target, limits)
        err = info.value
        assert type(err) is case.expect, repr(err)
        text = str(err)
        assert str(archive) in text
        if isinstance(err, UnsafeArchiveError):
            assert f"member {err.member!r} {err.reason}" in text
        for fragment in case.message:
            assert fragment.replace("{root}", str(sandbox.root)) in text, text
        if case.clean:
            assert sandbox.inside() == []

    sandbox.assert_untouched()
    assert (sandbox.root / "outside" / "secret").read_text() == "do not touch"
    assert (sandbox.root / "outside" / "secret").stat().st_nlink == 1
    for name in case.absent:
        assert not os.path.lexists(sandbox.target / name), name
    if sandbox.target.exists():
        written = _written(sandbox.target)
        assert written <= limits.max_total_bytes
        if written > limits.ratio_threshold:
            assert written <= limits.max_ratio * archive.stat().st_size + 1024 * 1024
    assert _open_fds() == fds
