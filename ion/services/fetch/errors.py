# -*- test-case-name: tests.services.fetch.test_repository -*-
"""Errors of the Fetch service, under one root: :class:`FetchError`.

Every message names the URL (or path) that was tried, so a user can paste it
into a browser or ``aws s3 ls``. Each class carries the response code the
Fetch service answers with (DESIGN §4: 4xx the request cannot be done as
asked, 5xx the repository or this side failed);
:class:`~ion.services.fetch.service.FetchClient` raises the same classes on
the caller's side (:data:`ERRORS_BY_NAME`).
"""

from __future__ import annotations

from typing import ClassVar

from ion.core.exceptions import IonError

__all__ = [
    "FetchError",
    "InvalidRequestError",
    "NotFoundError",
    "BucketNotFoundError",
    "AccessDeniedError",
    "AddressNotAllowedError",
    "ChecksumMismatchError",
    "TransferError",
    "RepositoryError",
    "WriteError",
    "ERRORS_BY_NAME",
]


class FetchError(IonError):
    """Root of every Fetch error.

    :ivar url: the URL or path tried, when there is one.
    :ivar code: the response code the service answers with.
    """

    code: ClassVar[int] = 500

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.url = url

    def __str__(self) -> str:
        return self.message


class InvalidRequestError(FetchError):
    """Raised for a fetch request that cannot be used: a missing key, a bad URL,
    a ``sha256`` that does not fit the version's files, a ``file:`` repository
    outside the allowed roots (code 403 then)."""

    code: ClassVar[int] = 400

    def __init__(self, message: str, *, url: str | None = None, code: int | None = None) -> None:
        super().__init__(message, url=url)
        if code is not None:
            self.code = code  # type: ignore[misc]


class NotFoundError(FetchError):
    """Raised when the version folder (or a file listed in it) is not in the repository:
    ``no files under s3://bucket/p/linux/zlib/1.2/``."""

    code: ClassVar[int] = 404


class BucketNotFoundError(NotFoundError):
    """Raised when the S3 bucket of the repository does not exist."""


class AccessDeniedError(FetchError):
    """Raised when the repository refuses access (HTTP 401/403, S3 AccessDenied, even
    anonymously; a local folder that cannot be read)."""

    code: ClassVar[int] = 403


class AddressNotAllowedError(AccessDeniedError):
    """Raised when a fetch requested by message would connect to an address it may not
    reach: loopback, private, link-local, unspecified, multicast or reserved, outside
    ``allowed_networks`` (config of ``ion.services.fetch``). Checked on the address the
    host name resolved to, at connection time, redirects included; nothing is sent.

    :ivar address: the address refused.
    """

    code: ClassVar[int] = 403
    address: str = ""

    def __init__(self, message: str, *, url: str | None = None, address: str = "") -> None:
        super().__init__(message, url=url)
        self.address = address


class ChecksumMismatchError(FetchError):
    """Raised when a downloaded file does not match its expected checksum (the
    repository's ETag, ``Content-MD5`` or ``.sha256`` sidecar, or the item's
    ``sha256``). Nothing is published.

    :ivar file: the file's path in the version folder.
    :ivar expected: ``algorithm:hex`` expected.
    :ivar got: ``algorithm:hex`` computed (None: the file is not in the version folder).
    """

    code: ClassVar[int] = 422

    def __init__(self, file: str, expected: str, got: str | None, *, url: str | None = None,
                 source: str = "") -> None:
        where = f" ({url})" if url else ""
        by = f" by {source}" if source else ""
        if got is None:
            message = f"checksum mismatch for {file}{where}: {expected} expected{by}, but the file is not there"
        else:
            message = f"checksum mismatch for {file}{where}: expected {expected}{by}, got {got}"
        super().__init__(message, url=url)
        self.file = file
        self.expected = expected
        self.got = got


class TransferError(FetchError):
    """Raised when a transfer keeps failing (connection refused or dropped mid-file,
    a stalled or truncated body) after the configured retries.

    :ivar attempts: how many times it was tried.
    """

    code: ClassVar[int] = 502

    def __init__(self, message: str, *, url: str | None = None, attempts: int = 1) -> None:
        super().__init__(message, url=url)
        self.attempts = attempts


class RepositoryError(FetchError):
    """Raised when the repository answers with something unusable (an unexpected
    HTTP status, an S3 error other than not-found or access-denied, a malformed
    sidecar) or cannot be used at all (boto3 missing)."""

    code: ClassVar[int] = 502


class WriteError(FetchError):
    """Raised when a downloaded file cannot be written into the staging folder (the disk
    is full, a quota or file size limit is reached, an I/O error): names the file and the
    OS reason. The download stops at once; nothing is published.

    :ivar path: the file being written.
    :ivar errno: the OS error number.
    """

    code: ClassVar[int] = 507
    path: str = ""
    errno: int | None = None

    def __init__(self, message: str, *, url: str | None = None, path: str = "", errno: int | None = None) -> None:
        super().__init__(message, url=url)
        self.path = path
        self.errno = errno


#: Class name -> class, so a client can raise on its side what the service raised.
ERRORS_BY_NAME: dict[str, type[FetchError]] = {
    cls.__name__: cls
    for cls in (FetchError, InvalidRequestError, NotFoundError, BucketNotFoundError, AccessDeniedError,
                AddressNotAllowedError, ChecksumMismatchError, TransferError, RepositoryError, WriteError)
}
