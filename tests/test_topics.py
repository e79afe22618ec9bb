"""Topic grammar, the reference matcher and the SubscriptionTrie."""

import pytest

import eventforge as ef


@pytest.mark.parametrize("value", [["a"], {"a": 1}, None, 1, b"a"])
def test_non_str_topic_is_a_topic_error(value):
    with pytest.raises(ef.TopicError, match="must be a str"):
        ef.validate_topic(value)
