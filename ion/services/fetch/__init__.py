"""The Fetch service of the deployer (DESIGN §8): repositories, downloads, the fetch of one entry.

- :mod:`~ion.services.fetch.repository`: :class:`Repository` (``file:``,
  ``http(s):``, ``s3:``), streamed and verified downloads, :func:`repository_for`.
- :mod:`~ion.services.fetch.core`: :class:`Fetcher`, messaging-independent:
  cache lookup, lock, download into staging, verify, unpack, publish.
- :mod:`~ion.services.fetch.errors`: :class:`FetchError` and its subclasses.
- :mod:`~ion.services.fetch.service`: ``FetchService`` and ``FetchClient``
  (loaded on first use, so the core needs no container).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ion.services.fetch.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ChecksumMismatchError,
    FetchError,
    InvalidRequestError,
    NotFoundError,
    RepositoryError,
    TransferError,
)
from ion.services.fetch.repository import (
    Checksum,
    Downloaded,
    FetchConfig,
    FileRepository,
    HTTPRepository,
    RemoteFile,
    Repository,
    S3Repository,
    repository_for,
)

if TYPE_CHECKING:
    from ion.services.fetch.core import Fetcher, FetchProgress, FetchRequest, FetchResult
    from ion.services.fetch.service import FetchClient, FetchService

__all__ = [
    "AccessDeniedError", "BucketNotFoundError", "ChecksumMismatchError", "FetchError", "InvalidRequestError",
    "NotFoundError", "RepositoryError", "TransferError",
    "Checksum", "Downloaded", "FetchConfig", "FileRepository", "HTTPRepository", "RemoteFile", "Repository",
    "S3Repository", "repository_for",
    "Fetcher", "FetchRequest", "FetchResult", "FetchProgress", "FetchService", "FetchClient",
]

_LAZY = {"Fetcher": "core", "FetchRequest": "core", "FetchResult": "core", "FetchProgress": "core",
         "FetchService": "service", "FetchClient": "service"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"ion.services.fetch.{module}"), name)
