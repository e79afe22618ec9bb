"""Message, the JSON codec and the incremental frame decoder."""

import pytest

import eventforge as ef


@pytest.mark.parametrize("body", [b'{"topic":["a"]}', b'{"topic":{"a":1}}', b'{"topic":1}'])
def test_non_str_topic_in_frame_is_a_frame_error(body):
    with pytest.raises(ef.FrameError, match="invalid topic"):
        ef.decode(body)
