"""Every exception of the container core, under one root.

Errors that cross the wire have a response code (DESIGN §4): 4xx are the
caller's fault, 5xx the container's. A reply of status ``ERROR`` comes back to
the caller as one of the ``Received*`` classes, carrying the reply's headers
and content.

**Service errors.** Every error a service answers with on purpose is an
:class:`ApplicationError`: its class name, ``code`` and message -- and its
:attr:`~ApplicationError.details`, e.g. the ``url`` it tried -- make the
error reply (see :meth:`ApplicationError.reply_content`), so an op just raises
it. A :class:`~ion.core.service.ServiceClient` lists the error families it
raises again (``errors``): a reply naming one of their classes comes back to
the caller as that class (:func:`error_from_reply`,
:meth:`ApplicationError.from_reply`); any other as ``Received*``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar, Final, Self

__all__ = [
    "CONNECTION_LOST",
    "NOT_BOUND",
    "NOT_SENT",
    "IonError",
    "IllegalStateError",
    "ConfigurationError",
    "AppError",
    "MessageError",
    "MalformedMessageError",
    "MessageTooLargeError",
    "TransportError",
    "ConnectionLostError",
    "MessageRefusedError",
    "ApplicationError",
    "RelayedError",
    "ReceivedError",
    "ReceivedApplicationError",
    "ReceivedContainerError",
    "ConversationTimeout",
    "ConversationError",
    "received_error_for",
    "error_from_reply",
    "cut_off",
    "not_bound",
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


class MessageRefusedError(TransportError):
    """The broker refused a published message (``basic.nack``): a quorum queue it was routed to has no
    leader (an election after its leader's node died, a few seconds), or the queue failed. The message
    was not taken; sent again later, it may be."""


class ApplicationError(IonError):
    """Raised inside an ``op_*`` to answer the caller with a chosen code (an error reply:
    one warning line in the log, no traceback).

    The reply's content is ``{"error": <class name>, "message": str(exc)}`` plus the
    details (:meth:`reply_content`). A subclass sets its default ``code``, and names in
    ``reply_fields`` the attributes it sends (and :meth:`from_reply` sets again).

    :param message: text the caller sees in the error reply.
    :param code: the ``response-code`` of the reply (default: the class's ``code``, 400).
    :param details: more fields of the reply content, beside ``error`` and ``message``.
    """

    #: The reply's ``response-code`` unless the constructor is given one.
    code: int = 400
    #: Attributes sent in the reply content beside ``error`` and ``message``, and set again
    #: on the exception :meth:`from_reply` rebuilds on the caller's side.
    reply_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, message: str, code: int | None = None, *, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        #: Extra fields of the reply content (besides those of ``reply_fields``).
        self.details: dict[str, Any] = dict(details or {})

    @property
    def message(self) -> str:
        """The text the caller sees (``str(exc)``)."""
        return str(self)

    def reply_content(self) -> dict[str, Any]:
        """The content of the error reply: the details, ``reply_fields``, ``error`` and ``message``."""
        content = dict(self.details)
        content.update((name, getattr(self, name, None)) for name in type(self).reply_fields)
        content["error"] = type(self).__name__
        content["message"] = self.message
        return content

    @classmethod
    def from_reply(cls, message: str, code: int, details: Mapping[str, Any]) -> Self:
        """This exception again, on the caller's side, from an error reply naming its class.

        The subclass's constructor is not run (it may build the message from its parts; the
        reply carries the message made): ``message``, ``code`` and ``details`` are set, and the
        attributes of ``reply_fields`` the reply has. A subclass with other state overrides it.
        """
        exc = cls.__new__(cls)
        ApplicationError.__init__(exc, message, code, details=details)
        for name in cls.reply_fields:
            if name in details:
                setattr(exc, name, details[name])
        return exc


class RelayedError(ApplicationError):
    """Another responder's error reply, passed on to our caller as it came: its ``error``
    name, code and message (e.g. a service answering with what a service it called said)."""

    def __init__(self, received: ReceivedError) -> None:
        super().__init__(received.message, received.response_code)
        #: The ``error`` name of the reply passed on.
        self.error = received.remote_error or type(received).__name__

    def reply_content(self) -> dict[str, Any]:
        content = super().reply_content()
        content["error"] = self.error
        return content


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


#: How a :class:`ConversationError` of a call cut off by the broker connection begins: lost while the
#: call was in flight (its request may have run), or not sent because the connection was down.
CONNECTION_LOST: Final = "connection to the broker lost"
NOT_SENT: Final = "could not send"
#: How the 404 :class:`ConversationError` of a request no queue took (nobody bound to its receiver) begins.
NOT_BOUND: Final = "no process or service is bound to"


class ConversationError(ReceivedError):
    """The conversation broke before a reply: connection lost, process terminated."""

    def __init__(self, receiver: str, conv_id: str, reason: str, code: int = 503) -> None:
        super().__init__(
            {"response-code": code, "sender": receiver, "conv-id": conv_id},
            {"error": "ConversationError", "message": reason},
        )


def cut_off(exc: BaseException) -> bool:
    """Whether a call failed because this container lost its connection to the broker (its request
    may or may not have run): the 503 :class:`ConversationError` of a call in flight at the loss, or
    of one that could not be sent while reconnecting."""
    if not isinstance(exc, ConversationError) or exc.response_code != 503 or not isinstance(exc.content, Mapping):
        return False
    message = str(exc.content.get("message") or "")
    return message.startswith((CONNECTION_LOST, NOT_SENT))


def not_bound(exc: BaseException) -> bool:
    """Whether a call failed because no queue took its request (404: nobody bound to its receiver)."""
    return (isinstance(exc, ConversationError) and exc.response_code == 404 and isinstance(exc.content, Mapping)
            and str(exc.content.get("message") or "").startswith(NOT_BOUND))


def received_error_for(headers: Mapping[str, Any], content: Any) -> ReceivedError:
    """Build the exception a caller sees for an ``ERROR`` reply."""
    code = int(headers.get("response-code", 500) or 500)
    if 400 <= code < 500:
        return ReceivedApplicationError(headers, content)
    if code >= 500:
        return ReceivedContainerError(headers, content)
    return ReceivedError(headers, content)


def _family(root: type[ApplicationError]) -> Iterator[type[ApplicationError]]:
    yield root
    for sub in root.__subclasses__():
        yield from _family(sub)


def error_from_reply(received: ReceivedError, families: Iterable[type[ApplicationError]]) -> ApplicationError | None:
    """The exception an error reply stands for, if its ``error`` names a class of ``families``
    (one of them or a subclass): that class rebuilt by :meth:`ApplicationError.from_reply`,
    with the reply's message, code and other content fields; else None."""
    name = received.remote_error
    if not name:
        return None
    for root in families:
        for cls in _family(root):
            if cls.__name__ == name:
                content = received.content if isinstance(received.content, Mapping) else {}
                details = {k: v for k, v in content.items() if k not in ("error", "message")}
                return cls.from_reply(received.message, received.response_code, details)
    return None
