"""A rule-based model of a TCP client's interest reference counts.

Subscriptions, receive topics and request inboxes all add interest in a
topic or pattern; the client counts references, tells the server about the
first and the last, batches removals, and defers inboxes that a request will
announce implicitly.  Hypothesis drives random sequences of those operations
against a real client and server and checks, after every step, the client's
counts, and after every ``flush()``, the server's view of the connection.
"""

from __future__ import annotations

import collections
import socket
from typing import Any, Dict

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import eventforge as ef

PATTERNS = ["a.b", "a.*", "**", "_reply.one", "_rpc_reply.two"]
TOPICS = ["a.b", "c.d", "_reply.one", "_rpc_reply.two"]


def _server_interest(server: ef.TCPServerTransport, client: ef.TCPClientTransport) -> set:
    port = client.debug_state()["socket"].getsockname()[1]
    for conn in server.debug_state()["connections"].values():
        if conn["peer"].endswith(f":{port}"):
            return set(conn["interest"])
    raise AssertionError(f"the server has no connection from port {port}")


def test_interest_reference_counts_match_a_model(tcp):
    server = tcp.server()

    class InterestModel(RuleBasedStateMachine):
        subscriptions = Bundle("subscriptions")
        inboxes = Bundle("inboxes")

        def __init__(self) -> None:
            super().__init__()
            self.client = ef.TCPClientTransport("127.0.0.1", server.port).connect(5.0)
            self.counts: Dict[str, int] = collections.Counter()
            self.received: set = set()
            self.open_topics: set = set()
            self.live: set = set()

        @rule(target=subscriptions, pattern=st.sampled_from(PATTERNS))
        def subscribe(self, pattern: str) -> Any:
            self.counts[pattern] += 1
            sub_id = self.client.subscribe(pattern, lambda m: None)
            self.live.add(sub_id)
            return sub_id, pattern

        @rule(sub=consumes(subscriptions))
        def unsubscribe(self, sub: Any) -> None:
            sub_id, pattern = sub
            live = sub_id in self.live
            assert self.client.unsubscribe(sub_id) is live
            if live:
                self.live.discard(sub_id)
                self.counts[pattern] -= 1

        @rule(sub=subscriptions)
        def unsubscribe_twice_is_a_no_op(self, sub: Any) -> None:
            self.unsubscribe(sub)
            assert not self.client.unsubscribe(sub[0])

        @rule(topic=st.sampled_from(TOPICS))
        def receive(self, topic: str) -> None:
            assert self.client.receive(topic, timeout=0) is None
            if topic not in self.received:  # a receive topic is interest for good
                self.received.add(topic)
                self.counts[topic] += 1

        @precondition(lambda self: len(self.open_topics) < len(TOPICS))
        @rule(target=inboxes, data=st.data())
        def open_inbox(self, data: Any) -> Any:
            topic = data.draw(st.sampled_from(sorted(set(TOPICS) - self.open_topics)))
            self.open_topics.add(topic)
            self.counts[topic] += 1
            return self.client.open_inbox(topic)

        @rule(inbox=consumes(inboxes))
        def close_inbox(self, inbox: Any) -> None:
            inbox.close()
            inbox.close()  # twice: still one reference less
            self.open_topics.discard(inbox.topic)
            self.counts[inbox.topic] -= 1

        @rule()
        def flush_and_compare_with_the_server(self) -> None:
            assert self.client.flush(10.0) is True
            expected = {pattern for pattern, count in self.counts.items() if count > 0}
            assert _server_interest(server, self.client) == expected

        @invariant()
        def counts_match(self) -> None:
            expected = {pattern: count for pattern, count in self.counts.items() if count > 0}
            assert self.client.debug_state()["interest"] == expected

        def teardown(self) -> None:
            self.client.close()

    run_state_machine_as_test(InterestModel, settings=settings(
        max_examples=25, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    ))


def test_the_server_sees_no_interest_after_everything_is_withdrawn(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    ids = [client.subscribe(pattern, lambda m: None) for pattern in PATTERNS]
    inbox = client.open_inbox("_reply.x")
    assert client.flush(10.0) is True
    assert _server_interest(server, client) == set(PATTERNS) | {"_reply.x"}
    for sub_id in ids:
        client.unsubscribe(sub_id)
    inbox.close()
    assert client.flush(10.0) is True  # removals are lazy, flush sends them
    assert _server_interest(server, client) == set()
    assert isinstance(client.debug_state()["socket"], socket.socket)
