"""Hostile message bodies: what a foreign AMQP client could publish to a process's queue.

Pure data, no runner: ``test_messages.py`` publishes each case on the embedded broker
(``memory://``); a second runner can publish the same list through any AMQP client.
A runner must:

- start a service answering on the queue :data:`TARGET` (``EchoService`` of
  ``tests/core/support.py``: ``op_echo`` answers its content, ``op_headers`` the
  headers it was given) with ``ion.core.messaging.max_message_size`` =
  :data:`MAX_MESSAGE_SIZE`;
- consume the queue :data:`PROBE` (bound on the system exchange), where replies come;
- publish :func:`body_of` ``(case)`` to the routing key :data:`TARGET` with the case's
  AMQP properties ``reply_to`` / ``correlation_id`` (None: the property is not set);
- check :attr:`Case.expect`: the one reply's ``response-code`` (with ``status``
  ``ERROR``, performative ``failure``, ``conv-id`` = the correlation id, and
  ``content["error"]`` / ``content["message"]`` as given), or :data:`DROPPED`: no reply
  at all; :attr:`Case.log` fragments are all in one line the receiver logs; the op is
  never called unless the reply is a 200; and the process is still ACTIVE and answers.

Add a case: one :class:`Case` entry in :data:`CASES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

#: The queue (service name) every case is published to.
TARGET = "echo"
#: The queue the raw client reads replies from (also the ``sender`` of forged requests).
PROBE = "probe"
#: The correlation id (and ``conv-id``) of every case.
CORRELATION_ID = "probe#1"
#: The receiver's ``max_message_size`` the cases assume.
MAX_MESSAGE_SIZE = 2048
#: :attr:`Case.expect` for a message that gets no reply (only a log line).
DROPPED = "dropped"
#: In :attr:`Case.log` and :attr:`Case.content`: the user the publishing connection
#: authenticated as (``ion`` on the embedded broker), which the runner puts in.
USER = "{user}"


@dataclass(frozen=True)
class Case:
    """One hostile message.

    :ivar body: the raw body (bytes), or any other value msgpack-packed as it is (no codec,
        no checks); a body that is a msgpack bin is given packed.
    :ivar expect: the reply's response code, or :data:`DROPPED`.
    :ivar error: the reply's ``content["error"]`` (an exception class name), if any.
    :ivar message: a fragment of the reply's ``content["message"]``.
    :ivar log: fragments that must all be in exactly one line logged while it is handled
        (the first alone in exactly one line too); :data:`USER` stands for the publisher's user.
    :ivar content: for a 200: keys the reply's content (a dict) must hold with these values
        (:data:`USER`: the publisher's user).
    :ivar xfail: why the code does not give a clear answer yet (the runner fails, strictly).
    """

    id: str
    body: Any
    expect: int | str
    error: str = ""
    message: str = ""
    log: tuple[str, ...] = ()
    reply_to: str | None = PROBE
    correlation_id: str | None = CORRELATION_ID
    content: dict[str, Any] | None = None
    xfail: str = ""


def request(op: str = "echo", content: Any = None, *, drop: tuple[str, ...] = (),
            **headers: Any) -> dict[str, Any]:
    """A request to :data:`TARGET` with every DESIGN §4 header set as a sender would set it;
    ``headers`` (``conv_seq`` for ``conv-seq``) replace some, ``drop`` removes some."""
    msg: dict[str, Any] = {
        "sender": PROBE, "sender-name": PROBE, "receiver": TARGET, "reply-to": PROBE, "op": op,
        "conv-id": CORRELATION_ID, "conv-seq": 1, "protocol": "rpc", "performative": "request",
        "status": "OK", "response-code": 200, "encoding": "msgpack", "content-type": "",
        "user-id": "mallory", "expiry": 0, "ts": 1_700_000_000_000, "content": content,
    }
    msg.update({key.replace("_", "-"): value for key, value in headers.items()})
    for key in drop:
        del msg[key]
    return msg


def params() -> list[Any]:
    """The cases as pytest parameters (id = the case's id; strict xfail where it says so)."""
    import pytest

    return [pytest.param(case, id=case.id,
                         marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [])
            for case in CASES]


def check_answer(case: Case, received: list[dict[str, Any]], log_lines: list[str], user: str | None) -> None:
    """What a runner got for ``case`` (the replies on :data:`PROBE` and the log lines written while it
    was handled) is what the case expects; ``user`` stands for :data:`USER`."""

    def own(value: Any) -> Any:
        return value.replace(USER, str(user)) if isinstance(value, str) else value

    if case.expect == DROPPED:
        assert received == []
        assert case.log, "a dropped message must leave a log line"
    else:
        [reply] = received
        assert reply["response-code"] == case.expect, reply
        assert reply["conv-id"] == case.correlation_id
        if case.expect == 200:
            assert reply["status"] == "OK"
            for key, value in (case.content or {}).items():
                assert reply["content"][key] == own(value), reply["content"]
        else:
            assert (reply["status"], reply["performative"]) == ("ERROR", "failure"), reply
            assert reply["content"]["error"] == case.error, reply["content"]
            assert case.message in reply["content"]["message"], reply["content"]
    if case.log:
        fragments = [own(fragment) for fragment in case.log]
        assert len([line for line in log_lines if fragments[0] in line]) == 1, log_lines
        assert len([line for line in log_lines if all(f in line for f in fragments)]) == 1, log_lines


def body_of(case: Case) -> bytes:
    """The bytes to publish for ``case``."""
    if isinstance(case.body, (bytes, bytearray)):
        return bytes(case.body)
    return msgpack.packb(case.body, use_bin_type=True)


def _nested(depth: int) -> bytes:
    """A msgpack body of ``depth`` one-element arrays around nil."""
    return b"\x91" * depth + b"\xc0"


_NEST600: Any = None
for _ in range(600):
    _NEST600 = [_NEST600]

_BAD = "MalformedMessageError"
_DROP_LOG = ("dropped bad message",)

_REQUIRED = ("sender", "receiver", "op", "conv-id", "protocol", "performative")

#: (header, value of a wrong type)
_WRONG_TYPES = [
    ("sender", 1), ("sender-name", 2), ("receiver", None), ("reply-to", 3), ("op", b"op"),
    ("conv-id", 4), ("conv-seq", "1"), ("conv-seq", 1.5), ("conv-seq", True), ("protocol", ["rpc"]),
    ("performative", {}), ("status", 200), ("response-code", "200"), ("response-code", False),
    ("encoding", 0), ("content-type", 1), ("user-id", None), ("expiry", "soon"), ("expiry", True),
    ("ts", "now"),
]

CASES: list[Case] = [
    # -- not a message at all ------------------------------------------------------------------------
    Case("not-msgpack", b"\xc1 this is not msgpack", 400, _BAD, "not valid msgpack",
         log=("dropped bad message from probe", f"user {USER}")),
    Case("not-msgpack-no-reply-properties", b"\xc1 garbage", DROPPED,
         log=("dropped bad message", f"user {USER}", "message-id"), reply_to=None, correlation_id=None),
    Case("empty-body", b"", 400, _BAD, "not valid msgpack", log=_DROP_LOG),
    Case("trailing-bytes", msgpack.packb(request(), use_bin_type=True) + b"trailing", 400, _BAD,
         "not valid msgpack", log=_DROP_LOG),
    Case("truncated", msgpack.packb(request(), use_bin_type=True)[:60], 400, _BAD, "not valid msgpack",
         log=_DROP_LOG),
    Case("invalid-utf8-string", b"\x81\xa1a\xa2\xff\xfe", 400, _BAD, "not valid msgpack", log=_DROP_LOG),
    Case("nesting-2000-deep", _nested(2000), 400, _BAD, "not valid msgpack", log=_DROP_LOG),
    Case("content-nesting-1800-deep",
         msgpack.packb(request(), use_bin_type=True)[:-1] + _nested(1800), 400, _BAD,
         "not valid msgpack", log=_DROP_LOG),
    *[Case(f"body-is-{kind}", value, 400, _BAD, "not a message dict", log=_DROP_LOG)
      for kind, value in [("array", [1, 2]), ("string", "text"), ("int", 5), ("nil", None),
                          ("bytes", msgpack.packb(b"bytes", use_bin_type=True))]],
    Case("not-msgpack-reply-to-without-correlation-id", b"\xc1", DROPPED, log=_DROP_LOG,
         correlation_id=None),
    Case("not-msgpack-correlation-id-without-reply-to", b"\xc1", DROPPED, log=_DROP_LOG, reply_to=None),
    # -- too big ---------------------------------------------------------------------------------------
    Case("over-max-message-size", request(content="x" * (2 * MAX_MESSAGE_SIZE)), 413,
         "MessageTooLargeError", f"over the limit of {MAX_MESSAGE_SIZE}",
         log=("dropped bad message", f"over the limit of {MAX_MESSAGE_SIZE}")),
    Case("over-max-message-size-no-reply-properties", request(content="x" * (2 * MAX_MESSAGE_SIZE)),
         DROPPED, log=("dropped bad message", f"over the limit of {MAX_MESSAGE_SIZE}"),
         reply_to=None, correlation_id=None),
    Case("garbage-over-max-message-size", b"\xc1" * (MAX_MESSAGE_SIZE + 1), 413, "MessageTooLargeError",
         f"over the limit of {MAX_MESSAGE_SIZE}", log=_DROP_LOG),
    # -- headers missing or mistyped ---------------------------------------------------------------
    Case("only-sender-and-op", {"sender": "evil.sender", "op": "echo", "content": 1}, 400, _BAD,
         "lacks required header", log=("dropped bad message from evil.sender",)),
    Case("only-sender-and-op-no-reply-properties", {"sender": "evil.sender", "op": "echo"}, DROPPED,
         log=("dropped bad message from evil.sender",), reply_to=None, correlation_id=None),
    *[Case(f"missing-{header}", request(drop=(header,)), 400, _BAD, f"lacks required header(s): {header}",
           log=_DROP_LOG) for header in _REQUIRED],
    *[Case(f"{header}-as-{type(value).__name__}", request(**{header: value}), 400, _BAD,
           f"header {header!r} must be", log=_DROP_LOG) for header, value in _WRONG_TYPES],
    Case("unknown-protocol", request(protocol="smoke-signals"), 400, _BAD, "unknown protocol 'smoke-signals'",
         log=_DROP_LOG),
    Case("unknown-encoding", request(encoding="json"), 400, _BAD, "unknown encoding 'json'", log=_DROP_LOG),
    Case("protobuf-unknown-content-type", request(content=b"", encoding="protobuf", content_type="no.such.Type"),
         400, _BAD, "no.such.Type", log=_DROP_LOG),
    Case("protobuf-without-content-type", request(content=b"", encoding="protobuf", drop=("content-type",)),
         400, _BAD, "content-type", log=_DROP_LOG),
    Case("protobuf-content-not-bytes",
         request(content="text", encoding="protobuf", content_type="google.protobuf.Struct"),
         400, _BAD, "not bytes", log=_DROP_LOG),
    Case("protobuf-garbage-content",
         request(content=b"\xff\xff\xff\xff", encoding="protobuf", content_type="google.protobuf.Timestamp"),
         400, _BAD, "google.protobuf.Timestamp", log=_DROP_LOG),
    # -- ops that are not there to be called ---------------------------------------------------------
    *[Case(f"op-{label}", request(op=op), 404, "UnknownOperation", f"has no operation {op!r}",
           log=(f"unknown op {op!r} from probe",))
      for label, op in [("unknown", "nope"), ("private", "_secret"), ("dunder-init", "__init__"),
                        ("dunder-class", "__class__"), ("not-an-identifier", "echo; rm -rf /"),
                        ("path", "../echo"), ("empty", ""), ("nul-byte", "echo\x00"),
                        ("dotted", "slc_init.__globals__")]],
    Case("unknown-op-one-off-send", request(op="nope", protocol="none"), DROPPED,
         log=("unknown op 'nope' from probe",)),
    Case("unknown-performative", request(performative="bogus"), 400, _BAD, "unknown performative 'bogus'",
         log=_DROP_LOG),
    # Deep but within msgpack's limits: a message like any other, answered.
    Case("content-nesting-600-deep", request(content=_NEST600), 200),
    # -- claims the transport must not believe -------------------------------------------------------
    Case("forged-broker-user", request(op="headers", **{"broker-user": "mallory"}), 200,
         content={"broker-user": USER, "user-id": "mallory"}),
    Case("expired", request(expiry=1.0), DROPPED, log=("dropped expired message", "'echo'", "from probe")),
    Case("forged-reply-to-no-conversation",
         request(op="result", sender="stranger.9", conv_id="stranger.9#4", conv_seq=2,
                 performative="inform_result", content=1),
         DROPPED, log=("late inform_result from stranger.9",)),
]
