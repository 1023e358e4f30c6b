# -*- test-case-name: tests.services.fetch.test_repository -*-
"""Errors of the Fetch service, under one root: :class:`FetchError`.

Every message names the URL (or path) that was tried, so a user can paste it
into a browser or ``aws s3 ls``. Each class carries the response code the
Fetch service answers with (DESIGN §4: 4xx the request cannot be done as
asked, 5xx the repository or this side failed). They are
:class:`~ion.core.exceptions.ApplicationError` s: the op lets one escape, and
the error reply carries its class name, code, message and ``reply_fields``
(``url``; a checksum mismatch's ``file``, ``expected``, ``got``; a refused
``address``). :class:`~ion.services.fetch.service.FetchClient` raises the
same classes again on the caller's side (its ``errors``, see
:mod:`ion.core.service`).
"""

from __future__ import annotations

from typing import ClassVar

from ion.core.exceptions import ApplicationError

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
    "CertificateError",
    "WriteError",
    "FetchCancelled",
]


class FetchError(ApplicationError):
    """Root of every Fetch error.

    :ivar url: the URL or path tried, when there is one.
    :ivar code: the response code the service answers with.
    """

    code = 500
    reply_fields: ClassVar[tuple[str, ...]] = ("url",)
    url: str | None = None

    def __init__(self, message: str, *, url: str | None = None, code: int | None = None) -> None:
        super().__init__(message, code)
        self.url = url


class InvalidRequestError(FetchError):
    """Raised for a fetch request that cannot be used: a missing key, a bad URL,
    a ``sha256`` that does not fit the version's files, a ``file:`` repository
    outside the allowed roots (code 403 then)."""

    code = 400


class NotFoundError(FetchError):
    """Raised when the version folder (or a file listed in it) is not in the repository:
    ``no files under s3://bucket/p/linux/zlib/1.2/``."""

    code = 404


class BucketNotFoundError(NotFoundError):
    """Raised when the S3 bucket of the repository does not exist."""


class AccessDeniedError(FetchError):
    """Raised when the repository refuses access (HTTP 401/403, S3 AccessDenied, even
    anonymously; a local folder that cannot be read)."""

    code = 403


class AddressNotAllowedError(AccessDeniedError):
    """Raised when a fetch requested by message would connect to an address it may not
    reach: loopback, private, link-local, unspecified, multicast or reserved, outside
    ``allowed_networks`` (config of ``ion.services.fetch``). Checked on the address the
    host name resolved to, at connection time, redirects included; nothing is sent.

    :ivar address: the address refused.
    """

    code = 403
    reply_fields = ("url", "address")
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

    code = 422
    reply_fields = ("url", "file", "expected", "got")
    file: str = ""
    expected: str = ""
    got: str | None = None

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

    code = 502
    attempts: int = 1

    def __init__(self, message: str, *, url: str | None = None, attempts: int = 1) -> None:
        super().__init__(message, url=url)
        self.attempts = attempts


class RepositoryError(FetchError):
    """Raised when the repository answers with something unusable (an unexpected
    HTTP status, an S3 error other than not-found or access-denied, a malformed
    sidecar) or cannot be used at all (boto3 missing)."""

    code = 502


class CertificateError(RepositoryError):
    """Raised when an ``https:`` server's certificate is not trusted (self-signed, expired, for
    another name) or its TLS handshake fails: a fact about the server, never retried."""

    code = 502


class WriteError(FetchError):
    """Raised when a downloaded file cannot be written into the staging folder (the disk
    is full, a quota or file size limit is reached, an I/O error): names the file and the
    OS reason. The download stops at once; nothing is published.

    :ivar path: the file being written.
    :ivar errno: the OS error number.
    """

    code = 507
    path: str = ""
    errno: int | None = None

    def __init__(self, message: str, *, url: str | None = None, path: str = "", errno: int | None = None) -> None:
        super().__init__(message, url=url)
        self.path = path
        self.errno = errno



class FetchCancelled(ApplicationError):
    """The answer to a fetch whose work was cancelled (409): by its caller, or by the
    service's stop. Not a :class:`FetchError`: the caller that cancelled has its own
    ``CancelledError``; any other gets a ``ReceivedApplicationError`` naming it."""

    code = 409
