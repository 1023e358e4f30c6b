"""Builders of test archives (good and hostile) and a watch on the folders around a target."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

TAR_MODES = {"tar": "w", "tar.gz": "w:gz", "tgz": "w:gz", "tar.bz2": "w:bz2", "tbz2": "w:bz2",
             "tar.xz": "w:xz", "txz": "w:xz"}


@dataclass
class M:
    """One member to put in an archive: kind is file, dir, symlink, hardlink, chr, blk or fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    link: str = ""
    mode: int | None = None


def tar_bytes(members: Iterable[M], mode: str = "w", fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar archive (``mode`` as tarfile.open's, ``w:gz`` etc.) holding ``members`` verbatim."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mtime = 1_700_000_000
            types = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                     "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
                     "fifo": tarfile.FIFOTYPE}
            info.type = types[m.kind]
            info.mode = m.mode if m.mode is not None else (0o755 if m.kind == "dir" else 0o644)
            info.linkname = m.link
            if m.kind == "file":
                info.size = len(m.data)
                tf.addfile(info, io.BytesIO(m.data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def write_tar(path: Path, members: Iterable[M], mode: str = "w") -> Path:
    path.write_bytes(tar_bytes(members, mode))
    return path


def zip_bytes(members: Iterable[M], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip holding ``members``; symlinks and devices carry Unix modes in external_attr."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", compression) as zf:
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are made on purpose
        for m in members:
            info = zipfile.ZipInfo(m.name, date_time=(2024, 1, 2, 3, 4, 5))
            info.create_system = 3
            info.compress_type = compression
            kind_bits = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
                         "chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO}[m.kind]
            perms = m.mode if m.mode is not None else (0o755 if m.kind == "dir" else 0o644)
            info.external_attr = (kind_bits | perms) << 16
            data = m.link.encode() if m.kind == "symlink" else m.data
            if m.kind == "dir" and not info.filename.endswith("/"):
                info.filename += "/"
            zf.writestr(info, data)
    return buf.getvalue()


def write_zip(path: Path, members: Iterable[M], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    path.write_bytes(zip_bytes(members, compression))
    return path


def snapshot(root: Path, exclude: Path | None = None) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed) with its kind, size, mode and mtime."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        if exclude is not None and (here == exclude or exclude in here.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = here / name
            if exclude is not None and p == exclude:
                continue
            st = p.lstat()
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            # A folder's mtime moves when an entry is added or removed, which the names
            # already show (and the target's parent gains the target): files only.
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mode, mtime, link,
                                             st.st_nlink if stat.S_ISREG(st.st_mode) else None)
    return out


@dataclass
class Sandbox:
    """A folder holding decoys, a staging folder and the (not yet made) target inside it.

    ``assert_untouched()`` checks that nothing outside the target was created,
    changed or removed.
    """

    root: Path
    #: The folder watched for changes (default ``root``); give an ancestor to see writes
    #: that climb higher than ``root``.
    watch: Path | None = None
    target: Path = field(init=False)
    archives: Path = field(init=False)
    before: dict[str, tuple] = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.watch = self.watch or self.root
        (self.root / "outside").mkdir()
        (self.root / "outside" / "secret").write_text("do not touch")
        (self.root / "staging").mkdir()
        (self.root / "archives").mkdir()
        self.archives = self.root / "archives"
        self.target = self.root / "staging" / "target"
        self.before = {}

    def arm(self) -> None:
        """Take the 'before' picture (after the archives are written)."""
        self.before = snapshot(self.watch, exclude=self.target)

    def assert_untouched(self) -> None:
        after = snapshot(self.watch, exclude=self.target)
        assert after == self.before, f"outside the target changed: {set(after) ^ set(self.before)}"

    def inside(self) -> list[str]:
        """Everything under the target, relative names, sorted."""
        return sorted(snapshot(self.target)) if self.target.exists() else []
