"""Message, the JSON codec and the incremental frame decoder."""

import pytest

import eventforge as ef


@pytest.mark.parametrize("body", [b'{"topic":["a"]}', b'{"topic":{"a":1}}', b'{"topic":1}'])
def test_non_str_topic_in_frame_is_a_frame_error(body):
    with pytest.raises(ef.FrameError, match="invalid topic"):
        ef.decode(body)


def test_model_validate_accepts_model_dump_python_mode():
    # model_dump() (python mode) gives the timestamp as a datetime; pydantic's
    # model_validate(model_dump()) round-trips, and so must ours.
    original = ef.Message("a.b", {"x": [1, 2]}, headers={"h": "v"}, reply_to="r.t",
                          correlation_id="c")
    copy = ef.Message.model_validate(original.model_dump())
    assert copy == original
    assert copy.timestamp == original.timestamp
    assert copy.model_dump() == original.model_dump()


@pytest.mark.parametrize(
    "message",
    [ef.Message("a", "lone \ud800 surrogate"), ef.Message("a", {"k\udfff": 1}),
     ef.Message("a", headers={"h": "\ud83d"})],
)
def test_lone_surrogate_is_a_serialization_error(message):
    with pytest.raises(ef.SerializationError, match="UTF-8"):
        ef.encode(message)


@pytest.mark.parametrize(
    "stamp",
    ["2023-02-29T00:00:00Z", "2024-04-31T00:00:00Z", "2024-13-01T00:00:00Z",
     "2024-00-10T00:00:00Z", "2024-01-00T00:00:00Z", "2024-01-01T24:00:00Z",
     "2024-01-01T00:60:00Z", "2024-01-01T00:00:61Z", "2024-01-01T00:00:00+24:00",
     "0000-01-01T00:00:00Z"],
)
def test_impossible_timestamp_is_rejected_at_decode(stamp):
    # Not accepted by decode() only to blow up later when .timestamp is read.
    body = ('{"topic":"a","timestamp":"%s"}' % stamp).encode()
    with pytest.raises(ef.FrameError, match="timestamp"):
        ef.decode(body)


@pytest.mark.parametrize(
    "stamp", ["2024-02-29T00:00:00Z", "2023-01-31T23:59:59.999999Z", "2023-12-31T00:00:00+23:59"]
)
def test_possible_timestamp_edge_is_accepted(stamp):
    message = ef.decode(('{"topic":"a","timestamp":"%s"}' % stamp).encode())
    assert message.timestamp.tzinfo is not None


@pytest.mark.parametrize("stamp", ["1e300", "-1e300", "253402300800", "-62135596801"])
def test_out_of_range_numeric_timestamp_is_rejected_at_decode(stamp):
    with pytest.raises(ef.FrameError, match="timestamp"):
        ef.decode(('{"topic":"a","timestamp":%s}' % stamp).encode())


@pytest.mark.parametrize("stamp", ["253402300799", "-62135596800", "0"])
def test_numeric_timestamp_range_edges_are_accepted(stamp):
    message = ef.decode(('{"topic":"a","timestamp":%s}' % stamp).encode())
    assert message.timestamp.timestamp() == float(stamp)


@pytest.mark.parametrize(
    "epoch, text",
    [(-62135596800, "0001-01-01T00:00:00Z"), (-59011459200, "0100-01-01T00:00:00Z"),
     (253402300799, "9999-12-31T23:59:59Z"), (0.5, "1970-01-01T00:00:00.500000Z")],
)
def test_timestamp_year_has_four_digits(epoch, text):
    message = ef.Message("a", timestamp=epoch)
    assert message.model_dump(mode="json")["timestamp"] == text
    assert ef.decode(ef.encode(message)[4:]).timestamp == message.timestamp


def test_frames_before_an_oversize_header_are_kept_on_the_error():
    decoder = ef.FrameDecoder(max_frame_size=1000)
    first, second = ef.encode(ef.Message("a", 1)), ef.encode(ef.Message("b", 2))
    with pytest.raises(ef.FrameTooLargeError) as caught:
        decoder.feed(first + second + b"\xff\xff\xff\xff" + b"x" * 10)
    assert caught.value.frames == [first[4:], second[4:]]
    assert decoder.buffered == 0
