"""The ION message and its wire codec (DESIGN §4)."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ion.core.exceptions import MalformedMessageError, MessageError, MessageTooLargeError
from ion.core.messaging import message as wire
from ion.core.messaging.message import HEADERS, REQUIRED_HEADERS, Performative, Protocol

#: DESIGN §4's header table, spelled out here so a renamed header fails a test.
DESIGN_HEADERS = (
    "sender", "sender-name", "receiver", "reply-to", "op", "conv-id", "conv-seq",
    "protocol", "performative", "status", "response-code", "encoding",
    "content-type", "user-id", "expiry", "ts", "traceparent", "tracestate",
)


def full_message(**overrides: Any) -> dict[str, Any]:
    """A message with every DESIGN §4 header set to a non-default value."""
    msg: dict[str, Any] = {
        "sender": "c1.7b",
        "sender-name": "caller",
        "receiver": "sys.hello",
        "reply-to": "c1.7",
        "op": "hello",
        "conv-id": "c1.7#42",
        "conv-seq": 3,
        "protocol": "request",
        "performative": "agree",
        "status": "ERROR",
        "response-code": 409,
        "encoding": "msgpack",
        "content-type": "",
        "user-id": "alice",
        "expiry": 1234567890.5,
        "ts": 1700000000123,
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
        "content": {"a": [1, 2.5, "three", None, True, b"\x00\xff"], "nested": {"k": "v"}},
    }
    msg.update(overrides)
    return msg


def raw(msg: Any) -> bytes:
    """msgpack a value without the codec (to forge bodies)."""
    return msgpack.packb(msg, use_bin_type=True)


def malformed(body: bytes) -> str:
    """Decode ``body``, expecting MalformedMessageError; return its text."""
    with pytest.raises(MalformedMessageError) as info:
        wire.decode(body)
    return str(info.value)


# -- headers and build -----------------------------------------------------------------
def test_header_list_is_the_design_table() -> None:
    """HEADERS lists exactly the header fields of DESIGN §4, in its order."""
    assert tuple(HEADERS) == DESIGN_HEADERS


def test_every_header_survives_roundtrip() -> None:
    """Each DESIGN §4 header, and the content, come back from decode(encode()) unchanged."""
    msg = full_message()
    out = wire.decode(wire.encode(msg))
    for header in DESIGN_HEADERS:
        assert out[header] == msg[header], header
        assert type(out[header]) is type(msg[header]), header
    assert out["content"] == msg["content"]


def test_extra_headers_survive_roundtrip() -> None:
    """Headers beyond DESIGN §4 are carried unchanged."""
    msg = full_message(**{"x-trace": "abc", "x-n": 5})
    out = wire.decode(wire.encode(msg))
    assert (out["x-trace"], out["x-n"]) == ("abc", 5)


def test_build_sets_every_header() -> None:
    """build() sets every DESIGN §4 header with the documented defaults."""
    before = int(time.time() * 1000)
    msg = wire.build(sender="s", receiver="r", op="op", content={"x": 1}, conv_id="s#1")
    after = int(time.time() * 1000)
    assert set(DESIGN_HEADERS) - {"tracestate"} <= set(msg)  # (tracestate only when set)
    assert msg["reply-to"] == "s"
    assert (msg["conv-seq"], msg["protocol"], msg["performative"]) == (1, Protocol.RPC, Performative.REQUEST)
    assert (msg["status"], msg["response-code"], msg["encoding"]) == ("OK", 200, "msgpack")
    assert (msg["user-id"], msg["expiry"]) == ("ANONYMOUS", 0)
    assert before <= msg["ts"] <= after
    assert msg["content"] == {"x": 1}
    assert wire.decode(wire.encode(msg)) == msg


def test_build_extra_overrides_defaults() -> None:
    """build(extra=...) overrides default headers but never the content argument."""
    msg = wire.build(sender="s", receiver="r", op="op", content=1, conv_id="c",
                     reply_to="elsewhere", extra={"user-id": "bob", "content": "ignored"})
    assert (msg["reply-to"], msg["user-id"], msg["content"]) == ("elsewhere", "bob", 1)


@pytest.mark.parametrize("parent", [
    None,
    {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
    {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "tracestate": "k=v"},
])
@pytest.mark.parametrize("extra", [None, {}, {"user-id": "bob", "x-custom": 1, "content": "ignored"}])
@pytest.mark.parametrize("traceparent", [None, "00-" + "c" * 32 + "-" + "d" * 16 + "-00"])
def test_make_is_build_by_position(monkeypatch: pytest.MonkeyPatch, parent: Any, extra: Any,
                                   traceparent: Any) -> None:
    """make() (the container's positional build) gives the very dict build() gives, key order too."""
    monkeypatch.setattr(wire.time, "time", lambda: 1234.5678)
    monkeypatch.setattr(wire, "continue_trace", lambda p: "new" if p is None else "from " + p["traceparent"])
    built = wire.build(sender="s", sender_name="n", receiver="r", reply_to=None, op="op", conv_id="c",
                       conv_seq=2, protocol="request", performative="agree", status="ERROR", response_code=409,
                       user_id="u", expiry=9.5, extra=extra, traceparent=traceparent, trace_from=parent,
                       content={"a": 1})
    made = wire.make("s", "n", "r", None, "op", "c", 2, "request", "agree", "ERROR", 409, "u", 9.5, traceparent,
                     parent, extra, {"a": 1})
    assert list(made.items()) == list(built.items())


def test_encode_does_not_change_the_message() -> None:
    """encode() leaves the caller's dict as it was."""
    msg = full_message(content=struct_pb2.Struct(), **{"broker-user": "x"})
    snapshot = dict(msg)
    wire.encode(msg)
    assert msg == snapshot


# -- protobuf content ---------------------------------------------------------------------
def test_protobuf_struct_roundtrip() -> None:
    """A protobuf Struct as content is sent as 'protobuf' with its full name and comes back equal."""
    content = struct_pb2.Struct()
    content.update({"name": "libfoo", "n": 3, "tags": ["a", "b"]})
    body = wire.encode(full_message(content=content))
    on_wire = msgpack.unpackb(body, raw=False)
    assert on_wire["encoding"] == "protobuf"
    assert on_wire["content-type"] == "google.protobuf.Struct"
    assert on_wire["content"] == content.SerializeToString()
    out = wire.decode(body)
    assert isinstance(out["content"], struct_pb2.Struct)
    assert out["content"] == content
    assert (out["encoding"], out["content-type"]) == ("protobuf", "google.protobuf.Struct")


def test_protobuf_timestamp_roundtrip() -> None:
    """A protobuf Timestamp round-trips as an instance of its type."""
    content = timestamp_pb2.Timestamp(seconds=1700000000, nanos=5)
    out = wire.decode(wire.encode(full_message(content=content)))
    assert isinstance(out["content"], timestamp_pb2.Timestamp)
    assert (out["content"].seconds, out["content"].nanos) == (1700000000, 5)
    assert out["content-type"] == "google.protobuf.Timestamp"


def test_decoded_protobuf_message_reencodes() -> None:
    """A decoded protobuf message can be encoded again (forwarded) unchanged."""
    content = timestamp_pb2.Timestamp(seconds=7)
    once = wire.decode(wire.encode(full_message(content=content)))
    twice = wire.decode(wire.encode(once))
    assert twice["content"] == content


# -- required and optional headers (malformed bodies, missing and mistyped headers, bad protobuf
# content: tests/hostile/messages.py, run through a process) ---------------------------------------
def test_required_headers() -> None:
    """The required headers are those without which a message cannot be dispatched or answered."""
    assert set(REQUIRED_HEADERS) == {"sender", "receiver", "op", "conv-id", "protocol", "performative"}


def test_optional_headers_may_be_absent() -> None:
    """A message with only the required headers is accepted."""
    msg = {h: full_message()[h] for h in REQUIRED_HEADERS}
    assert wire.decode(raw(msg)) == msg


def test_int_headers_accept_ints_and_numbers_accept_floats() -> None:
    """conv-seq/response-code take ints; expiry and ts take ints or floats."""
    for extra in ({"expiry": 0}, {"expiry": 1.5}, {"ts": 1.5}, {"ts": 10}, {"conv-seq": 0},
                  {"response-code": 500}):
        wire.decode(raw(full_message(**extra)))


def test_unknown_protocol_is_malformed() -> None:
    """A protocol other than rpc/request/generic/none is refused, naming it."""
    for protocol in sorted(Protocol.ALL):
        wire.decode(raw(full_message(protocol=protocol)))
    assert "unknown protocol 'smoke-signals'" in malformed(raw(full_message(protocol="smoke-signals")))


def test_broker_user_is_never_taken_from_a_body() -> None:
    """A 'broker-user' in a body is dropped on decode, and never written by encode."""
    forged = raw(full_message(**{"broker-user": "root"}))
    assert "broker-user" not in wire.decode(forged)
    body = wire.encode(full_message(**{"broker-user": "root"}))
    assert "broker-user" not in msgpack.unpackb(body, raw=False)


def test_unencodable_content_is_a_message_error() -> None:
    """Content msgpack cannot carry raises MessageError naming the op."""
    for content in (object(), 2**70, {1, 2}):
        with pytest.raises(MessageError) as info:
            wire.encode(full_message(content=content))
        assert "hello" in str(info.value)


def test_protobuf_class_as_content_is_a_message_error() -> None:
    """A protobuf class (not an instance) as content raises MessageError, not a TypeError."""
    with pytest.raises(MessageError):
        wire.encode(full_message(content=struct_pb2.Struct))


# -- size limits -----------------------------------------------------------------------------
def test_oversized_message_refused_on_encode() -> None:
    """encode() refuses a body over max_size, naming size, limit and op."""
    msg = full_message(content=b"x" * 2000)
    with pytest.raises(MessageTooLargeError) as info:
        wire.encode(msg, max_size=1000)
    text = str(info.value)
    assert "1000" in text and "'hello'" in text
    assert len(wire.encode(msg, max_size=0)) > 2000  # 0 = no limit


def test_oversized_message_refused_on_decode() -> None:
    """decode() refuses a body over max_size before parsing it."""
    body = wire.encode(full_message(content=b"x" * 2000))
    with pytest.raises(MessageTooLargeError) as info:
        wire.decode(body, max_size=1000)
    assert str(len(body)) in str(info.value)
    with pytest.raises(MessageTooLargeError):
        wire.decode(b"\xc1" * 1001, max_size=1000)  # the size is checked first
    assert wire.decode(body, max_size=len(body))["content"] == b"x" * 2000


def test_default_limit_applies() -> None:
    """Without max_size the default limit (16 MiB) applies on both sides."""
    with pytest.raises(MessageTooLargeError):
        wire.decode(b"\x00" * (wire.DEFAULT_MAX_MESSAGE_SIZE + 1))
    with pytest.raises(MessageTooLargeError):
        wire.encode(full_message(content=b"\x00" * wire.DEFAULT_MAX_MESSAGE_SIZE))


# -- expiry -------------------------------------------------------------------------------------
@pytest.mark.parametrize("expiry,now,expected", [
    (0, 1e12, False),            # 0 = never
    (None, 1e12, False),
    (100, 99.9, False),
    (100, 100, False),           # expires strictly after
    (100, 100.1, True),
    (100.5, 101, True),
])
def test_is_expired(expiry: Any, now: float, expected: bool) -> None:
    """is_expired is true only when a non-zero expiry is in the past."""
    msg = full_message(expiry=expiry)
    assert wire.is_expired(msg, now) is expected


def test_is_expired_without_header() -> None:
    """A message without expiry never expires."""
    msg = full_message()
    del msg["expiry"]
    assert wire.is_expired(msg, time.time()) is False


# -- property: decode only ever raises its own errors ---------------------------------------------
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                     st.text(max_size=20), st.binary(max_size=20))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=6)


def _check_decode(body: bytes) -> None:
    try:
        msg = wire.decode(body, max_size=4096)
    except (MalformedMessageError, MessageTooLargeError):
        return
    assert isinstance(msg, dict)
    wire.validate(msg)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=5000))
def test_decode_arbitrary_bytes_raises_only_message_errors(body: bytes) -> None:
    """decode() of arbitrary bytes returns a valid message or raises MalformedMessageError/MessageTooLargeError."""
    _check_decode(body)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(DESIGN_HEADERS + ("content", "broker-user")), _values),
       st.sampled_from([None, "protobuf", "msgpack"]),
       st.sampled_from([None, "google.protobuf.Struct", "google.protobuf.Timestamp", "", "x.Y"]))
def test_decode_forged_messages_raises_only_message_errors(
        headers: dict[str, Any], encoding: str | None, content_type: str | None) -> None:
    """decode() of forged msgpack maps (near-miss messages) raises nothing but the codec's errors."""
    msg = dict(headers)
    if encoding is not None:
        msg["encoding"] = encoding
    if content_type is not None:
        msg["content-type"] = content_type
    _check_decode(raw(msg))
    # The same with the required headers valid, so later checks are reached too.
    msg.update({h: full_message()[h] for h in REQUIRED_HEADERS})
    _check_decode(raw(msg))
