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
