"""TCPServerTransport keeps its promises when things go wrong (issue 7, server side).

Acknowledgement after handling and a bounded close, dispatch that survives any
exception, `$flush`, request TTLs, the client's frame limit, inbox privacy and
pub-sub without subscribers.  Real sockets on 127.0.0.1 throughout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import pytest
from _tcp_helpers import (
    FrameReader,
    closed_by_peer,
    frame,
    handshake,
    message_frame,
    raw_connect,
    wait_until,
)

import eventforge as ef

MODES = ["leader", "thread", "inline"]


def _server_threads(port: int) -> list:
    names = (f"eventforge-tcp-server-io-{port}", "eventforge-tcp-server-dispatch")
    return [t.name for t in threading.enumerate() if t.name.startswith(names) and t.is_alive()]


def _hello(sock, features, **extra) -> dict:
    """The plain handshake on a raw socket, with extra $hello fields; the welcome payload."""
    payload = {"version": 1, "features": features, "nonce": os.urandom(32).hex(), **extra}
    sock.sendall(frame({"topic": "$hello", "payload": payload}))
    reply = FrameReader(sock).read(5.0)
    assert reply is not None and reply["topic"] == "$welcome", reply
    return reply["payload"]


def _applied(sock, reader: FrameReader) -> None:
    """Wait until the server applied what ``sock`` sent so far (a $flush round trip)."""
    sock.sendall(frame({"topic": "$flush", "payload": {"id": 0}}))
    assert _read_until(reader, "$flushed"), "no $flushed"


def _read_until(reader: FrameReader, topic: str, timeout: float = 5.0) -> list:
    """Frames read up to and including the first on ``topic`` ([] if it never came)."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        got = reader.read(max(0.0, deadline - time.monotonic()))
        if got is None:
            return []
        seen.append(got)
        if got["topic"] == topic:
            return seen


# -- 1. acknowledge after handling; close(timeout) ---------------------------------------


@pytest.mark.parametrize("dispatch", MODES)
def test_a_backlog_survives_graceful_close_and_restart(tcp, dispatch):
    """4,000 messages, a slow handler, close mid-backlog, restart: none is lost."""
    total = 4000
    first, second = set(), set()

    def slow(message):
        time.sleep(0.002)
        first.add(message.payload)

    server = tcp.server(dispatch=dispatch)
    server.subscribe("work.item", slow)
    port = server.port
    client = tcp.client(port, backoff_initial=0.02, backoff_max=0.2)
    for i in range(total):
        client.send(ef.Message("work.item", i))
    assert wait_until(lambda: len(first) >= 100, timeout=20)
    started = time.monotonic()
    server.close(timeout=1.0)
    took = time.monotonic() - started
    assert took < 1.0 + 4.0, f"close(timeout=1.0) took {took:.2f} s"  # generous slack
    assert _server_threads(port) == [], "close() left a server thread running"
    assert len(first) < total, "the backlog was too small to test anything"

    restarted = tcp.server(port=port, dispatch=dispatch)
    restarted.subscribe("work.item", lambda message: second.add(message.payload))
    assert wait_until(lambda: len(first | second) == total, timeout=30), (
        f"lost {total - len(first | second)} of {total} messages")
    # Acknowledged means handled: what the first server acknowledged was not resent,
    # and what it did not handle was.
    assert wait_until(lambda: client.stats["pending"] == 0, timeout=10)
    assert not (set(range(total)) - first) - second


@pytest.mark.parametrize("dispatch", ["leader", "thread"])  # inline: the held call blocks I/O
def test_acknowledgements_count_handled_frames_not_read_ones(tcp, dispatch):
    gate = threading.Event()
    server = tcp.server(dispatch=dispatch)
    server.subscribe("held", lambda message: gate.wait(10))
    server.subscribe("free", lambda message: None)
    sock = raw_connect(server.port)
    _hello(sock, ["ack"])
    reader = FrameReader(sock)
    sock.sendall(message_frame("free", 1) + message_frame("held", 2) + message_frame("free", 3))
    first = _read_until(reader, "$ack")
    assert first and first[-1]["payload"]["n"] == 1  # the first frame is handled ...
    assert reader.read(0.3) is None  # ... the second is not, so nothing more is acknowledged
    gate.set()
    final = _read_until(reader, "$ack")
    assert final and final[-1]["payload"]["n"] == 3
    sock.close()


def test_close_with_a_blocked_handler_returns_within_its_timeout(tcp, caplog):
    release = threading.Event()
    server = tcp.server()
    server.subscribe("stuck", lambda message: release.wait(10))
    client = tcp.client(server.port)
    client.send(ef.Message("stuck"))
    client.send(ef.Message("stuck"))
    assert wait_until(lambda: server.stats["dispatch_backlog"] == 1)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="eventforge"):
        server.close(timeout=0.5)
    assert time.monotonic() - started < 0.5 + 4.0  # generous slack
    assert server.stats["unhandled_at_close"] == 1
    assert "still running after close()" in caplog.text  # the blocked handler is named
    release.set()
    client.close(timeout=0.5)  # its unacknowledged frame has nowhere to go


# -- 2. dispatch survives anything ---------------------------------------------------------


@pytest.mark.parametrize("dispatch", MODES)
@pytest.mark.parametrize("error", [asyncio.CancelledError, SystemExit, KeyboardInterrupt])
def test_a_handler_raising_a_base_exception_fails_only_that_call(tcp, dispatch, error, caplog):
    got = []

    def handler(message):
        if message.payload == "boom":
            raise error()
        got.append(message.payload)

    server = tcp.server(dispatch=dispatch)
    server.subscribe("jobs.*", handler)
    one, two = tcp.client(server.port), tcp.client(server.port)
    with caplog.at_level(logging.ERROR, logger="eventforge"):
        one.send(ef.Message("jobs.a", "boom"))
        one.send(ef.Message("jobs.a", "same connection"))
        two.send(ef.Message("jobs.b", "other connection"))
        assert wait_until(lambda: len(got) == 2), got
        two.send(ef.Message("jobs.a", "boom"))
        one.send(ef.Message("jobs.a", "later"))
        assert wait_until(lambda: "later" in got), got
    assert server.stats["handler_errors"] == 2
    assert error.__name__ in caplog.text
    # The I/O loop still serves: a request/reply round trip over it works.
    with ef.MessageQueue(transport=server) as queue:
        queue.on("svc.echo", lambda message: queue.reply(message, message.payload))
        with ef.MessageQueue(transport=tcp.client(server.port)) as caller:
            assert caller.request("svc.echo", "ping", timeout=5.0).payload == "ping"


# -- 4. $flush / $flushed -----------------------------------------------------------------


def test_flush_is_answered_after_earlier_frames_were_handled(tcp):
    gate = threading.Event()
    server = tcp.server()
    server.subscribe("slow", lambda message: gate.wait(10))
    sock = raw_connect(server.port)
    welcome = _hello(sock, ["interest", "ack", "flush"])
    assert "flush" in welcome["features"]
    reader = FrameReader(sock)
    sock.sendall(frame({"topic": "$flush", "payload": {"id": 1}}))
    assert reader.read(5.0) == {"topic": "$flushed", "payload": {"id": 1}}  # nothing pending

    sock.sendall(frame({"topic": "$interest", "payload": {"add": ["news.*"]}})
                 + message_frame("slow") + frame({"topic": "$flush", "payload": {"id": 2}}))
    assert reader.read(0.3) is None  # the handler of an earlier frame still runs
    gate.set()
    frames = _read_until(reader, "$flushed")
    assert frames[-1] == {"topic": "$flushed", "payload": {"id": 2}}
    assert {"topic": "$ack", "payload": {"n": 1}} in frames[:-1]  # acknowledged first
    server.send(ef.Message("news.today", "hi"))  # the interest was applied before $flushed
    assert reader.read_message(5.0)["topic"] == "news.today"
    sock.close()


def test_flush_needs_the_feature_and_an_int_id(tcp):
    server = tcp.server()
    sock = raw_connect(server.port)
    _hello(sock, ["interest"])  # no "flush"
    reader = FrameReader(sock)
    sock.sendall(frame({"topic": "$flush", "payload": {"id": 1}}))
    assert wait_until(lambda: server.stats["protocol_errors"] == 1)
    sock.close()
    sock = raw_connect(server.port)
    _hello(sock, ["flush"])
    reader = FrameReader(sock)
    sock.sendall(frame({"topic": "$flush", "payload": {"id": "one"}})
                 + frame({"topic": "$flush", "payload": {"id": 3}}))
    assert reader.read(5.0) == {"topic": "$flushed", "payload": {"id": 3}}
    assert server.stats["protocol_errors"] == 2
    sock.close()


# -- 5. request TTL ------------------------------------------------------------------------


@pytest.mark.parametrize("dispatch", MODES)
def test_a_request_whose_ttl_ran_out_before_dispatch_is_skipped(tcp, dispatch, caplog):
    gate = threading.Event()
    ran = []

    def handler(message):
        ran.append(message.payload)
        if message.payload == "first":
            gate.wait(10)

    server = tcp.server(dispatch=dispatch)
    server.subscribe("svc", handler)
    sock = raw_connect(server.port)
    _hello(sock, ["ack"])
    # One write: the server reads the five frames together, whatever the mode.
    sock.sendall(
        message_frame("svc", "first")
        + message_frame("svc", "late", headers={"_ttl_ms": 50}, reply_to="_reply.x")
        + message_frame("svc", "patient", headers={"_ttl_ms": 60000}, reply_to="_reply.y")
        + message_frame("svc", "odd ttl", headers={"_ttl_ms": "soon"})
        + message_frame("svc", "plain"))
    assert wait_until(lambda: ran == ["first"])
    time.sleep(0.1)  # at least the 50 ms TTL passes while the first handler blocks
    with caplog.at_level(logging.WARNING, logger="eventforge"):
        gate.set()
        assert wait_until(lambda: "plain" in ran)
    assert ran == ["first", "patient", "odd ttl", "plain"]
    assert server.stats["expired"] == 1
    assert "_ttl_ms ran out" in caplog.text
    acks = _read_until(FrameReader(sock), "$ack")
    while acks and acks[-1]["payload"]["n"] < 5:  # skipped, yet acknowledged
        acks = _read_until(FrameReader(sock), "$ack")
    assert acks and acks[-1]["payload"]["n"] == 5
    sock.close()


# -- 6. the client's max_frame_size --------------------------------------------------------


def test_frames_over_the_clients_limit_are_dropped_for_that_client_only(tcp, caplog):
    server = tcp.server()
    small = raw_connect(server.port)
    _hello(small, ["interest", "flush"], max_frame_size=300)
    small.sendall(frame({"topic": "$interest", "payload": {"add": ["big.*"]}}))
    reader = FrameReader(small)
    _applied(small, reader)
    other = tcp.client(server.port)
    got = []
    other.subscribe("big.*", got.append)
    assert other.flush(5.0)
    with caplog.at_level(logging.WARNING, logger="eventforge"):
        server.send(ef.Message("big.one", "x" * 400))
        server.send(ef.Message("big.two", "y"))
    first = reader.read_message(5.0)
    assert first is not None and first["topic"] == "big.two"  # the connection stays
    assert wait_until(lambda: len(got) == 2)  # the other client took both
    assert server.stats["oversize_for_peer"] == 1
    assert "over the max_frame_size=300 it accepts" in caplog.text
    small.close()


# -- 3. inbox privacy; refusing frame-only peers --------------------------------------------


def test_a_globstar_subscriber_gets_no_other_clients_replies(tcp):
    server = tcp.server()
    responder = ef.MessageQueue(transport=server)
    responder.on("svc.echo", lambda message: responder.reply(message, message.payload))
    snoop_client = tcp.client(server.port)
    snooped = []
    snoop_client.subscribe("**", snooped.append)
    with raw_connect(server.port) as raw_snoop, raw_connect(server.port) as frame_only:
        handshake(raw_snoop, ["interest", "reply", "flush"])
        raw_snoop.sendall(frame({"topic": "$interest",
                                 "payload": {"add": ["**", "_reply.*", "_rpc_reply.**"]}}))
        raw_reader = FrameReader(raw_snoop)
        frame_reader = FrameReader(frame_only)
        frame_only.sendall(message_frame("hello.there", "I am frame-only"))
        assert wait_until(lambda: server.stats["frame_peers"] == 1)
        _applied(raw_snoop, raw_reader)
        assert snoop_client.flush(5.0)
        with ef.MessageQueue(transport=tcp.client(server.port)) as asker:
            for i in range(5):
                assert asker.request("svc.echo", i, timeout=5.0).payload == i
        # The frame-only peer asks too, and gets its own reply (its reply_to routes it).
        frame_only.sendall(message_frame("svc.echo", "mine", reply_to="_reply.frame-only-1"))
        frames = []
        while True:
            got = frame_reader.read_message(5.0)
            assert got is not None, frames
            frames.append(got["topic"])
            if got["topic"].startswith("_reply."):
                break
        assert frames[-1] == "_reply.frame-only-1"
        assert all(not t.startswith("_reply.") for t in frames[:-1]), frames  # nobody else's
        raw_topics = []
        while True:
            got = raw_reader.read_message(0.3)
            if got is None:
                break
            raw_topics.append(got["topic"])
        assert raw_topics.count("svc.echo") == 6  # it does see the requests ...
        assert not [t for t in raw_topics if t.startswith(ef.INBOX_PREFIXES)]  # ... not replies
    assert [m.topic for m in snooped if m.topic.startswith(ef.INBOX_PREFIXES)] == []
    assert len([m for m in snooped if m.topic == "svc.echo"]) == 6


def test_a_peer_naming_the_exact_inbox_topic_gets_it(tcp):
    server = tcp.server()
    with raw_connect(server.port) as sock:
        handshake(sock, ["interest", "flush"])
        sock.sendall(frame({"topic": "$interest", "payload": {"add": ["_rpc_reply.abc"]}}))
        reader = FrameReader(sock)
        _applied(sock, reader)
        server.send(ef.Message("_rpc_reply.abc", "for you"))
        got = reader.read_message(5.0)
        assert (got["topic"], got["payload"]) == ("_rpc_reply.abc", "for you")


def test_frame_only_routes_forget_the_oldest_inbox_beyond_max_interest(tcp):
    server = tcp.server(max_interest=10)
    with raw_connect(server.port) as sock:
        for i in range(15):
            sock.sendall(message_frame("nobody.listens", i, reply_to=f"_reply.r{i}"))
        assert wait_until(lambda: server.stats["messages_in"] == 15)
        inboxes = sorted(t for t in server.debug_state()["exact"] if t.startswith("_reply."))
        assert inboxes == sorted(f"_reply.r{i}" for i in range(5, 15))
        assert server.stats["protocol_errors"] == 0
        server.send(ef.Message("_reply.r14", "latest"))
        got = FrameReader(sock).read_message(5.0)
        assert (got["topic"], got["payload"]) == ("_reply.r14", "latest")
    assert wait_until(lambda: server.debug_state()["exact"] == {})


def test_allow_frame_only_false_refuses_peers_without_hello(tcp, caplog):
    server = tcp.server(allow_frame_only=False, handshake_timeout=0.5)
    assert server.allow_frame_only is False
    assert tcp.server(secret="k").allow_frame_only is False  # a secret always refuses them
    client = tcp.client(server.port)
    got = []
    server.subscribe("jobs.*", got.append)
    with caplog.at_level(logging.WARNING, logger="eventforge"):
        with raw_connect(server.port) as talker, raw_connect(server.port) as silent:
            talker.sendall(message_frame("jobs.sneak", "no hello"))
            refusal = FrameReader(talker).read(5.0)
            assert refusal["topic"] == "$error" and refusal["payload"]["code"] == "protocol"
            assert closed_by_peer(talker)
            server.send(ef.Message("jobs.news", "not for the silent one"))
            assert FrameReader(silent).read(0.3) is None  # no broadcast before $hello
            assert closed_by_peer(silent)  # and the handshake timeout applies to it
    assert server.stats["frame_only_refused"] == 1
    assert server.stats["handshake_timeouts"] == 1
    assert "send $hello first" in caplog.text
    client.send(ef.Message("jobs.ok", "handshake peers are welcome"))
    assert wait_until(lambda: [m.payload for m in got] == ["not for the silent one",
                                                           "handshake peers are welcome"])


# -- 7. pub-sub with nobody listening --------------------------------------------------------


def test_server_publish_without_subscribers_never_raises_and_stays_bounded(tcp):
    server = tcp.server()
    for i in range(1001):  # the 1,001st publish to one topic used to raise
        server.send(ef.Message("nobody.listens", i))
    stats = server.stats
    assert stats["buffered"] == 1000 and stats["dropped_topic_full"] == 1
    assert server.receive("nobody.listens", timeout=0).payload == 1  # the oldest was dropped
    for i in range(50000):  # distinct topics: bounded by the total cap, not per topic
        server.send(ef.Message(f"stray.{i}", i))
    stats = server.stats
    assert stats["buffered"] <= 10000 and stats["mailboxes"] <= 10000
    assert stats["dropped_buffer_full"] >= 50000 + 999 - 10000


def test_client_publishes_without_subscribers_never_fail_on_the_server(tcp, caplog):
    server = tcp.server()
    client = tcp.client(server.port)
    with caplog.at_level(logging.WARNING, logger="eventforge"):
        for i in range(3000):
            client.send(ef.Message("nobody.listens", i))
        assert wait_until(lambda: server.stats["messages_in"] == 3000)
    assert server.stats["buffered"] == 1000
    assert server.stats["dropped_topic_full"] == 2000
    assert len(caplog.records) <= 2  # logged once per topic per interval, not per message
    assert wait_until(lambda: client.stats["pending"] == 0)  # and every frame acknowledged
    assert server.receive("nobody.listens", timeout=0).payload == 2000


@pytest.mark.parametrize("dispatch", MODES)
def test_close_from_a_server_handler_in_every_mode(tcp, dispatch):
    server = tcp.server(dispatch=dispatch)
    port = server.port
    handled, closed = [], threading.Event()

    def handler(message):
        handled.append(message.payload)
        if message.payload == 0:
            server.close(timeout=1.0)
            closed.set()

    server.subscribe("stop", handler)
    client = tcp.client(port)  # it keeps its frames and reconnects after the close
    for i in range(50):
        client.send(ef.Message("stop", i))
    assert closed.wait(5)
    assert wait_until(lambda: _server_threads(port) == [])
    assert server.closed and handled[0] == 0
    client.close(timeout=0.5)  # its unacknowledged frames have nowhere to go
