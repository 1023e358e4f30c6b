"""Property: whatever an archive holds, extraction never writes outside the target."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ion.services.unpack import Limits, UnpackError, extract
from tests.services.unpack.archives import M, Sandbox, tar_bytes, zip_bytes

#: Replaced by an absolute path inside the sandbox, so an absolute write would be seen.
ABS = "\x01ABS\x01"

component = st.sampled_from(["..", ".", "a", "b", ""])
path = st.builds(
    lambda prefix, parts: prefix + "/".join(parts),
    st.sampled_from(["", "", "", "/", ABS + "/"]),
    st.lists(component, min_size=1, max_size=4),
)
member = st.builds(
    M,
    name=path,
    kind=st.sampled_from(["file", "file", "dir", "symlink", "symlink", "hardlink"]),
    data=st.sampled_from([b"", b"x", b"pwned" * 3]),
    link=path,
    mode=st.sampled_from([None, 0o4777, 0o600]),
)
archive_members = st.lists(member, min_size=1, max_size=8)


def _concrete(members: list[M], abs_root: str, zip_format: bool) -> list[M]:
    out = []
    for m in members:
        name = m.name.replace(ABS, abs_root)
        link = m.link.replace(ABS, abs_root)
        if zip_format and m.kind == "hardlink":  # zip has no hard links: use a symlink instead
            out.append(M(name, "symlink", link=link))
        else:
            out.append(M(name, m.kind, m.data, link, m.mode))
    return out


def _all_links_inside(target: Path) -> None:
    real_target = os.path.realpath(target)
    for dirpath, dirnames, filenames in os.walk(target):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                resolved = os.path.realpath(p)
                assert os.path.commonpath([resolved, real_target]) == real_target, f"{p} -> {resolved}"
            st_mode = p.lstat().st_mode
            assert not (st_mode & 0o7000), f"{p} kept a setuid/setgid/sticky bit"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=archive_members, zip_format=st.booleans())
def test_extraction_never_writes_outside_the_target(members, zip_format):
    """For generated archives (names of '..', '.', 'a', '/', links), nothing outside the target
    changes, every error is an UnpackError, and a finished tree has no link pointing out."""
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Sandbox(Path(tmp))
        abs_root = str(sandbox.root / "outside")
        concrete = _concrete(members, abs_root, zip_format)
        archive = sandbox.archives / ("gen.zip" if zip_format else "gen.tgz")
        archive.write_bytes(zip_bytes(concrete) if zip_format else tar_bytes(concrete, "w:gz"))
        sandbox.arm()
        try:
            extract(archive, sandbox.target, Limits(max_members=6))
        except UnpackError as exc:
            event(type(exc).__name__)
        else:
            event("extracted")
            _all_links_inside(sandbox.target)
        sandbox.assert_untouched()
