"""Message, the JSON codec and the incremental frame decoder."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import os
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eventforge as ef

UTC = dt.timezone.utc

# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

text_st = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text_st
)
json_value = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(text_st, children, max_size=4),
    max_leaves=25,
)


def _is_topic(text: str) -> bool:
    try:
        ef.validate_topic(text, allow_reserved=True)
    except ef.TopicError:
        return False
    return True


segment_st = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters=".*"
    ),
    min_size=1,
    max_size=8,
)
wire_topic_st = st.lists(segment_st, min_size=1, max_size=5).map(".".join).filter(_is_topic)
optional_text = st.none() | text_st
timestamp_st = (
    st.none()
    | st.floats(min_value=-6.2e10, max_value=2.5e11)
    | st.integers(min_value=0, max_value=2**34)
    | st.datetimes(
        min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30), timezones=st.just(UTC)
    )
)


@st.composite
def messages(draw):
    return ef.Message(
        draw(wire_topic_st),
        draw(json_value),
        id=draw(optional_text),
        headers=draw(st.none() | st.dictionaries(text_st, json_value, max_size=4)),
        timestamp=draw(timestamp_st),
        reply_to=draw(optional_text),
        correlation_id=draw(optional_text),
    )


def wire(message: ef.Message) -> dict:
    return message.model_dump(mode="json")


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@given(messages())
@settings(max_examples=300, deadline=None)
def test_any_json_message_round_trips(message):
    frame = ef.encode(message)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    decoder = ef.FrameDecoder()
    bodies = decoder.feed(frame)
    assert len(bodies) == 1 and decoder.buffered == 0
    decoded = ef.decode(bodies[0])
    assert wire(decoded) == wire(message)
    assert decoded == message
    assert ef.encode(decoded) == frame  # stable bytes
    # The body is compact, UTF-8 (not ASCII-escaped) JSON.
    expected_text = json.dumps(wire(message), separators=(",", ":"), ensure_ascii=False)
    assert bodies[0] == expected_text.encode("utf-8")
    assert message.model_dump_json() == expected_text


@given(st.lists(messages(), min_size=1, max_size=8), st.data())
@settings(max_examples=200, deadline=None)
def test_stream_split_at_random_offsets(batch, data):
    stream = b"".join(ef.encode(m) for m in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    bounds = [0, *cuts, len(stream)]
    decoder = ef.FrameDecoder()
    bodies = []
    for start, end in zip(bounds, bounds[1:]):
        bodies += decoder.feed(stream[start:end])
    assert decoder.buffered == 0
    assert [wire(ef.decode(b)) for b in bodies] == [wire(m) for m in batch]


def test_stream_fed_one_byte_at_a_time():
    batch = [
        ef.Message(f"t.{i}", {"i": i, "text": "é\U0001f600" * i}, headers={"n": i})
        for i in range(40)
    ]
    stream = b"".join(ef.encode(m) for m in batch)
    largest = max(len(ef.encode(m)) for m in batch)
    decoder = ef.FrameDecoder()
    bodies = []
    for i in range(len(stream)):
        bodies += decoder.feed(stream[i : i + 1])
        assert decoder.buffered < largest
    assert decoder.buffered == 0
    assert [ef.decode(b) for b in bodies] == batch


def test_non_ascii_is_sent_as_utf8_not_escaped():
    frame = ef.encode(ef.Message("café.\U0001f389", "e\u0301 \U0001f600"))
    assert "café.\U0001f389".encode() in frame
    assert "e\u0301 \U0001f600".encode() in frame
    assert b"\\u" not in frame


# ---------------------------------------------------------------------------
# Frame size limits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [2**31 - 1, 2**32 - 1, ef.DEFAULT_MAX_FRAME_SIZE + 1])
def test_oversize_length_raises_at_the_header(length):
    decoder = ef.FrameDecoder()
    with pytest.raises(ef.FrameTooLargeError, match=str(length)) as caught:
        decoder.feed(length.to_bytes(4, "big"))  # no body byte sent at all
    assert isinstance(caught.value, ef.FrameError) and isinstance(caught.value, ValueError)
    assert decoder.buffered == 0


def test_oversize_header_split_over_chunks_raises_on_its_last_byte():
    decoder = ef.FrameDecoder()
    header = (2**32 - 1).to_bytes(4, "big")
    for i in range(3):
        assert decoder.feed(header[i : i + 1]) == []
    assert decoder.buffered == 3
    with pytest.raises(ef.FrameTooLargeError):
        decoder.feed(header[3:] + b"some body bytes")
    assert decoder.buffered == 0


def test_frame_size_boundary():
    limit = 64
    decoder = ef.FrameDecoder(max_frame_size=limit)
    body = b'{"topic":"a","payload":"' + b"x" * (limit - 26) + b'"}'
    assert len(body) == limit
    assert decoder.feed(len(body).to_bytes(4, "big") + body) == [body]
    over = body[:-2] + b'x"}'
    with pytest.raises(ef.FrameTooLargeError, match=f"{limit + 1} exceeds max_frame_size {limit}"):
        decoder.feed(len(over).to_bytes(4, "big"))
    assert decoder.buffered == 0


def test_encode_respects_max_frame_size():
    message = ef.Message("a", "x" * 100, id="i", timestamp=0)
    size = len(ef.encode(message)) - 4
    assert ef.encode(message, max_frame_size=size)
    with pytest.raises(ef.FrameTooLargeError, match=f"{size} bytes"):
        ef.encode(message, max_frame_size=size - 1)


def test_frames_before_an_oversize_header_are_kept_on_the_error():
    # Regression: complete frames earlier in the same chunk used to be lost.
    decoder = ef.FrameDecoder(max_frame_size=1000)
    first, second = ef.encode(ef.Message("a", 1)), ef.encode(ef.Message("b", 2))
    with pytest.raises(ef.FrameTooLargeError) as caught:
        decoder.feed(first + second + b"\xff\xff\xff\xff" + b"x" * 10)
    assert caught.value.frames == [first[4:], second[4:]]
    assert decoder.buffered == 0


def test_empty_frame_body_is_a_frame_error():
    assert ef.FrameDecoder().feed(b"\x00\x00\x00\x00") == [b""]
    with pytest.raises(ef.FrameError, match="not valid JSON"):
        ef.decode(b"")


# ---------------------------------------------------------------------------
# Encoding: conversions and refusals
# ---------------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Point:
    x: int
    y: int
    tags: tuple = ()


class PydanticLike:
    def model_dump(self, mode="python"):
        return {"kind": "pydantic", "mode": mode}


class OldStyleModel:
    def model_dump(self):
        return {"kind": "old"}


CONVERSIONS = [
    ((1, "a", (2, 3)), [1, "a", [2, 3]]),
    ({7}, [7]),
    (frozenset({8}), [8]),
    (dt.datetime(2024, 5, 1, 12, 30, 15, 250, tzinfo=UTC), "2024-05-01T12:30:15.000250+00:00"),
    (dt.datetime(2024, 5, 1, 12, 30), "2024-05-01T12:30:00"),
    (dt.date(2024, 5, 1), "2024-05-01"),
    (dt.time(12, 30), "12:30:00"),
    (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
    (decimal.Decimal("1.10"), "1.10"),
    (Color.RED, "red"),
    (Level.HIGH, 3),
    (Point(1, 2, ("t",)), {"x": 1, "y": 2, "tags": ["t"]}),
    (PydanticLike(), {"kind": "pydantic", "mode": "json"}),
    (OldStyleModel(), {"kind": "old"}),
    (
        {"nested": [Color.RED, {"when": dt.date(2000, 1, 2)}]},
        {"nested": ["red", {"when": "2000-01-02"}]},
    ),
]


@pytest.mark.parametrize("value, expected", CONVERSIONS)
def test_well_known_types_are_converted(value, expected):
    frame = ef.encode(ef.Message("a", value, headers={"h": value}))
    decoded = ef.decode(frame[4:])
    assert decoded.payload == expected
    assert decoded.headers == {"h": expected}


def _deep_list(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def _circular_list():
    value = []
    value.append(value)
    return value


def _circular_dict():
    value = {}
    value["self"] = value
    return value


REFUSALS = [
    (float("nan"), "JSON"),
    (float("inf"), "JSON"),
    (float("-inf"), "JSON"),
    ([1, {"x": float("nan")}], "JSON"),
    (decimal.Decimal("NaN"), "not finite"),
    (decimal.Decimal("-Infinity"), "not finite"),
    (b"bytes", "bytes"),
    (bytearray(b"x"), "bytearray"),
    (object(), "object"),
    (1 + 2j, "complex"),
    (len, "builtin_function_or_method"),
    ({(1, 2): "tuple key"}, "not JSON serializable"),
    (_deep_list(100_000), "nested too deeply"),
    (_circular_list(), "Circular"),
    (_circular_dict(), "Circular"),
]


@pytest.mark.parametrize("value, reason", REFUSALS)
def test_unserializable_payloads_are_refused_at_encode(value, reason):
    with pytest.raises(ef.SerializationError, match=reason) as caught:
        ef.encode(ef.Message("a", value))
    assert isinstance(caught.value, TypeError)
    assert isinstance(caught.value, ef.EventforgeError)


def test_unserializable_headers_are_refused_too():
    with pytest.raises(ef.SerializationError):
        ef.encode(ef.Message("a", headers={"h": object()}))
    with pytest.raises(ef.SerializationError):
        ef.Message("a", float("nan")).model_dump_json()


@pytest.mark.parametrize(
    "message",
    [ef.Message("a", "lone \ud800 surrogate"), ef.Message("a", {"k\udfff": 1}),
     ef.Message("a", headers={"h": "\ud83d"})],
)
def test_lone_surrogate_is_a_serialization_error(message):
    # Regression: this used to escape as UnicodeEncodeError (a ValueError).
    with pytest.raises(ef.SerializationError, match="UTF-8"):
        ef.encode(message)


# ---------------------------------------------------------------------------
# Decoding: rejections and defaults
# ---------------------------------------------------------------------------

REJECTIONS = [
    (b"\xff", "not valid UTF-8"),
    (b'{"topic":"a","payload":"\xc3"}', "not valid UTF-8"),
    (b'{"topic":"a","payload":"\xed\xa0\x80"}', "not valid UTF-8"),  # encoded surrogate
    (b'{"topic":"a"', "not valid JSON"),
    (b'{"topic":"a"} trailing', "not valid JSON"),
    (b"{'topic':'a'}", "not valid JSON"),
    (b'{"topic":"a","payload":NaN}', "NaN"),
    (b'{"topic":"a","payload":[Infinity]}', "Infinity"),
    (b'{"topic":"a","payload":-Infinity}', "Infinity"),
    (b"[]", "must be a JSON object, not list"),
    (b'"a"', "must be a JSON object, not str"),
    (b"1", "must be a JSON object, not int"),
    (b"null", "must be a JSON object, not NoneType"),
    (b"{}", "no 'topic'"),
    (b'{"topic":null,"payload":1}', "no 'topic'"),
    (b'{"topic":""}', "invalid topic"),
    (b'{"topic":"a..b"}', "invalid topic"),
    (b'{"topic":"a b"}', "invalid topic"),
    (b'{"topic":"a.*"}', "wildcard"),
    (b'{"topic":"a.**"}', "wildcard"),
    (b'{"topic":1}', "invalid topic"),
    (b'{"topic":["a"]}', "invalid topic"),
    (b'{"topic":{"a":1}}', "invalid topic"),
    (b'{"topic":"a","headers":[]}', "'headers' must be an object"),
    (b'{"topic":"a","headers":"h"}', "'headers' must be an object"),
    (b'{"topic":"a","id":1}', "'id' must be a string"),
    (b'{"topic":"a","id":["x"]}', "'id' must be a string"),
    (b'{"topic":"a","reply_to":1}', "'reply_to' must be a string"),
    (b'{"topic":"a","correlation_id":true}', "'correlation_id' must be a string"),
    (b'{"topic":"a","timestamp":"yesterday"}', "timestamp"),
    (b'{"topic":"a","timestamp":""}', "timestamp"),
    (b'{"topic":"a","timestamp":"2024-05-01"}', "timestamp"),
    (b'{"topic":"a","timestamp":true}', "timestamp"),
    (b'{"topic":"a","timestamp":[1]}', "timestamp"),
    (b'{"topic":"a","timestamp":{}}', "timestamp"),
]


@pytest.mark.parametrize("body, reason", REJECTIONS)
def test_bad_frames_are_rejected_with_a_clear_frame_error(body, reason):
    with pytest.raises(ef.FrameError, match=reason) as caught:
        ef.decode(body)
    assert isinstance(caught.value, ValueError)
    assert type(caught.value) is ef.FrameError  # never FrameTooLargeError here


@pytest.mark.parametrize("depth", [100_000])
def test_deeply_nested_json_is_a_frame_error_not_a_crash(depth):
    for body in (
        b"[" * depth + b"]" * depth,
        b'{"topic":"a","payload":' + b"[" * depth + b"]" * depth + b"}",
        b'{"topic":"a","payload":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}",
        b"[" * depth,
    ):
        with pytest.raises(ef.FrameError, match="nested too deeply|not valid JSON"):
            ef.decode(body)


def test_unknown_keys_are_ignored():
    message = ef.decode(b'{"topic":"a","payload":2,"extra":{"x":1},"priority":9}')
    assert message.topic == "a" and message.payload == 2
    assert "extra" not in wire(message) and "priority" not in wire(message)


def test_missing_fields_get_defaults_and_generated_id_and_timestamp():
    before = time.time()
    first = ef.decode(b'{"topic":"a"}')
    second = ef.decode(b'{"topic":"a","id":null,"timestamp":null}')
    after = time.time()
    assert first.payload is None and first.headers == {}
    assert first.reply_to is None and first.correlation_id is None
    assert first.id != second.id
    for message in (first, second):
        assert uuid.UUID(message.id).version == 4
        stamp = message.timestamp
        assert stamp.tzinfo is not None and stamp.utcoffset() == dt.timedelta(0)
        assert before - 0.001 <= stamp.timestamp() <= after + 0.001


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("1700000000", dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("1700000000.5", dt.datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)),
        ("0", dt.datetime(1970, 1, 1, tzinfo=UTC)),
        ("-86400", dt.datetime(1969, 12, 31, tzinfo=UTC)),
        ('"2024-05-01T12:00:00Z"', dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ('"2024-05-01T12:00:00z"', dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ('"2024-05-01T12:00:00.123456Z"', dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ('"2024-05-01T12:00:00.5Z"', dt.datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)),
        ('"2024-05-01T12:00:00,25Z"', dt.datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)),
        ('"2024-05-01T14:00:00+02:00"', dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ('"2024-05-01T06:30:00-0530"', dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ('"2024-05-01T17:00:00+05"', dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ('"2024-05-01T12:00:00+00:00"', dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ('"2024-05-01 12:00:00Z"', dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ('"2024-05-01T12:00"', dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),  # no zone: UTC
        ('"2024-01-01T01:00:00+02:00"', dt.datetime(2023, 12, 31, 23, tzinfo=UTC)),
    ],
)
def test_timestamps_are_parsed_to_aware_utc(raw, expected):
    message = ef.decode(f'{{"topic":"a","timestamp":{raw}}}'.encode())
    assert message.timestamp == expected
    assert message.timestamp.utcoffset() == dt.timedelta(0)


def test_reserved_topics_are_decoded():
    # '$' topics are protocol control frames: decode accepts them, users cannot send them.
    assert ef.decode(b'{"topic":"$sys.ping"}').topic == "$sys.ping"


@pytest.mark.parametrize(
    "stamp",
    ["2023-02-29T00:00:00Z", "2024-04-31T00:00:00Z", "2024-13-01T00:00:00Z",
     "2024-00-10T00:00:00Z", "2024-01-00T00:00:00Z", "2024-01-01T24:00:00Z",
     "2024-01-01T00:60:00Z", "2024-01-01T00:00:61Z", "2024-01-01T00:00:00+24:00",
     "0000-01-01T00:00:00Z"],
)
def test_impossible_timestamp_is_rejected_at_decode(stamp):
    # Regression: not accepted by decode() only to blow up when .timestamp is read.
    with pytest.raises(ef.FrameError, match="timestamp"):
        ef.decode(f'{{"topic":"a","timestamp":"{stamp}"}}'.encode())


@pytest.mark.parametrize(
    "stamp", ["2024-02-29T00:00:00Z", "2023-01-31T23:59:59.999999Z", "2023-12-31T00:00:00+23:59"]
)
def test_possible_timestamp_edge_is_accepted(stamp):
    message = ef.decode(f'{{"topic":"a","timestamp":"{stamp}"}}'.encode())
    assert message.timestamp.tzinfo is not None


@pytest.mark.parametrize("stamp", ["1e300", "-1e300", "253402300800", "-62135596801"])
def test_out_of_range_numeric_timestamp_is_rejected_at_decode(stamp):
    with pytest.raises(ef.FrameError, match="timestamp"):
        ef.decode(f'{{"topic":"a","timestamp":{stamp}}}'.encode())


@pytest.mark.parametrize("stamp", ["253402300799", "-62135596800", "0"])
def test_numeric_timestamp_range_edges_are_accepted(stamp):
    message = ef.decode(f'{{"topic":"a","timestamp":{stamp}}}'.encode())
    assert message.timestamp.timestamp() == float(stamp)
    assert ef.decode(ef.encode(message)[4:]) == message


# ---------------------------------------------------------------------------
# Timestamps on the way out
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        (1714564800, "2024-05-01T12:00:00Z"),
        (1714564800.0, "2024-05-01T12:00:00Z"),
        (1714564800.25, "2024-05-01T12:00:00.250000Z"),
        (1714564800.000001, "2024-05-01T12:00:00.000001Z"),
        (dt.datetime(2024, 5, 1, 12, tzinfo=UTC), "2024-05-01T12:00:00Z"),
        (dt.datetime(2024, 5, 1, 14, tzinfo=dt.timezone(dt.timedelta(hours=2))),
         "2024-05-01T12:00:00Z"),
        (dt.datetime(2024, 5, 1, 12, 0, 0, 7), "2024-05-01T12:00:00.000007Z"),  # naive = UTC
        (-62135596800, "0001-01-01T00:00:00Z"),
        (-59011459200, "0100-01-01T00:00:00Z"),
        (253402300799, "9999-12-31T23:59:59Z"),
        (0.5, "1970-01-01T00:00:00.500000Z"),
    ],
)
def test_timestamp_wire_form(value, text):
    # ISO 8601 UTC, 'Z', four-digit year, microseconds only when not zero.
    # (Year < 1000 is a regression: strftime('%Y') used to drop the zeros.)
    message = ef.Message("a", timestamp=value)
    assert wire(message)["timestamp"] == text
    assert ef.decode(ef.encode(message)[4:]).timestamp == message.timestamp


def test_default_timestamp_is_now_in_utc():
    before = dt.datetime.now(UTC)
    message = ef.Message("a")
    after = dt.datetime.now(UTC)
    slack = dt.timedelta(milliseconds=1)  # float epoch -> datetime rounds to the microsecond
    assert before - slack <= message.timestamp <= after + slack
    assert wire(message)["timestamp"].endswith("Z")


# ---------------------------------------------------------------------------
# Message helpers (pydantic-style)
# ---------------------------------------------------------------------------


def _sample():
    return ef.Message(
        "orders.created",
        {"id": 1, "items": ["book"]},
        id="0b7c1b7e-3f0a-4f5e-9a57-1c2d3e4f5a6b",
        headers={"source": "test"},
        timestamp=1714564800.5,
        reply_to="_reply.x",
        correlation_id="corr-1",
    )


def test_model_dump_python_and_json_modes():
    message = _sample()
    python = message.model_dump()
    assert list(python) == ["id", "topic", "payload", "headers", "timestamp", "reply_to",
                            "correlation_id"]
    assert python["timestamp"] == dt.datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)
    assert python["payload"] == {"id": 1, "items": ["book"]}
    as_json = message.model_dump(mode="json")
    assert as_json == {**python, "timestamp": "2024-05-01T12:00:00.500000Z"}
    assert json.loads(message.model_dump_json()) == as_json
    assert message.model_dump_json().encode() == ef.encode(message)[4:]


def test_model_validate_and_validate_json():
    message = _sample()
    assert ef.Message.model_validate(message) is message
    assert ef.Message.model_validate(message.model_dump(mode="json")) == message
    assert ef.Message.model_validate_json(message.model_dump_json()) == message
    assert ef.Message.model_validate_json(message.model_dump_json().encode()) == message
    with pytest.raises(ValueError, match="no 'topic'"):
        ef.Message.model_validate({"payload": 1})
    with pytest.raises(ValueError, match="not valid JSON"):
        ef.Message.model_validate_json("{")


def test_model_validate_accepts_model_dump_python_mode():
    # Regression: model_dump() gives the timestamp as a datetime, which
    # model_validate() used to refuse; pydantic's idiom must round-trip.
    original = _sample()
    copy = ef.Message.model_validate(original.model_dump())
    assert copy == original
    assert copy.timestamp == original.timestamp
    assert copy.model_dump() == original.model_dump()


def test_model_copy():
    message = _sample()
    copy = message.model_copy()
    assert copy == message and copy is not message
    assert copy.headers is not message.headers  # headers are not shared
    changed = message.model_copy(update={"payload": 2, "topic": "orders.updated"})
    assert changed.payload == 2 and changed.topic == "orders.updated"
    assert changed.id == message.id and changed.timestamp == message.timestamp
    assert message.payload == {"id": 1, "items": ["book"]}  # original untouched
    deep = message.model_copy(deep=True)
    deep.payload["items"].append("pen")
    assert message.payload["items"] == ["book"]
    with pytest.raises(ValueError, match="unknown Message field.*colour"):
        message.model_copy(update={"colour": "red"})


def test_message_equality_and_repr():
    message = _sample()
    assert message == ef.decode(ef.encode(message)[4:])
    assert message != message.model_copy(update={"payload": 3})
    assert message != "not a message"
    with pytest.raises(TypeError):
        hash(message)
    text = repr(message)
    assert "orders.created" in text and message.id in text and "_reply.x" in text


# ---------------------------------------------------------------------------
# Ids
# ---------------------------------------------------------------------------


def _assert_uuid4_shaped(value):
    parsed = uuid.UUID(value)
    assert str(parsed) == value  # canonical lower-case 8-4-4-4-12 form
    assert parsed.version == 4
    assert parsed.variant == uuid.RFC_4122


def test_ids_are_unique_and_uuid4_shaped():
    ids = [ef.new_id() for _ in range(50_000)] + [ef.Message("a").id for _ in range(50_000)]
    assert len(set(ids)) == 100_000
    for value in ids[:: 997] + ids[-3:]:
        _assert_uuid4_shaped(value)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_ids_differ_across_fork():
    parent_before = [ef.new_id() for _ in range(1000)]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its ids and leave without running pytest's atexit
        try:
            with os.fdopen(write_end, "w") as out:
                out.write("\n".join(ef.new_id() for _ in range(1000)))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as incoming:
        child = incoming.read().split("\n")
    os.waitpid(pid, 0)
    parent_after = [ef.new_id() for _ in range(1000)]
    assert len(child) == 1000
    for value in child[:3]:
        _assert_uuid4_shaped(value)
    assert not set(child) & set(parent_before + parent_after)
    # The child drew a fresh random prefix rather than continuing the parent's counter.
    assert child[0][:23] != parent_before[0][:23]

