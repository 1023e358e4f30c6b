"""Every exception of the container core, under one root.

Errors that cross the wire have a response code (DESIGN §4): 4xx are the
caller's fault, 5xx the container's. A reply of status ``ERROR`` comes back to
the caller as one of the ``Received*`` classes, carrying the reply's headers
and content.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "IonError",
    "IllegalStateError",
    "ConfigurationError",
    "AppError",
    "MessageError",
    "MalformedMessageError",
    "MessageTooLargeError",
    "TransportError",
    "ConnectionLostError",
    "ApplicationError",
    "ReceivedError",
    "ReceivedApplicationError",
    "ReceivedContainerError",
    "ConversationTimeout",
    "ConversationError",
    "received_error_for",
]


class IonError(Exception):
    """Root of every ioncore exception."""


class IllegalStateError(IonError):
    """Raised when a lifecycle event is not allowed in the object's current state."""


class ConfigurationError(IonError):
    """Raised when a config, app or rel file cannot be read or is not valid."""


class AppError(IonError):
    """Raised when an app cannot be started: bad module, dependency cycle, version mismatch."""


class MessageError(IonError):
    """Base for messages that cannot be encoded, decoded or dispatched."""


class MalformedMessageError(MessageError):
    """Raised when a message body is not a valid ION message (bad msgpack, missing headers)."""


class MessageTooLargeError(MessageError):
    """Raised when an encoded message exceeds the configured size limit."""


class TransportError(IonError):
    """Raised by a transport when the broker refuses an operation."""


class ConnectionLostError(TransportError):
    """Raised for operations (and in-flight RPCs) cut off by a lost broker connection."""


class ApplicationError(IonError):
    """Raised inside an ``op_*`` to answer the caller with a chosen 4xx code.

    :param message: text the caller sees in the error reply.
    :param code: the ``response-code`` of the reply (default 400).
    """

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class ReceivedError(IonError):
    """An ``ERROR`` reply came back for a conversation.

    :ivar headers: the reply's headers (``response-code``, ``sender``, ...).
    :ivar content: the reply's content, ``{"error": ..., "message": ...}``.
    """

    def __init__(self, headers: Mapping[str, Any], content: Any) -> None:
        self.headers = dict(headers)
        self.content = content
        super().__init__(self.__str__())

    @property
    def response_code(self) -> int:
        """The reply's HTTP-like code."""
        return int(self.headers.get("response-code", 500))

    @property
    def remote_error(self) -> str | None:
        """Class name of the exception raised at the responder, if any."""
        if isinstance(self.content, dict):
            err = self.content.get("error")
            return str(err) if err is not None else None
        return None

    @property
    def message(self) -> str:
        """The responder's explanation."""
        if isinstance(self.content, dict) and "message" in self.content:
            return str(self.content["message"])
        return repr(self.content)

    def __str__(self) -> str:
        sender = self.headers.get("sender-name") or self.headers.get("sender", "?")
        kind = f" {self.remote_error}" if self.remote_error else ""
        return f"{self.response_code}{kind} from {sender}: {self.message}"


class ReceivedApplicationError(ReceivedError):
    """An ``ERROR`` reply with a 4xx code: the request was refused or wrong."""


class ReceivedContainerError(ReceivedError):
    """An ``ERROR`` reply with a 5xx code: the responder failed."""


class ConversationTimeout(ReceivedError):
    """No final reply arrived within the conversation's timeout (code 408)."""

    def __init__(self, receiver: str, op: str, timeout: float, conv_id: str) -> None:
        super().__init__(
            {"response-code": 408, "sender": receiver, "conv-id": conv_id},
            {
                "error": "ConversationTimeout",
                "message": f"no reply to {op!r} from {receiver} within {timeout:g} s",
            },
        )


class ConversationError(ReceivedError):
    """The conversation broke before a reply: connection lost, process terminated."""

    def __init__(self, receiver: str, conv_id: str, reason: str, code: int = 503) -> None:
        super().__init__(
            {"response-code": code, "sender": receiver, "conv-id": conv_id},
            {"error": "ConversationError", "message": reason},
        )


def received_error_for(headers: Mapping[str, Any], content: Any) -> ReceivedError:
    """Build the exception a caller sees for an ``ERROR`` reply."""
    code = int(headers.get("response-code", 500) or 500)
    if 400 <= code < 500:
        return ReceivedApplicationError(headers, content)
    if code >= 500:
        return ReceivedContainerError(headers, content)
    return ReceivedError(headers, content)
