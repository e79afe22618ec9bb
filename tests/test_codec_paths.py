"""Issue 9: the codec's fast paths give exactly what the plain paths give.

``encode`` writes the frame body without building the wire dict, ``decode``
skips the timestamp regex for a second it already checked, and
``FrameDecoder.feed`` slices frames out of the received bytes when it holds
nothing back.  Each must be indistinguishable from the plain way, bytes and
errors alike.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eventforge as ef

PROPERTY = settings(max_examples=300, deadline=2000,
                    suppress_health_check=[HealthCheck.too_slow])


def _reference_frame(message: ef.Message) -> bytes:
    """The frame as the plain encoder writes it: the JSON of the wire dict."""
    body = json.dumps(message.model_dump(mode="json"), ensure_ascii=False,
                      allow_nan=False, separators=(",", ":")).encode("utf-8")
    return len(body).to_bytes(4, "big") + body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
optional_text = st.none() | st.text()
field_values = optional_text | st.integers()  # a field a caller set to a non-str value


@given(id_=field_values, topic=st.text(min_size=1), payload=json_values,
       headers=st.dictionaries(st.text(), json_values, max_size=3) | st.none() | st.lists(
           st.integers(), max_size=2),
       reply_to=field_values, correlation_id=field_values,
       timestamp=st.floats(0, 4e9) | st.sampled_from(["2024-02-29T12:00:00Z", "x\"y"]))
@PROPERTY
def test_encode_writes_the_bytes_of_the_wire_dict(id_, topic, payload, headers, reply_to,
                                                   correlation_id, timestamp):
    message = ef.Message(topic, payload, id="x", timestamp=timestamp)
    # Fields as a caller may set them after construction, not only as __init__ takes them.
    message.id, message.headers = id_, headers
    message.reply_to, message.correlation_id = reply_to, correlation_id
    try:
        expected = _reference_frame(message)
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 form
        with pytest.raises(ef.SerializationError, match="not valid UTF-8"):
            ef.encode(message)
        return
    assert ef.encode(message) == expected
    assert message.model_dump_json().encode("utf-8") == expected[4:]


@pytest.mark.parametrize("payload, match", [
    ({"a": float("nan")}, "not valid JSON"),
    ({(1, 2): "tuple key"}, "not JSON serializable"),
    (object(), "is not JSON serializable"),
])
def test_encode_refuses_what_json_cannot_carry_as_before(payload, match):
    with pytest.raises(ef.SerializationError, match=match):
        ef.encode(ef.Message("a", payload))


def test_encode_refuses_a_circular_payload_and_a_shared_one_is_fine():
    loop: list = []
    loop.append(loop)
    with pytest.raises(ef.SerializationError, match="Circular reference"):
        ef.encode(ef.Message("a", loop))
    shared = {"k": 1}
    message = ef.Message("a", [shared, shared], headers={"h": shared})
    assert ef.encode(message) == _reference_frame(message)


def test_a_bad_timestamp_is_still_a_frame_error_at_encode():
    message = ef.Message("a", 1, timestamp=[2024])  # neither a number, a str nor a datetime
    with pytest.raises(ef.FrameError):
        ef.encode(message)


def _decode_with_stamp(text: str) -> ef.Message:
    return ef.decode(json.dumps({"topic": "a", "timestamp": text}).encode("utf-8"))


@pytest.mark.parametrize("seen, then, accepted", [
    # the second just checked, written as _format_timestamp writes it
    ("2024-03-01T10:00:00.000001Z", "2024-03-01T10:00:00.999999Z", True),
    ("2024-03-01T10:00:00.000001Z", "2024-03-01T10:00:00Z", True),
    # digits as \d matches them (any Unicode decimal digit)
    ("2024-03-01T10:00:00.000001Z", "2024-03-01T10:00:00.\u0661\u0662\u0663\u0664\u0665\u0666Z",
     True),
    # not decimal digits: superscripts are isdigit() but not \d
    ("2024-03-01T10:00:00.000001Z", "2024-03-01T10:00:00.\u00b9\u00b2\u00b3456Z", False),
    ("2024-03-01T10:00:00.000001Z", "2024-03-01T10:00:00.12345xZ", False),
    ("2024-03-01T10:00:00.000001Z", "2024-03-01T10:00:00.123456ZZ", False),
    # a second checked with an offset is not taken as checked for UTC
    ("0001-01-01T00:59:59+00:00", "0001-01-01T00:59:59.000001+01", False),
    ("0001-01-01T00:59:59Z", "0001-01-01T00:59:59.999999+01", False),
    ("9999-12-31T23:59:59Z", "9999-12-31T23:59:59.999999Z", True),
    ("2023-02-28T23:59:59Z", "2023-02-29T23:59:59.000001Z", False),
])
def test_decode_accepts_a_timestamp_exactly_as_the_regex_does(seen, then, accepted):
    _decode_with_stamp("2000-01-01T00:00:00Z")  # whatever was cached before
    _decode_with_stamp(seen)
    if accepted:
        message = _decode_with_stamp(then)
        assert 1 <= message.timestamp.year <= 9999
    else:
        with pytest.raises(ef.FrameError):
            _decode_with_stamp(then)


@given(st.lists(st.binary(max_size=40), max_size=8), st.sampled_from([bytes, bytearray,
                                                                      memoryview]))
@PROPERTY
def test_frame_decoder_gives_bytes_whatever_buffer_type_it_is_fed(bodies, kind):
    stream = b"".join(len(body).to_bytes(4, "big") + body for body in bodies)
    decoder = ef.FrameDecoder()
    got = []
    for start in range(0, len(stream), 7):
        frames = decoder.feed(kind(stream[start:start + 7]))
        assert all(type(frame) is bytes for frame in frames)
        got.extend(frames)
    assert got == bodies
    assert decoder.buffered == 0
    whole = decoder.feed(kind(stream))
    assert whole == bodies and all(type(frame) is bytes for frame in whole)
