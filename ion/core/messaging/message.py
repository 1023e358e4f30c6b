"""The ION message: one dict of headers plus ``content`` (DESIGN §4), and its codec.

On the wire the whole dict is msgpack-encoded as the message body. Content is
any msgpack value; a protobuf message as content is carried as its serialised
bytes with ``encoding: protobuf`` and ``content-type`` naming its type, and is
turned back into an instance of that type on receipt.
"""

from __future__ import annotations

import itertools
import operator
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

import msgpack

from ion.core.exceptions import MalformedMessageError, MessageError, MessageTooLargeError
from ion.core.settings import MessagingSettings
from ion.core.trace import continue_trace, current_message

__all__ = [
    "HEADERS",
    "REQUIRED_HEADERS",
    "Performative",
    "Protocol",
    "encode",
    "decode",
    "build",
    "make",
    "validate",
    "is_expired",
    "DEFAULT_MAX_MESSAGE_SIZE",
]

#: Every header field of DESIGN §4, in the order they are documented.
HEADERS: Final = (
    "sender", "sender-name", "receiver", "reply-to", "op", "conv-id", "conv-seq",
    "protocol", "performative", "status", "response-code", "encoding",
    "content-type", "user-id", "expiry", "ts", "traceparent", "tracestate",
)

#: Headers without which a message cannot be dispatched or answered.
REQUIRED_HEADERS: Final = ("sender", "receiver", "op", "conv-id", "protocol", "performative")

#: Headers set by the receiving transport, never trusted from a body.
TRANSPORT_HEADERS: Final = ("broker-user",)

DEFAULT_MAX_MESSAGE_SIZE: Final = MessagingSettings.max_message_size
ANONYMOUS: Final = "ANONYMOUS"


class Performative:
    """FIPA performatives used by the conversation protocols."""

    REQUEST: Final = "request"
    AGREE: Final = "agree"
    REFUSE: Final = "refuse"
    INFORM_RESULT: Final = "inform_result"
    FAILURE: Final = "failure"
    INFORM: Final = "inform"

    ALL: Final = frozenset({"request", "agree", "refuse", "inform_result", "failure", "inform"})


class Protocol:
    """Conversation protocol names."""

    RPC: Final = "rpc"
    REQUEST: Final = "request"
    GENERIC: Final = "generic"
    NONE: Final = "none"

    ALL: Final = frozenset({"rpc", "request", "generic", "none"})


_message_ids = itertools.count(1)
_unpackb = msgpack.unpackb


def build(
    *,
    sender: str,
    receiver: str,
    op: str,
    content: Any,
    conv_id: str,
    sender_name: str = "",
    reply_to: str | None = None,
    conv_seq: int = 1,
    protocol: str = Protocol.RPC,
    performative: str = Performative.REQUEST,
    status: str = "OK",
    response_code: int = 200,
    user_id: str = ANONYMOUS,
    expiry: float = 0,
    extra: Mapping[str, Any] | None = None,
    traceparent: str | None = None,
    trace_from: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return a complete ION message dict; ``extra`` headers override the defaults.

    ``traceparent``: the message's trace context; None: it continues the trace of
    ``trace_from`` (the request a reply answers), else of the message the running op handles
    (:data:`ion.core.trace.current_message`), with a new parent id, or starts a new trace;
    the ``tracestate`` of that message goes along.
    """
    parent = current_message.get() if trace_from is None else trace_from
    return make(sender, sender_name, receiver, reply_to, op, conv_id, conv_seq, protocol, performative, status,
                response_code, user_id, expiry, traceparent, parent, extra, content)


def make(sender: str, sender_name: str, receiver: str, reply_to: str | None, op: str, conv_id: str,
         conv_seq: int, protocol: str, performative: str, status: str, response_code: int, user_id: str,
         expiry: float, traceparent: str | None, parent: Mapping[str, Any] | None,
         extra: Mapping[str, Any] | None, content: Any) -> dict[str, Any]:
    """:func:`build`, every argument given by position (no keyword binding: the container's own
    senders, one call per message), and ``parent`` the message whose trace it continues (build's
    ``trace_from``, else the message the running op handles), None: a new trace. The same dict."""
    if traceparent is None:
        traceparent = continue_trace(parent)
    msg: dict[str, Any] = {
        "sender": sender,
        "sender-name": sender_name,
        "receiver": receiver,
        "reply-to": reply_to or sender,
        "op": op,
        "conv-id": conv_id,
        "conv-seq": conv_seq,
        "protocol": protocol,
        "performative": performative,
        "status": status,
        "response-code": response_code,
        "encoding": "msgpack",
        "content-type": "",
        "user-id": user_id,
        "expiry": expiry,
        "ts": int(time.time() * 1000),
        "traceparent": traceparent,
    }
    if parent is not None and "tracestate" in parent:
        msg["tracestate"] = parent["tracestate"]
    if extra:
        msg.update(extra)
    msg["content"] = content
    return msg


def _pack_content(msg: dict[str, Any]) -> dict[str, Any]:
    content = msg.get("content")
    serialize = getattr(content, "SerializeToString", None)
    descriptor = getattr(content, "DESCRIPTOR", None)
    if serialize is not None and descriptor is not None:
        msg = dict(msg)
        msg["encoding"] = "protobuf"
        msg["content-type"] = descriptor.full_name
        msg["content"] = serialize()
    return msg


#: One reused packer per thread: ``msgpack.packb`` makes a new ``Packer`` per call
#: (~0.35 µs); a failed ``pack`` resets its buffer.
_packers = threading.local()


def _packer() -> msgpack.Packer:
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer


#: Content types that are never protobuf messages (no ``_pack_content`` needed).
_PLAIN_CONTENT: Final = frozenset({str, bytes, dict, list, tuple, int, float, bool, type(None)})


def _shown(op: Any) -> str:
    """``op`` for an error text: its repr if it is a string, else only its type, since the
    repr of a value that failed to encode may itself fail (an int of over 4300 digits)."""
    return repr(op) if isinstance(op, str) else f"<{type(op).__name__}>"


def encode(msg: Mapping[str, Any], max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> bytes:
    """Encode a message for the wire.

    :raises MessageError: if a value cannot be encoded.
    :raises MessageTooLargeError: if the body exceeds ``max_size`` bytes.
    """
    try:
        if type(msg.get("content")) in _PLAIN_CONTENT and "broker-user" not in msg:
            body_src = msg  # nothing to change: pack the caller's dict as it is, no copy
        else:
            body_src = _pack_content(dict(msg))
            for header in TRANSPORT_HEADERS:
                body_src.pop(header, None)
        try:
            packer = _packers.packer
        except AttributeError:  # (this thread's first message)
            packer = _packer()
        body: bytes = packer.pack(body_src)
    except Exception as exc:
        raise MessageError(f"cannot encode message for op {_shown(msg.get('op'))}: {exc}") from exc
    if max_size and len(body) > max_size:
        raise MessageTooLargeError(
            f"message for op {_shown(msg.get('op'))} to {msg.get('receiver')} is {len(body)} bytes,"
            f" over the limit of {max_size}"
        )
    return body


def _protobuf_class(type_name: str) -> Any:
    from google.protobuf import descriptor_pool, message_factory

    if not type_name:
        raise MalformedMessageError("protobuf-encoded content needs a 'content-type' naming its type")
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(type_name)
        return message_factory.GetMessageClass(descriptor)
    except Exception:
        # KeyError for an unknown name; the C implementations raise others for odd names.
        raise MalformedMessageError(f"unknown protobuf content-type {type_name!r}") from None


def decode(body: bytes, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> dict[str, Any]:
    """Decode and validate a body from the wire.

    :raises MessageTooLargeError: if the body exceeds ``max_size`` bytes.
    :raises MalformedMessageError: if it is not msgpack, not a dict, lacks a
        required header, has a mistyped header, an unknown protocol, performative or
        encoding, or protobuf content that cannot be parsed as its
        ``content-type``. ``broker-user`` is dropped from the body: only the
        receiving transport may set it.
    """
    if max_size and len(body) > max_size:
        raise MessageTooLargeError(f"message of {len(body)} bytes is over the limit of {max_size}")
    try:
        msg = _unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:
        raise MalformedMessageError(f"body is not valid msgpack: {exc}") from exc
    if type(msg) is not dict:  # (unpackb makes plain dicts, never a subclass)
        raise MalformedMessageError(f"body is a {type(msg).__name__}, not a message dict")
    for header in TRANSPORT_HEADERS:
        if header in msg:
            del msg[header]
    if not _fast_valid(msg):
        validate(msg)  # raises, naming what is wrong (or passes what build() would not make)
    if msg.get("encoding") == "protobuf":
        content = msg.get("content")
        if not isinstance(content, bytes):
            raise MalformedMessageError("protobuf-encoded content is not bytes")
        cls = _protobuf_class(msg.get("content-type", ""))
        instance = cls()
        try:
            instance.ParseFromString(content)
        except Exception as exc:
            raise MalformedMessageError(f"content is not a valid {msg['content-type']}: {exc}") from exc
        msg["content"] = instance
    return msg


#: Header -> the types its value may have (bool is never an int here).
_HEADER_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "sender": (str,),
    "sender-name": (str,),
    "receiver": (str,),
    "reply-to": (str,),
    "op": (str,),
    "conv-id": (str,),
    "conv-seq": (int,),
    "protocol": (str,),
    "performative": (str,),
    "status": (str,),
    "response-code": (int,),
    "encoding": (str,),
    "content-type": (str,),
    "user-id": (str,),
    "expiry": (int, float),
    "ts": (int, float),
}

_TYPE_NAMES: Final = {(str,): "a string", (int,): "an int", (int, float): "a number"}


#: The fast path of :func:`validate` (and :func:`decode`): the headers :func:`build` makes, read with
#: one ``itemgetter`` call each: those it makes strings (``traceparent`` too: build always sets one),
#: checked by joining them (one C call; a TypeError if one is not a string, which the full check then
#: names), and the numbers, compared by exact type (``expiry``: an int 0, or a float deadline).
_FAST_STR_HEADERS: Final = tuple(h for h in HEADERS if h not in ("expiry", "tracestate")
                                 and _HEADER_TYPES.get(h, (str,)) == (str,))
_FAST_INT_HEADERS: Final = ("conv-seq", "response-code", "ts")
_fast_strs_of: Final = operator.itemgetter(*_FAST_STR_HEADERS)
_fast_numbers_of: Final = operator.itemgetter(*_FAST_INT_HEADERS, "expiry")
_NUMBER_TYPES: Final = (int, float)
_ENCODINGS: Final = ("msgpack", "protobuf")
_PROTOCOLS: Final = Protocol.ALL
_PERFORMATIVES: Final = Performative.ALL


def _fast_valid(msg: Mapping[str, Any]) -> bool:
    """True if ``msg`` has every header :func:`build` makes, each of the exact type build gives it
    (so :func:`validate` would pass it): the common case, in a few C calls. False: check it whole."""
    try:
        "".join(_fast_strs_of(msg))  # (a KeyError: one is missing; a TypeError: one is not a string)
        seq, code, ts, expiry = _fast_numbers_of(msg)
    except (KeyError, TypeError):
        return False
    return (type(seq) is int and type(code) is int and type(ts) is int
            and (type(expiry) is float or type(expiry) is int)
            and msg["protocol"] in _PROTOCOLS and msg["performative"] in _PERFORMATIVES
            and msg["encoding"] in _ENCODINGS)


def validate(msg: Mapping[str, Any]) -> None:
    """Check that a decoded dict is a message the container can dispatch.

    Required headers must be present; every DESIGN §4 header that is present
    must have its documented type (strings, ints for ``conv-seq`` and
    ``response-code``, numbers for ``expiry`` and ``ts``). ``traceparent`` and
    ``tracestate`` are not checked here: a malformed trace context is never an
    error, the receiving process replaces it (:func:`ion.core.trace.ensure`).

    :raises MalformedMessageError: naming the first missing or mistyped header.
    """
    # Fast path: exactly the header types build() produces; anything else (an optional
    # header missing, a float ts, a bool) gets the full check below.
    if _fast_valid(msg):
        return
    missing = [h for h in REQUIRED_HEADERS if h not in msg]
    if missing:
        raise MalformedMessageError(f"message lacks required header(s): {', '.join(missing)}")
    for h, types in _HEADER_TYPES.items():
        if h not in msg:
            continue
        value = msg[h]
        if isinstance(value, bool) or not isinstance(value, types):
            raise MalformedMessageError(
                f"header {h!r} must be {_TYPE_NAMES[types]}, not {type(value).__name__}"
            )
    if msg["protocol"] not in Protocol.ALL:
        raise MalformedMessageError(f"unknown protocol {msg['protocol']!r}")
    if msg["performative"] not in Performative.ALL:
        raise MalformedMessageError(f"unknown performative {msg['performative']!r}")
    if msg.get("encoding", "msgpack") not in ("msgpack", "protobuf"):
        raise MalformedMessageError(f"unknown encoding {msg.get('encoding')!r}")


def is_expired(msg: Mapping[str, Any], now: float) -> bool:
    """True if the message carries an ``expiry`` (epoch seconds) that has passed."""
    expiry = msg.get("expiry") or 0
    return bool(expiry) and now > float(expiry)
