"""Topic grammar, the reference matcher and the SubscriptionTrie."""

import pytest

import eventforge as ef


@pytest.mark.parametrize("value", [["a"], {"a": 1}, None, 1, b"a"])
def test_non_str_topic_is_a_topic_error(value):
    with pytest.raises(ef.TopicError, match="must be a str"):
        ef.validate_topic(value)


@pytest.mark.parametrize("char", ["\x7f", "\x80", "\x85", "\x9f"])
def test_c1_control_characters_are_refused(char):
    # Unicode category Cc covers U+0000-U+001F and U+007F-U+009F.
    with pytest.raises(ef.TopicError, match="control character"):
        ef.validate_topic(f"a{char}b")
    with pytest.raises(ef.TopicError, match="control character"):
        ef.validate_pattern(f"a{char}b.*")


def test_trie_without_cache():
    trie = ef.SubscriptionTrie(cache_size=0)
    trie.add("k", "a.*", "v")
    assert trie.match("a.b") == ("v",)
    assert trie.match("a.b") == ("v",)
    assert trie._cache == {}
