"""Topic grammar, the reference matcher and the SubscriptionTrie."""

from __future__ import annotations

import random
import re
import threading
from functools import cache
from pathlib import Path

import pytest
from _core_helpers import run_threads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

import eventforge as ef

# ---------------------------------------------------------------------------
# An independent reference matcher (does not use eventforge.topic_matches)
# ---------------------------------------------------------------------------


INBOX = ("_reply.", "_rpc_reply.")


def reference_match(pattern: str, topic: str) -> bool:
    """Segment-wise recursive matcher: '*' = one segment, '**' = zero or more.

    Inbox topics (``_reply.``/``_rpc_reply.``) match exact patterns only.
    """
    if topic.startswith(INBOX):
        return pattern == topic
    p, t = pattern.split("."), topic.split(".")

    @cache
    def go(i: int, j: int) -> bool:
        if i == len(p):
            return j == len(t)
        if p[i] == "**":
            return go(i + 1, j) or (j < len(t) and go(i, j + 1))
        if j == len(t):
            return False
        return (p[i] == "*" or p[i] == t[j]) and go(i + 1, j + 1)

    return go(0, 0)


def regex_match(pattern: str, topic: str) -> bool:
    """A second, differently built reference: translate the pattern to a regex."""
    if "*" in pattern and re.match(r"_(rpc_)?reply\.", topic):
        return False  # inbox topics are private to exact subscriptions
    # Match on "." + topic so every segment is preceded by a dot.
    parts = []
    for segment in pattern.split("."):
        if segment == "**":
            parts.append(r"(?:\.[^.]+)*")
        elif segment == "*":
            parts.append(r"\.[^.]+")
        else:
            parts.append(r"\." + re.escape(segment))
    return re.fullmatch("".join(parts), "." + topic) is not None


SEGMENTS = ["a", "b", "c"]
# "_reply"/"_rpc_reply" as a first segment makes inbox topics; "reply" also
# appears elsewhere so prefixes that merely look alike are tried too.
topic_st = st.one_of(
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6).map(".".join),
    st.tuples(
        st.sampled_from(["_reply", "_rpc_reply", "reply", "a_reply"]),
        st.lists(st.sampled_from(SEGMENTS + ["_reply"]), min_size=0, max_size=4),
    ).map(lambda pair: ".".join([pair[0], *pair[1]])),
)
pattern_st = st.lists(
    st.sampled_from(SEGMENTS + ["*", "**", "_reply", "_rpc_reply"]), min_size=1, max_size=6
).map(".".join)


def test_references_agree_on_documented_examples():
    cases = [
        ("a.**", "a", True),
        ("a.**", "a.b", True),
        ("a.**", "a.b.c", True),
        ("a.**.z", "a.z", True),
        ("a.**.z", "a.b.c.z", True),
        ("a.**.z", "a.b.c", False),
        ("a.*", "a", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("**", "x.y.z", True),
        ("*.b", "a.b", True),
        ("**.b.**", "b", True),
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*.*", "a.b", False),
        ("**", "_reply.x", False),
        ("*.x", "_reply.x", False),
        ("_reply.*", "_reply.x", False),
        ("_rpc_reply.**", "_rpc_reply.x", False),
        ("**.x", "_rpc_reply.x", False),
        ("_reply.x", "_reply.x", True),
        ("**", "a._reply.x", True),  # only a *leading* inbox prefix is private
        ("**", "reply.x", True),
    ]
    for pattern, topic, expected in cases:
        assert reference_match(pattern, topic) is expected, (pattern, topic)
        assert regex_match(pattern, topic) is expected, (pattern, topic)
        assert ef.topic_matches(pattern, topic) is expected, (pattern, topic)
        trie = ef.SubscriptionTrie()
        trie.add("k", pattern, "v")
        assert (trie.match(topic) == ("v",)) is expected, (pattern, topic)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

VALID_TOPICS = [
    "a",
    "orders.created",
    "a.b.c.d.e.f.g",
    "café.über",
    "emoji.\U0001f389",
    "with-dash_and:colon/slash",
    "x" * ef.MAX_TOPIC_LENGTH,
]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics_are_accepted(topic):
    assert ef.validate_topic(topic) == topic
    assert ef.validate_pattern(topic) == topic


@pytest.mark.parametrize(
    "topic, reason",
    [
        ("", "must not be empty"),
        (".a", "empty segment"),
        ("a.", "empty segment"),
        ("a..b", "empty segment"),
        (".", "empty segment"),
        ("a b", "whitespace or a control character"),
        ("a\tb", "whitespace or a control character"),
        ("a\nb", "whitespace or a control character"),
        ("a\x00b", "whitespace or a control character"),
        ("a\x1bb", "whitespace or a control character"),
        ("a\u00a0b", "whitespace or a control character"),
        ("a\u2028b", "whitespace or a control character"),
        ("a.*", "wildcard"),
        ("a.**", "wildcard"),
        ("*", "wildcard"),
        ("a.b*", "wildcard"),
        ("$sys", "reserved"),
        ("$sys.ping", "reserved"),
        ("x" * (ef.MAX_TOPIC_LENGTH + 1), f"maximum is {ef.MAX_TOPIC_LENGTH}"),
        (None, "must be a str, not NoneType"),
        (42, "must be a str, not int"),
        (b"a.b", "must be a str, not bytes"),
    ],
)
def test_invalid_topics_are_refused_with_a_clear_message(topic, reason):
    with pytest.raises(ef.TopicError) as caught:
        ef.validate_topic(topic)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, ef.EventforgeError)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    "pattern", ["*", "**", "a.*", "a.**", "**.z", "a.**.z", "*.*.*", "**.**", "a.*.b.**"]
)
def test_valid_patterns_are_accepted(pattern):
    assert ef.validate_pattern(pattern) == pattern


@pytest.mark.parametrize(
    "pattern, reason",
    [
        ("", "must not be empty"),
        ("a..*", "empty segment"),
        ("a.*.", "empty segment"),
        ("ab*", "partial wildcard"),
        ("a.*b", "partial wildcard"),
        ("a.b**", "partial wildcard"),
        ("***", "partial wildcard"),
        ("a.* ", "whitespace"),
        ("$sys.*", "reserved"),
        ("x" * (ef.MAX_TOPIC_LENGTH + 1), "maximum"),
        (["a"], "must be a str"),
    ],
)
def test_invalid_patterns_are_refused_with_a_clear_message(pattern, reason):
    with pytest.raises(ef.TopicError) as caught:
        ef.validate_pattern(pattern)
    assert reason in str(caught.value)


def test_partial_wildcard_message_names_the_segment():
    with pytest.raises(ef.TopicError, match=r"'ab\*'.*whole segment"):
        ef.validate_pattern("x.ab*.y")


def test_reserved_topics_are_allowed_with_allow_reserved():
    assert ef.validate_topic("$sys.ping", allow_reserved=True) == "$sys.ping"
    assert ef.validate_pattern("$sys.*", allow_reserved=True) == "$sys.*"
    # The cache of valid topics must not let a reserved topic through later.
    with pytest.raises(ef.TopicError, match="reserved"):
        ef.validate_topic("$sys.ping")
    with pytest.raises(ef.TopicError, match="reserved"):
        ef.validate_pattern("$sys.*")


def test_max_length_boundary_for_segmented_topics():
    # Many segments, exactly at the limit, then one over.
    at_limit = ".".join(["abc"] * 256) + "d"  # 256 * 4 - 1 + 1
    assert len(at_limit) == ef.MAX_TOPIC_LENGTH
    assert ef.validate_topic(at_limit) == at_limit
    with pytest.raises(ef.TopicError, match="1025 characters"):
        ef.validate_topic(at_limit + "y")
    assert ef.validate_pattern("*." + at_limit[2:]) == "*." + at_limit[2:]
    with pytest.raises(ef.TopicError, match="maximum"):
        ef.validate_pattern("*." + at_limit)


@pytest.mark.parametrize("value", [["a"], {"a": 1}, None, 1, b"a"])
def test_non_str_topic_is_a_topic_error(value):
    # Regression: unhashable values used to raise TypeError from the cache lookup.
    with pytest.raises(ef.TopicError, match="must be a str"):
        ef.validate_topic(value)


@pytest.mark.parametrize("char", ["\x7f", "\x80", "\x85", "\x9f"])
def test_c1_control_characters_are_refused(char):
    # Unicode category Cc covers U+0000-U+001F and U+007F-U+009F.
    with pytest.raises(ef.TopicError, match="control character"):
        ef.validate_topic(f"a{char}b")
    with pytest.raises(ef.TopicError, match="control character"):
        ef.validate_pattern(f"a{char}b.*")


@given(st.text(max_size=20))
@settings(max_examples=300, deadline=None)
def test_validation_agrees_with_the_grammar(text):
    # An independent statement of the grammar, checked on arbitrary text.
    forbidden = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
    segments = text.split(".")
    grammatical = (
        0 < len(text) <= ef.MAX_TOPIC_LENGTH
        and not forbidden.search(text)
        and all(segments)
        and not text.startswith("$")
    )
    topic_ok = grammatical and "*" not in text
    pattern_ok = grammatical and all(s in ("*", "**") or "*" not in s for s in segments)
    try:
        ef.validate_topic(text)
        assert topic_ok, text
    except ef.TopicError:
        assert not topic_ok, text
    try:
        ef.validate_pattern(text)
        assert pattern_ok, text
    except ef.TopicError:
        assert not pattern_ok, text


# ---------------------------------------------------------------------------
# Matching: topic_matches and the trie against the references
# ---------------------------------------------------------------------------


@given(pattern_st, topic_st)
@settings(max_examples=500, deadline=None)
def test_topic_matches_agrees_with_reference(pattern, topic):
    expected = reference_match(pattern, topic)
    assert regex_match(pattern, topic) is expected
    assert ef.topic_matches(pattern, topic) is expected


@given(st.lists(pattern_st, min_size=0, max_size=12), st.lists(topic_st, min_size=1, max_size=8))
@settings(max_examples=300, deadline=None)
def test_trie_agrees_with_reference_in_insertion_order(patterns, topics):
    trie = ef.SubscriptionTrie()
    for index, pattern in enumerate(patterns):
        trie.add(index, pattern, (index, pattern))
    for topic in topics:
        expected = tuple((i, p) for i, p in enumerate(patterns) if reference_match(p, topic))
        assert trie.match(topic) == expected
        assert trie.match(topic) == expected  # again, now from the cache


@given(st.lists(pattern_st, min_size=1, max_size=12), st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_trie_prunes_when_everything_is_removed(patterns, rnd):
    trie = ef.SubscriptionTrie()
    for index, pattern in enumerate(patterns):
        trie.add(index, pattern, index)
    order = list(range(len(patterns)))
    rnd.shuffle(order)
    for index in order:
        assert trie.remove(index) is True
        assert trie.remove(index) is False
    assert len(trie) == 0
    assert trie.patterns() == []
    shape = trie.debug_state()
    assert shape["nodes"] == [] and shape["entries"] == 0


def test_trie_prunes_only_the_removed_branch():
    trie = ef.SubscriptionTrie()
    trie.add(1, "a.b.c", 1)
    trie.add(2, "a.*.**", 2)
    assert trie.debug_state()["nodes"] == ["a", "a.*", "a.*.**", "a.b", "a.b.c"]
    trie.remove(1)
    assert trie.debug_state()["nodes"] == ["a", "a.*", "a.*.**"]
    assert trie.debug_state()["entries"] == 1
    trie.remove(2)
    assert trie.debug_state()["nodes"] == [] and trie.debug_state()["entries"] == 0


def test_trie_duplicate_key_and_pop():
    trie = ef.SubscriptionTrie()
    trie.add("k", "a.*", "v")
    with pytest.raises(KeyError):
        trie.add("k", "b", "w")
    assert "k" in trie
    assert trie.pop("k") == "v"
    assert trie.pop("k", "default") == "default"
    assert "k" not in trie


def test_same_pattern_many_keys_keeps_insertion_order():
    trie = ef.SubscriptionTrie()
    for key in range(10):
        trie.add(key, "a.*" if key % 2 else "**", key)
    assert trie.match("a.b") == tuple(range(10))
    trie.remove(4)
    trie.add(4, "a.b", 4)  # re-added: now the newest
    assert trie.match("a.b") == (0, 1, 2, 3, 5, 6, 7, 8, 9, 4)


class TrieModel(RuleBasedStateMachine):
    """Random add/remove/match sequences: the trie equals a plain list model."""

    keys = Bundle("keys")

    def __init__(self):
        super().__init__()
        self.trie = ef.SubscriptionTrie(cache_size=4)
        self.model = {}  # key -> pattern, in insertion order
        self.counter = 0

    @rule(target=keys, pattern=pattern_st)
    def add(self, pattern):
        self.counter += 1
        key = f"k{self.counter}"
        self.trie.add(key, pattern, key)
        self.model[key] = pattern
        return key

    @rule(key=keys)
    def remove(self, key):
        existed = key in self.model
        self.model.pop(key, None)
        assert self.trie.remove(key) is existed

    @rule(topic=topic_st)
    def match(self, topic):
        expected = tuple(k for k, p in self.model.items() if reference_match(p, topic))
        assert self.trie.match(topic) == expected

    @invariant()
    def same_size_and_patterns(self):
        assert len(self.trie) == len(self.model)
        assert self.trie.patterns() == list(self.model.values())
        shape = self.trie.debug_state()
        assert len(shape["cached"]) <= 4
        assert shape["entries"] == len(self.model)
        if not self.model:
            assert shape["nodes"] == []


TrieModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_trie_state_machine = TrieModel.TestCase


# ---------------------------------------------------------------------------
# The match cache
# ---------------------------------------------------------------------------


def test_cache_is_bounded():
    trie = ef.SubscriptionTrie(cache_size=16)
    trie.add(1, "t.*", 1)
    for i in range(200):
        assert trie.match(f"t.{i}") == (1,)
        assert len(trie.debug_state()["cached"]) <= 16
    cached = trie.debug_state()["cached"]
    assert len(cached) == 16
    # The most recent topics are the ones kept.
    assert "t.199" in cached and "t.0" not in cached


def test_cache_is_invalidated_by_add_and_remove():
    trie = ef.SubscriptionTrie()
    trie.add(1, "a.b", 1)
    assert trie.match("a.b") == (1,)
    assert trie.match("a.b") == (1,)  # cached
    trie.add(2, "a.*", 2)
    assert trie.match("a.b") == (1, 2)
    trie.remove(1)
    assert trie.match("a.b") == (2,)
    trie.clear()
    assert trie.match("a.b") == ()
    assert len(trie) == 0 and trie.debug_state()["nodes"] == []


def test_trie_without_cache():
    # Regression: cache_size=0 used to raise StopIteration from match().
    trie = ef.SubscriptionTrie(cache_size=0)
    trie.add("k", "a.*", "v")
    assert trie.match("a.b") == ("v",)
    assert trie.match("a.b") == ("v",)
    assert trie.debug_state()["cached"] == []


def test_many_globstars_do_not_blow_up():
    # An NFA walk: 20 '**' against a long topic finishes promptly (no backtracking
    # explosion); the reference agrees.
    pattern = ".".join(["**"] * 20 + ["z"])
    topic = ".".join(["a"] * 60)
    trie = ef.SubscriptionTrie()
    trie.add(1, pattern, 1)
    assert trie.match(topic) == ()
    assert trie.match(topic + ".z") == (1,)
    assert ef.topic_matches(pattern, topic) is False
    assert ef.topic_matches(pattern, topic + ".z") is True


# ---------------------------------------------------------------------------
# Thread safety
# ---------------------------------------------------------------------------


def test_concurrent_match_add_remove():
    trie = ef.SubscriptionTrie(cache_size=32)
    stable = {f"stable{i}": p for i, p in enumerate(["a.*", "**.c", "a.b.c", "*.*", "**"])}
    for key, pattern in stable.items():
        trie.add(key, pattern, key)
    topics = ["a.b", "a.b.c", "x.c", "a", "b.b", "c"]
    expected = {
        t: tuple(k for k, p in stable.items() if reference_match(p, t)) for t in topics
    }
    stop = threading.Event()

    def matcher(seed):
        def run():
            rnd = random.Random(seed)
            for _ in range(3000):
                topic = rnd.choice(topics)
                found = trie.match(topic)
                # Stable entries are always present, in insertion order.
                stable_found = tuple(v for v in found if v.startswith("stable"))
                assert stable_found == expected[topic], (topic, found)
                # Whatever else was found really matches.
                for value in found:
                    if not value.startswith("stable"):
                        assert reference_match(value.split("|")[1], topic)
            stop.set()

        return run

    def churner(seed):
        def run():
            rnd = random.Random(seed)
            mine = []
            for i in range(1500):
                if mine and rnd.random() < 0.5:
                    assert trie.remove(mine.pop(rnd.randrange(len(mine))))
                else:
                    pattern = rnd.choice(["a.*", "**", "*.c", "a.b.c", "a.**.c", "b.*"])
                    key = f"churn{seed}-{i}|{pattern}"
                    trie.add(key, pattern, key)
                    mine.append(key)
            for key in mine:
                assert trie.remove(key)

        return run

    run_threads([matcher(s) for s in range(8)] + [churner(s) for s in range(100, 103)])
    assert sorted(trie.patterns()) == sorted(stable.values())
    for topic in topics:
        assert trie.match(topic) == expected[topic]
    for key in stable:
        trie.remove(key)
    assert trie.debug_state()["nodes"] == [] and trie.debug_state()["entries"] == 0


def test_the_matching_table_in_docs_protocol_md():
    # Keeps the spec's examples honest: every row agrees with the reference
    # matcher and with eventforge.
    doc = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
    if not doc.exists():
        pytest.skip("docs/ not present next to tests/")
    text = doc.read_text("utf-8").split("### Matching", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) >= 6
    for row in rows:
        pattern, matches, misses = (cell.strip() for cell in row.strip("|").split("|"))
        pattern = pattern.strip("`")
        for topic in re.findall(r"`([^`]+)`", matches):
            assert reference_match(pattern, topic) and ef.topic_matches(pattern, topic)
        for topic in re.findall(r"`([^`]+)`", misses):
            assert not reference_match(pattern, topic)
            assert not ef.topic_matches(pattern, topic)
