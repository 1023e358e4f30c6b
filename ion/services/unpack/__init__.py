"""The Unpack service of the deployer (DESIGN §8): safe detection and extraction of archives.

The core (:mod:`ion.services.unpack.core`) is plain blocking functions, importable
without Twisted; :class:`UnpackService` and :class:`UnpackClient`
(:mod:`ion.services.unpack.service`) are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ion.services.unpack.core import (
    ArchiveAccessError,
    ArchiveFormat,
    ArchiveLimitError,
    CorruptArchiveError,
    Detection,
    ExtractResult,
    Limits,
    NotAnArchiveError,
    TargetError,
    UnpackError,
    UnpackResult,
    UnsafeArchiveError,
    claimed_format,
    detect,
    extract,
    extract_stream,
    unpack,
)

if TYPE_CHECKING:
    from ion.services.unpack.service import UnpackClient, UnpackService

__all__ = [
    "ArchiveAccessError",
    "ArchiveFormat",
    "ArchiveLimitError",
    "CorruptArchiveError",
    "Detection",
    "ExtractResult",
    "Limits",
    "NotAnArchiveError",
    "TargetError",
    "UnpackError",
    "UnpackResult",
    "UnsafeArchiveError",
    "claimed_format",
    "detect",
    "extract",
    "extract_stream",
    "unpack",
    "UnpackService",
    "UnpackClient",
]


def __getattr__(name: str) -> Any:
    if name in ("UnpackService", "UnpackClient"):
        from ion.services.unpack import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
