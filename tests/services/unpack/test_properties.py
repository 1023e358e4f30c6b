"""Property: whatever an archive holds, extraction never writes outside the target.

Names and link targets are drawn from a small alphabet ('..', '.', 'a', 'b', '/', and an
absolute path into the watched folder); tar and zip; files, folders, symlinks, hard links.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from ion.services.unpack import ArchiveLimitError, CorruptArchiveError, Limits, UnsafeArchiveError, extract
from tests.services.unpack.archives import M, Sandbox, tar_bytes, zip_bytes

#: Replaced by an absolute path inside the sandbox, so an absolute write would be seen.
ABS = "\x01ABS\x01"


def _path(prefixes: list[str], components: list[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda prefix, parts: prefix + "/".join(parts), st.sampled_from(prefixes),
                     st.lists(st.sampled_from(components), min_size=1, max_size=4))


# Member names are mostly plain, so later members and links get exercised; link
# targets lean on '..' to try every way out.
name_path = _path([""] * 30 + ["/", ABS + "/"], ["a", "b"] * 8 + [".", "..", ""])
link_path = _path(["", "", "", "/", ABS + "/"], ["..", "..", ".", "a", "b", ""])
member = st.builds(
    M,
    name=name_path,
    kind=st.sampled_from(["file", "file", "dir", "symlink", "symlink", "hardlink"]),
    data=st.sampled_from([b"", b"x", b"pwned" * 3]),
    link=link_path | name_path,
    mode=st.sampled_from([None, 0o4777, 0o600]),
)
archive_members = st.lists(member, min_size=1, max_size=6)


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


def _deep_sandbox(tmp: Path) -> Sandbox:
    """A sandbox six folders below the watched temporary folder, so that a write climbing
    a few '..' above the sandbox is still seen."""
    return Sandbox(tmp / "1" / "2" / "3" / "4" / "5" / "6", watch=tmp)


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


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=archive_members, zip_format=st.booleans())
@example(members=[M("a/a/a", data=b"x"), M("a/a/a", "hardlink", link="a/a/a")], zip_format=False)  # (found once)
def test_extraction_never_writes_outside_the_target(members, zip_format):
    """Generated archives never change anything outside the target and fail only as refusals."""
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = _deep_sandbox(Path(tmp))
        abs_root = str(sandbox.root / "outside")
        concrete = _concrete(members, abs_root, zip_format)
        archive = sandbox.archives / ("gen.zip" if zip_format else "gen.tgz")
        archive.write_bytes(zip_bytes(concrete) if zip_format else tar_bytes(concrete, "w:gz"))
        sandbox.arm()
        try:
            extract(archive, sandbox.target, Limits(max_members=6))
        except (UnsafeArchiveError, ArchiveLimitError, CorruptArchiveError) as exc:
            # Not TargetError: in a sandbox that works, failing to write is a bug of ours.
            event(type(exc).__name__)
        else:
            event("extracted")
            _all_links_inside(sandbox.target)
        sandbox.assert_untouched()


relative_link = st.lists(st.sampled_from(["..", "..", ".", "a", "b"]), min_size=1, max_size=4).map("/".join)
plain_name = st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=3).map("/".join)


@st.composite
def linked_archives(draw: st.DrawFn) -> list[M]:
    """Archives of plain names whose links are followed by members below them: the shape of
    every write-through-a-link attack."""
    members: list[M] = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(plain_name)
        kind = draw(st.sampled_from(["symlink", "symlink", "hardlink", "dir", "file"]))
        members.append(M(name, kind, b"x", draw(relative_link | plain_name)))
        for _ in range(draw(st.integers(0, 2))):
            members.append(M(f"{name}/{draw(plain_name)}", draw(st.sampled_from(["file", "dir", "symlink"])),
                             b"pwned", draw(relative_link)))
    return members


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=linked_archives(), zip_format=st.booleans())
def test_links_never_carry_a_write_outside(members, zip_format):
    """Links followed by members below them never carry a write out, nor leave a link pointing out."""
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = _deep_sandbox(Path(tmp))
        concrete = _concrete(members, "", zip_format)
        archive = sandbox.archives / ("gen.zip" if zip_format else "gen.tar")
        archive.write_bytes(zip_bytes(concrete) if zip_format else tar_bytes(concrete))
        sandbox.arm()
        try:
            extract(archive, sandbox.target)
        except (UnsafeArchiveError, ArchiveLimitError, CorruptArchiveError) as exc:
            event(type(exc).__name__)
        else:
            event("extracted")
            _all_links_inside(sandbox.target)
        sandbox.assert_untouched()
