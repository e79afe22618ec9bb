"""Topic -> broker name mapping of the Redis and NATS adapters, property-tested.

The broker may let through more than the eventforge pattern matches (the
core matcher narrows it locally), but never less; and the NATS subjects of
one pattern never overlap, so a message reaches a subscription once.
Reference models of Redis glob and NATS subject matching are written out
below, straight from the brokers' documentation.
"""

from __future__ import annotations

import re
from typing import List

from hypothesis import given, settings
from hypothesis import strategies as st

import eventforge as ef
from eventforge_ext._broker import collapse_globstars, inbox_parts
from eventforge_ext.nats import nats_subject, nats_subjects
from eventforge_ext.redis import redis_channel, redis_glob

LITERALS = ["a", "b", "c", ">", "[x]", "?", "\\", "_reply", "%3E", "a-b"]


def redis_glob_matches(glob: str, channel: str) -> bool:
    """Redis stringmatchlen for the subset we generate: ``*``, ``?``, ``\\x``."""
    regex: List[str] = []
    i = 0
    while i < len(glob):
        ch = glob[i]
        if ch == "\\" and i + 1 < len(glob):
            regex.append(re.escape(glob[i + 1]))
            i += 2
            continue
        regex.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
        i += 1
    return re.fullmatch("".join(regex), channel, re.DOTALL) is not None


def nats_matches(subject: str, name: str) -> bool:
    """NATS subject matching: ``*`` one token, a final ``>`` one or more."""
    pattern, tokens = subject.split("."), name.split(".")
    for index, token in enumerate(pattern):
        if token == ">":
            return index == len(pattern) - 1 and len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(pattern)


topics = st.lists(st.sampled_from(LITERALS), min_size=1, max_size=6).map(".".join)
patterns = st.lists(st.sampled_from(LITERALS + ["*", "**", "*", "**"]), min_size=1,
                    max_size=6).map(".".join)


@settings(max_examples=600, deadline=None)
@given(patterns, topics)
def test_redis_glob_lets_through_every_match(pattern, topic):
    if ef.topic_matches(pattern, topic):
        assert redis_glob_matches(redis_glob(pattern), redis_channel(topic)), (
            pattern, topic, redis_glob(pattern))


@settings(max_examples=200, deadline=None)
@given(topics)
def test_redis_literal_patterns_match_only_themselves(topic):
    glob = redis_glob(topic)
    assert redis_glob_matches(glob, topic)
    assert not redis_glob_matches(glob, topic + "x")
    assert redis_channel(topic) == topic


@settings(max_examples=600, deadline=None)
@given(patterns, topics)
def test_nats_subjects_are_disjoint_and_cover_every_match(pattern, topic):
    subjects = nats_subjects(pattern)
    hits = [s for s in subjects if nats_matches(s, nats_subject(topic))]
    assert len(hits) <= 1, (pattern, topic, subjects)
    if ef.topic_matches(pattern, topic):
        assert len(hits) == 1, (pattern, topic, subjects)


@settings(max_examples=300, deadline=None)
@given(st.one_of(patterns, topics))
def test_nats_subjects_are_well_formed(text):
    names = nats_subjects(text) if "*" in text else (nats_subject(text),)
    for name in names:
        tokens = name.split(".")
        assert all(tokens), name
        assert ">" not in tokens[:-1], name
        if "*" not in text:
            assert ">" not in tokens, name  # a literal '>' must not become a wildcard


def test_nats_mapping_examples():
    assert nats_subjects("a.b") == ("a.b",)
    assert nats_subjects("a.*") == ("a.*",)
    assert nats_subjects("a.**") == ("a", "a.>")
    assert nats_subjects("**") == (">",)
    assert nats_subjects("a.**.z") == ("a.>",)
    assert nats_subjects("**.z") == (">",)
    assert nats_subjects("a.**.**") == ("a", "a.>")
    assert nats_subject("a.>") == "a.%3E"


def test_redis_mapping_examples():
    assert redis_glob("a.*") == "a.*"
    assert redis_glob("a.**") == "a*"
    assert redis_glob("a.**.z") == "a*.z"
    assert redis_glob("**.z") == "*z"
    assert redis_glob("**") == "*"
    assert redis_glob("a?.[b].*") == "a\\?.\\[b\\].*"


def test_collapse_globstars():
    assert collapse_globstars("a.**.**.b.**") == ["a", "**", "b", "**"]
    assert collapse_globstars("**.**") == ["**"]


def test_inbox_topics_share_one_route_per_process():
    ids = [ef.new_id() for _ in range(3)]
    for prefix in ef.INBOX_PREFIXES:
        names = [nats_subject(prefix + i) for i in ids]
        parts = [inbox_parts(prefix + i) for i in ids]
        assert all(p is not None for p in parts)
        route = f"{prefix}{parts[0][1]}.*"
        assert all(nats_matches(route, n) for n in names)
        assert all(redis_glob_matches(route, redis_channel(prefix + i)) for i in ids)
    assert inbox_parts("_reply.not-an-id") is None
    assert inbox_parts("orders.new") is None
    assert nats_subject("_reply.not-an-id") == "_reply.not-an-id"
