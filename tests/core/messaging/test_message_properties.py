"""Properties of the message codec (DESIGN §4): only its documented errors, and a faithful round trip.

``decode`` of anything (random bytes, forged msgpack maps with headers of every type,
protobuf content that is garbage or names a random type, valid bodies truncated or
mutated) returns a message that passes ``validate`` or raises MalformedMessageError /
MessageTooLargeError; ``encode`` of anything raises only MessageError; and a message
made by ``build`` comes back from ``decode(encode(m))`` equal, less the transport headers.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    duration_pb2,
    empty_pb2,
    field_mask_pb2,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ion.core.exceptions import MalformedMessageError, MessageError, MessageTooLargeError
from ion.core.messaging import message as wire
from ion.core.messaging.message import HEADERS, REQUIRED_HEADERS, TRANSPORT_HEADERS, Performative, Protocol

MAX_SIZE = 4096
SETTINGS = settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Protobuf types the receiver knows (importing their modules registers them in the default pool).
PROTO_TYPES: list[Any] = [
    struct_pb2.Struct, struct_pb2.Value, struct_pb2.ListValue, timestamp_pb2.Timestamp,
    duration_pb2.Duration, any_pb2.Any, empty_pb2.Empty, field_mask_pb2.FieldMask,
    wrappers_pb2.StringValue, wrappers_pb2.Int64Value, descriptor_pb2.FileDescriptorProto,
]
#: content-type names: known messages, a map entry, an enum, a file, near misses, nonsense.
CONTENT_TYPES = [t.DESCRIPTOR.full_name for t in PROTO_TYPES] + [
    "google.protobuf.Struct.FieldsEntry", "google.protobuf.NullValue", "google/protobuf/struct.proto",
    "google.protobuf", "google.protobuf.", ".google.protobuf.Struct", "Struct", "", " ", "x.Y",
]


def _valid() -> dict[str, Any]:
    """A valid message, as build() makes it."""
    return wire.build(sender="c1.7b", receiver="sys.hello", op="hello", conv_id="c1.7#1",
                      content={"a": [1, 2.5, "three", None, True, b"\x00\xff"]})


def _raw(value: Any) -> bytes:
    """msgpack a value without the codec (to forge bodies)."""
    return msgpack.packb(value, use_bin_type=True)


# -- strategies ------------------------------------------------------------------------------------
#: Every msgpack scalar, at the edges of its ranges: nil, bools (where ints are expected too),
#: 64-bit ints both ways, floats with inf and nan, str, bin, ext and timestamps.
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-2**63, 2**64 - 1), st.sampled_from([-2**63, 2**63 - 1, 2**63, 2**64 - 1, 0, -1]),
    st.floats(), st.text(max_size=12), st.binary(max_size=12),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(-2**34, 2**34), st.integers(0, 999_999_999)),
)
#: Map keys msgpack can carry and Python can hash.
keys = st.one_of(st.text(max_size=8), st.integers(-2**63, 2**64 - 1), st.binary(max_size=4), st.booleans(),
                 st.none(), st.floats(allow_nan=False))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=10)
header_names = st.sampled_from(HEADERS + TRANSPORT_HEADERS + ("content",))


@st.composite
def forged_messages(draw: st.DrawFn) -> dict[Any, Any]:
    """A msgpack map that is a near miss: some headers valid, others of a random type, plus
    random extra keys; sometimes protobuf-encoded with any content-type and any content."""
    msg: dict[Any, Any] = {h: v for h, v in _valid().items() if h in HEADERS}
    for h in draw(st.lists(st.sampled_from(HEADERS), max_size=3, unique=True)):
        if draw(st.booleans()):
            msg.pop(h, None)
        else:
            msg[h] = draw(values)
    msg.update(draw(st.dictionaries(header_names | keys, values, max_size=3)))
    if draw(st.booleans()):
        msg["encoding"] = "protobuf"
        msg["content-type"] = draw(st.sampled_from(CONTENT_TYPES) | st.text(max_size=30))
        msg["content"] = draw(st.one_of(
            st.binary(max_size=40),
            st.sampled_from(PROTO_TYPES).map(lambda t: t().SerializeToString()),
            st.builds(lambda d: struct_pb2.Struct(fields={k: struct_pb2.Value(string_value=v)
                                                          for k, v in d.items()}).SerializeToString(),
                      st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3)),
            values))
    return msg


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """A valid body, truncated, with bytes flipped, inserted or deleted."""
    body = bytearray(wire.encode(draw(built_messages())))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(body)))
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
        if kind == "truncate":
            del body[at:]
        elif kind == "flip" and at < len(body):
            body[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            del body[at:at + draw(st.integers(1, 4))]
    return bytes(body)


def _with_raw_content(headers: dict[str, Any], content: bytes) -> bytes:
    """A msgpack map of ``headers`` plus a 'content' whose encoding is given as raw bytes."""
    return (b"\xde" + struct.pack(">H", len(headers) + 1)
            + b"".join(_raw(k) + _raw(v) for k, v in headers.items()) + _raw("content") + content)


#: Content nested far deeper than msgpack's packer allows, forged byte by byte: arrays of
#: one element, maps of one entry, or both in turn.
deep_content = st.builds(lambda depth, opener: opener * depth + b"\xc0",
                         st.integers(1, 5000), st.sampled_from([b"\x91", b"\x81\xa1k", b"\x91\x81\xa1k"]))

#: Plain content that survives msgpack unchanged: no tuples (they come back as lists), no nan.
plain = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False),
              st.text(max_size=12), st.binary(max_size=12)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8) | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=4),
                        inner, max_size=4)),
    max_leaves=12)
int64 = st.integers(-2**63, 2**63 - 1)
extra_headers = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k not in HEADERS) | st.sampled_from(TRANSPORT_HEADERS),
    plain, max_size=3)


@st.composite
def built_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A message made by build() from generated header values and plain content."""
    return wire.build(
        sender=draw(st.text(max_size=10)), receiver=draw(st.text(max_size=10)), op=draw(st.text(max_size=10)),
        conv_id=draw(st.text(max_size=10)), content=draw(plain), sender_name=draw(st.text(max_size=10)),
        reply_to=draw(st.none() | st.text(max_size=10)), conv_seq=draw(int64),
        protocol=draw(st.sampled_from(sorted(Protocol.ALL))), performative=draw(st.sampled_from(sorted(Performative.ALL))),
        status=draw(st.sampled_from(["OK", "ERROR"]) | st.text(max_size=5)), response_code=draw(int64),
        user_id=draw(st.text(max_size=10)),
        expiry=draw(st.integers(0, 2**63 - 1) | st.floats(allow_nan=False)),
        extra=draw(extra_headers),
    )


def _nest(depth: int) -> Any:
    value: Any = None
    for _ in range(depth):
        value = [value]
    return value


def _self_containing() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


#: Values the wire cannot carry: out-of-range and huge ints, objects, sets, complex numbers,
#: protobuf classes (not instances), a list that contains itself, a nesting too deep to pack.
unencodable = st.one_of(
    st.sampled_from([2**64, -2**63 - 1, 10**5000, -(10**5000), object(), {1, 2}, 1j, struct_pb2.Struct,
                     frozenset(), Ellipsis]),
    st.integers(4301, 6000).map(lambda n: 10**n),
    st.builds(_self_containing),
    st.integers(600, 2000).map(_nest),
)


# -- decode: only the documented errors ---------------------------------------------------------
def _check_decode(body: bytes) -> str:
    """Decode ``body``: it must be a valid message or a documented error; return what it was."""
    try:
        msg = wire.decode(body, max_size=MAX_SIZE)
    except MessageTooLargeError:
        assert len(body) > MAX_SIZE
        return "too large"
    except MalformedMessageError:
        assert len(body) <= MAX_SIZE
        return "malformed"
    assert len(body) <= MAX_SIZE
    assert isinstance(msg, dict)
    wire.validate(msg)
    assert not set(TRANSPORT_HEADERS) & set(msg), "a transport header was taken from the body"
    return "decoded"


@SETTINGS
@given(st.binary(max_size=MAX_SIZE + 100) | st.binary(max_size=40).map(lambda b: _raw(_valid())[:20] + b))
def test_decode_of_any_bytes_raises_only_message_errors(body: bytes) -> None:
    """Arbitrary bytes (and a valid start with random bytes after it) decode or raise the codec's errors."""
    event(_check_decode(body))


@SETTINGS
@given(forged_messages())
def test_decode_of_forged_maps_raises_only_message_errors(msg: dict[Any, Any]) -> None:
    """Maps with headers of random types (bools, nil, huge ints, bytes, ext), random extra keys and
    protobuf content of any type name raise nothing but the codec's errors."""
    event(_check_decode(_raw(msg)))


@SETTINGS
@given(mutated_bodies())
def test_decode_of_mutated_valid_bodies_raises_only_message_errors(body: bytes) -> None:
    """A valid body truncated, flipped, or with bytes inserted or deleted decodes or is refused."""
    event(_check_decode(body))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deep_content)
def test_decode_of_deeply_nested_content_raises_only_message_errors(content: bytes) -> None:
    """Content nested thousands deep is a message or a MalformedMessageError, never a RecursionError."""
    headers = {h: v for h, v in _valid().items() if h != "content"}
    event(_check_decode(_with_raw_content(headers, content)))


@SETTINGS
@given(st.one_of(values, forged_messages()), st.integers(0, 64))
def test_too_large_is_exactly_over_the_limit(value: Any, max_size: int) -> None:
    """A body over a non-zero ``max_size`` is always MessageTooLargeError, one within it never is."""
    body = _raw(value)
    try:
        wire.decode(body, max_size=max_size)
    except MessageTooLargeError:
        assert max_size and len(body) > max_size
    except MalformedMessageError:
        assert not max_size or len(body) <= max_size


# -- encode: only MessageError --------------------------------------------------------------------
@st.composite
def arbitrary_messages(draw: st.DrawFn) -> dict[Any, Any]:
    """A message whose content, and sometimes a header, is anything at all."""
    msg: dict[Any, Any] = dict(draw(built_messages()))
    msg["content"] = draw(values | unencodable | st.sampled_from(PROTO_TYPES).map(lambda t: t()))
    if draw(st.booleans()):
        # op and receiver are in the error texts: the likeliest to break them.
        msg[draw(st.sampled_from(["op", "receiver"]) | header_names)] = draw(values | unencodable)
    return msg


@settings(SETTINGS, max_examples=60)
@given(arbitrary_messages(), st.sampled_from([0, 64, MAX_SIZE]))
def test_encode_of_anything_raises_only_message_errors(msg: dict[Any, Any], max_size: int) -> None:
    """encode() returns a body within the limit that msgpack reads back, or raises a MessageError."""
    try:
        body = wire.encode(msg, max_size=max_size)
    except MessageTooLargeError:
        event("too large")
        return
    except MessageError:
        event("unencodable")
        return
    event("encoded")
    assert isinstance(body, bytes)
    assert not max_size or len(body) <= max_size
    assert isinstance(msgpack.unpackb(body, raw=False, strict_map_key=False), dict)


def test_huge_int_op_is_a_message_error() -> None:
    """Regression: an op too long to print as an int (over 4300 digits) used to escape encode()
    as ValueError while the error text was made; it is a MessageError."""
    msg = dict(_valid(), op=10**5000)
    try:
        wire.encode(msg)
    except MessageError as exc:
        assert "cannot encode" in str(exc)
    else:
        raise AssertionError("encode() accepted an int op of 5000 digits")


# -- round trip ----------------------------------------------------------------------------------
def _without_transport_headers(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k not in TRANSPORT_HEADERS}


@SETTINGS
@given(built_messages())
def test_built_messages_round_trip(msg: dict[str, Any]) -> None:
    """decode(encode(m)) is m less its transport headers, for any message build() makes."""
    snapshot = dict(msg)
    out = wire.decode(wire.encode(msg, max_size=0), max_size=0)
    assert out == _without_transport_headers(msg)
    assert msg == snapshot, "encode() changed the caller's message"
    for h in REQUIRED_HEADERS:
        assert type(out[h]) is type(msg[h])


struct_json = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@settings(SETTINGS, max_examples=40)
@given(built_messages(), st.dictionaries(st.text(max_size=6), struct_json, max_size=4))
def test_protobuf_content_round_trips(msg: dict[str, Any], fields: dict[str, Any]) -> None:
    """Protobuf content comes back as an equal instance of its type, with encoding and content-type set."""
    content = struct_pb2.Struct()
    content.update(fields)
    msg["content"] = content
    out = wire.decode(wire.encode(msg, max_size=0), max_size=0)
    assert isinstance(out["content"], struct_pb2.Struct)
    assert out["content"] == content
    assert (out["encoding"], out["content-type"]) == ("protobuf", "google.protobuf.Struct")
    expected = _without_transport_headers(msg)
    expected.update({"encoding": "protobuf", "content-type": "google.protobuf.Struct"})
    assert out == expected
