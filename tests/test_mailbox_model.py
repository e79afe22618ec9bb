"""A rule-based model of MemoryTransport's mailbox rules (DESIGN section 5).

Unclaimed messages wait per topic, at most ``max_queue_size`` per topic and
``max_buffered`` in total; past either bound the oldest unclaimed message
(of that topic, or of all topics) is dropped and counted; a subscriber's
message is never kept; messages on inbox topics nobody awaits are dropped.
"""

from __future__ import annotations

import collections
import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import eventforge as ef

TOPICS = ["a", "b", "c", "d.e", "_reply.r1"]


class MailboxModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.transport = None
        self.counter = itertools.count()

    @rule(per_topic=st.integers(1, 4), total=st.integers(1, 6))
    @precondition(lambda self: self.transport is None)
    def create(self, per_topic, total):
        self.transport = ef.MemoryTransport(max_queue_size=per_topic, max_buffered=total)
        self.per_topic, self.total = per_topic, total
        self.kept = []  # (seq, topic), oldest first
        self.subscribed = collections.Counter()
        self.sub_ids = collections.defaultdict(list)
        self.delivered = []
        self.drops = {"topic_full": 0, "buffer_full": 0, "no_inbox": 0}

    @rule(topic=st.sampled_from(TOPICS))
    @precondition(lambda self: self.transport is not None)
    def send(self, topic):
        seq = next(self.counter)
        self.transport.send(ef.Message(topic, seq))  # never raises
        if self.subscribed[topic]:
            self.delivered.append(seq)  # taken by a subscriber, never also kept
            return
        if topic.startswith(ef.INBOX_PREFIXES):
            self.drops["no_inbox"] += 1
            return
        mine = [entry for entry in self.kept if entry[1] == topic]
        if len(mine) >= self.per_topic:
            self.kept.remove(mine[0])
            self.drops["topic_full"] += 1
        self.kept.append((seq, topic))
        if len(self.kept) > self.total:
            self.kept.pop(0)
            self.drops["buffer_full"] += 1

    @rule(topic=st.sampled_from(TOPICS))
    @precondition(lambda self: self.transport is not None)
    def receive(self, topic):
        message = self.transport.receive(topic, timeout=0)
        mine = [entry for entry in self.kept if entry[1] == topic]
        if not mine:
            assert message is None
            return
        assert message is not None and message.payload == mine[0][0]
        self.kept.remove(mine[0])

    @rule(topic=st.sampled_from(TOPICS))
    @precondition(lambda self: self.transport is not None)
    def subscribe(self, topic):
        got = self.delivered_by_transport = getattr(self, "delivered_by_transport", [])
        self.sub_ids[topic].append(self.transport.subscribe(topic, lambda m: got.append(m)))
        self.subscribed[topic] += 1

    @rule(topic=st.sampled_from(TOPICS))
    @precondition(lambda self: self.transport is not None)
    def unsubscribe(self, topic):
        if self.sub_ids[topic]:
            assert self.transport.unsubscribe(self.sub_ids[topic].pop())
            self.subscribed[topic] -= 1

    @invariant()
    def matches_the_model(self):
        if self.transport is None:
            return
        stats = self.transport.stats
        assert stats["buffered"] == len(self.kept) <= self.total
        assert stats["mailboxes"] == len({topic for _, topic in self.kept})
        assert stats["dropped_topic_full"] == self.drops["topic_full"]
        assert stats["dropped_buffer_full"] == self.drops["buffer_full"]
        assert stats["dropped_no_inbox"] == self.drops["no_inbox"]
        assert stats["dropped"] == sum(self.drops.values())
        mailboxes = self.transport.debug_state()["mailboxes"]
        for topic in TOPICS:
            kept = [m.payload for m in mailboxes.get(topic, ())]
            assert kept == [seq for seq, t in self.kept if t == topic]
            assert len(kept) <= self.per_topic
        taken = sorted({m.payload for m in getattr(self, "delivered_by_transport", [])})
        assert taken == sorted(set(self.delivered))

    def teardown(self):
        if self.transport is not None:
            self.transport.close()
            assert self.transport.stats["buffered"] == 0


TestMailboxModel = MailboxModel.TestCase
TestMailboxModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
