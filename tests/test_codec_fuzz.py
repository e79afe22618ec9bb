"""Issue 7: codec limits, and byte-level fuzzing of decode() and FrameDecoder.

Whatever bytes arrive, the codec answers with a Message or a FrameError
(FrameTooLargeError for a length over the limit): never another exception,
never a hang, never a buffer sized by a length the peer claimed.
"""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eventforge as ef

FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def _frame_body(obj) -> bytes:
    return json.dumps(obj).encode("utf-8")


# -- timestamps outside the years 1-9999 ------------------------------------------------------


@pytest.mark.parametrize("text", [
    "9999-12-31T23:59:59-01:00",  # 10000-01-01T00:59:59Z
    "9999-12-31T23:30:00-00:31",
    "0001-01-01T00:00:00+01:00",  # year 0 in UTC
    "0001-01-01T00:59:59.999999+01",
])
def test_a_timestamp_outside_the_years_1_to_9999_is_refused_at_decode(text):
    with pytest.raises(ef.FrameError, match="outside the years 1-9999"):
        ef.decode(_frame_body({"topic": "a", "timestamp": text}))


@pytest.mark.parametrize("text", [
    "9999-12-31T23:59:59+01:00",
    "9999-12-31T23:59:59.999999Z",
    "9999-12-31T23:59:59.9999999Z",
    "0001-01-01T00:00:00Z",
    "0001-01-01T01:00:00+01:00",
])
def test_the_edges_of_the_range_decode_and_read(text):
    message = ef.decode(_frame_body({"topic": "a", "timestamp": text}))
    assert 1 <= message.timestamp.year <= 9999  # reading it never raises later


# -- integers ---------------------------------------------------------------------------------


def _digits_limit() -> int:
    return getattr(sys, "get_int_max_str_digits", lambda: 0)()


def test_integers_up_to_the_interpreter_limit_round_trip():
    limit = _digits_limit() or 10_000
    value = int("9" * limit)
    frame = ef.encode(ef.Message("a", {"n": value, "neg": -value}))
    assert ef.decode(frame[4:]).payload == {"n": value, "neg": -value}


@pytest.mark.skipif(not _digits_limit(), reason="this Python has no int_max_str_digits limit")
def test_integers_over_the_limit_fail_clearly_in_both_directions():
    digits = _digits_limit() + 1
    with pytest.raises(ef.FrameError, match=f"more than {digits - 1} decimal digits"):
        ef.decode(b'{"topic":"a","payload":' + b"7" * digits + b"}")
    with pytest.raises(ef.SerializationError, match="send larger numbers as strings"):
        ef.encode(ef.Message("a", 10 ** digits))


# -- fuzzing ----------------------------------------------------------------------------------


def _check_decode(body: bytes) -> None:
    try:
        message = ef.decode(body)
    except ef.FrameError:
        return
    # Accepted: every field is usable later, nothing raises on read.
    assert isinstance(message.topic, str)
    message.timestamp  # noqa: B018 - must not raise (it used to: ValueError)
    try:
        ef.encode(message)
    except (ef.SerializationError, ef.FrameTooLargeError):
        pass


@given(st.binary(max_size=512))
@FUZZ
def test_decode_of_arbitrary_bytes_gives_a_message_or_a_frame_error(body):
    _check_decode(body)


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
digit = st.integers(0, 99).map(lambda n: f"{n:02d}")
iso_like = st.builds(
    lambda y, mo, d, h, mi, s, frac, zone: f"{y:04d}-{mo}-{d}T{h}:{mi}:{s}{frac}{zone}",
    st.sampled_from([1, 2, 1970, 2024, 9998, 9999]), digit, digit, digit, digit, digit,
    st.sampled_from(["", ".5", ".999999", ".9999999", ",1"]),
    st.sampled_from(["", "Z", "z", "+01:00", "-01:00", "+23:59", "-23:59", "+0130", "-05"]),
)
frame_objects = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=10), json_values),
        "topic": st.one_of(st.sampled_from(["a", "a.b", "$ping", "_reply.x", "a..b", "*"]),
                           st.text(max_size=12), json_values),
        "payload": json_values,
        "headers": st.one_of(st.dictionaries(st.text(max_size=5), json_values, max_size=3),
                             json_values),
        "timestamp": st.one_of(iso_like, st.floats(), st.integers(), json_values),
        "reply_to": st.one_of(st.none(), st.text(max_size=10), json_values),
        "correlation_id": st.one_of(st.none(), st.text(max_size=10), json_values),
    },
)


@given(frame_objects)
@FUZZ
def test_decode_of_message_shaped_json_gives_a_message_or_a_frame_error(obj):
    try:
        body = json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")
    except (ValueError, UnicodeEncodeError):
        return
    _check_decode(body)


@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(0, 300))
@FUZZ
def test_frame_decoder_never_buffers_more_than_it_was_fed(chunks, max_frame_size):
    decoder = ef.FrameDecoder(max_frame_size=max_frame_size)
    fed = 0
    for chunk in chunks:
        fed += len(chunk)
        try:
            frames = decoder.feed(chunk)
        except ef.FrameTooLargeError as exc:
            assert all(len(f) <= max_frame_size for f in exc.frames)
            assert decoder.buffered == 0  # the stream is dropped, not kept
            return
        assert all(len(f) <= max_frame_size for f in frames)
        # Nothing is ever allocated beyond what actually arrived.
        assert decoder.buffered <= fed
        if decoder.buffered >= 4:
            claimed = int.from_bytes(_peek(decoder), "big")
            assert claimed <= max_frame_size


def _peek(decoder: ef.FrameDecoder) -> bytes:
    return bytes(decoder._buffer[:4])


@given(st.lists(st.binary(min_size=0, max_size=40), max_size=12),
       st.lists(st.integers(1, 17), min_size=1, max_size=8))
@FUZZ
def test_frame_decoder_gives_back_exactly_the_frames_in_any_chunking(bodies, cuts):
    stream = b"".join(len(b).to_bytes(4, "big") + b for b in bodies)
    decoder = ef.FrameDecoder(max_frame_size=64)
    got, pos, i = [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        got.extend(decoder.feed(stream[pos:pos + step]))
        pos, i = pos + step, i + 1
    assert got == bodies and decoder.buffered == 0
    for body in got:
        _check_decode(body)
