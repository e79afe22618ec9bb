"""Interest routing: each connection gets only what matches; replies reach only the requester."""

from __future__ import annotations

import threading

from _tcp_helpers import FrameReader, frame, handshake, message_frame, raw_connect, wait_until

import eventforge as ef


def _settle(*clients):
    """Return once the server has applied every client's interest."""
    for client in clients:
        assert client.flush(10.0)


def test_client_publish_reaches_other_clients_by_interest_only(tcp):
    server = tcp.server()
    a, b, c = (tcp.client(server.port) for _ in range(3))
    got_b, got_c = [], []
    b.subscribe("orders.**", got_b.append)
    c.subscribe("users.*", got_c.append)
    _settle(a, b, c)
    a.send(ef.Message("orders.eu.created", 1))
    a.send(ef.Message("users.alice", 2))
    # End markers: a message routed where it should not go would arrive before them.
    a.send(ef.Message("orders.end", "end"))
    a.send(ef.Message("users.end", "end"))
    assert wait_until(lambda: len(got_b) == 2 and len(got_c) == 2)
    assert [m.payload for m in got_b] == [1, "end"] and [m.payload for m in got_c] == [2, "end"]
    assert a.stats["messages_in"] == 0


def test_overlapping_patterns_deliver_one_copy(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    got = []
    client.subscribe("a.*", got.append)
    client.subscribe("a.b", got.append)
    client.subscribe("**", got.append)
    _settle(client)
    server.send(ef.Message("a.b", "x"))
    assert wait_until(lambda: len(got) == 3)
    assert client.stats["messages_in"] == 1  # one frame on the wire, three local handlers


def test_replies_reach_only_the_requester(tcp):
    server = tcp.server()
    queue = ef.MessageQueue(transport=server)
    queue.on("svc.who", lambda m: queue.reply(m, m.payload))
    clients = [tcp.client(server.port) for _ in range(4)]
    results = {}

    def ask(n):
        mq = ef.MessageQueue(transport=clients[n])
        results[n] = [mq.request("svc.who", [n, i], timeout=5.0).payload for i in range(50)]

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for n in range(4):
        assert results[n] == [[n, i] for i in range(50)]
        assert clients[n].stats["messages_in"] == 50  # nobody else's replies
        assert clients[n].stats["dropped"] == 0


def test_server_publish_reaches_local_subscribers_and_interested_clients(tcp):
    server = tcp.server()
    local = []
    server.subscribe("metrics.*", local.append)
    interested, other = tcp.client(server.port), tcp.client(server.port)
    got = []
    interested.subscribe("metrics.cpu", got.append)
    other.subscribe("logs.*", lambda m: None)
    _settle(interested, other)
    server.send(ef.Message("metrics.cpu", 0.5))
    assert [m.payload for m in local] == [0.5]
    assert wait_until(lambda: got)
    assert other.stats["messages_in"] == 0


def test_client_gets_its_own_message_when_subscribed(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    got = []
    client.subscribe("echo.*", got.append)
    client.send(ef.Message("echo.me", "loop"))
    assert wait_until(lambda: got)
    assert got[0].payload == "loop"


def test_inbox_interest_is_registered_before_the_request(tcp):
    # The handler replies from inside the server's dispatch of the request;
    # the interest frame travels ahead of the request on the same connection.
    server = tcp.server()
    queue = ef.MessageQueue(transport=server)
    queue.on("fast", lambda m: queue.reply(m, "now"))
    client = ef.MessageQueue(transport=tcp.client(server.port))
    for _ in range(300):
        assert client.request("fast", None, timeout=5.0).payload == "now"
    assert wait_until(lambda: server.stats["dropped"] == 0
                      and server.debug_state()["exact"] == {}, timeout=2)


def test_raw_handshake_peer_receives_only_its_interest(tcp):
    server = tcp.server()
    with raw_connect(server.port) as sock:
        welcome = handshake(sock)
        assert welcome["version"] == 1 and welcome["auth"] is None
        sock.sendall(frame({"topic": "$interest", "payload": {"add": ["wanted.*"]}}))
        sock.sendall(frame({"topic": "$ping", "payload": {}}))
        reader = FrameReader(sock)
        assert reader.read()["topic"] == "$pong"  # interest was processed before the ping
        server.send(ef.Message("unwanted.x", 1))
        server.send(ef.Message("wanted.x", 2))
        got = reader.read_message()
        assert (got["topic"], got["payload"]) == ("wanted.x", 2)
        sock.sendall(frame({"topic": "$interest", "payload": {"add": ["bad pattern", "a.b*"]}}))
        assert wait_until(lambda: server.stats["protocol_errors"] == 2)


def test_unknown_control_frames_are_ignored_and_counted(tcp):
    server = tcp.server()
    with raw_connect(server.port) as sock:
        handshake(sock)
        sock.sendall(frame({"topic": "$future-feature", "payload": {}}))
        sock.sendall(frame({"topic": "$ping", "payload": {}}))
        assert FrameReader(sock).read()["topic"] == "$pong"
    assert server.stats["protocol_errors"] == 1


def test_acknowledgements_release_the_client_buffer(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    for i in range(500):
        client.send(ef.Message("acked", i))
    assert wait_until(lambda: client.stats["pending"] == 0)
    assert server.stats["messages_in"] == 500


def test_receive_interest_flushes_the_server_mailbox_once(tcp):
    server = tcp.server()
    for i in range(3):
        server.send(ef.Message("queue.q", i))
    assert server.stats["buffered"] == 3
    first, second = tcp.client(server.port), tcp.client(server.port)
    assert [first.receive("queue.q", timeout=5).payload for _ in range(3)] == [0, 1, 2]
    assert second.receive("queue.q", timeout=0.1) is None
    assert server.stats["buffered"] == 0


def test_fan_out_keeps_order_for_every_subscriber(tcp):
    server = tcp.server()
    clients = [tcp.client(server.port) for _ in range(5)]
    got = [[] for _ in clients]
    for n, client in enumerate(clients):
        client.subscribe("fan.*", lambda m, n=n: got[n].append(m.payload))
    _settle(*clients)
    for i in range(1000):
        server.send(ef.Message("fan.out", i))
    assert wait_until(lambda: all(len(g) == 1000 for g in got), timeout=20)
    assert all(g == list(range(1000)) for g in got)


def test_handshake_peer_without_interest_feature_gets_everything(tcp):
    server = tcp.server()
    with raw_connect(server.port) as sock:
        handshake(sock, features=["ping"])  # $welcome: the server applied the $hello
        server.send(ef.Message("any.topic", 1))
        got = FrameReader(sock).read_message()
        assert (got["topic"], got["payload"]) == ("any.topic", 1)


# -- feature "reply": a request's inbox is implied by its reply_to ---------------


def test_requests_send_no_interest_frame_for_their_inbox(tcp, monkeypatch):
    server = tcp.server()
    queue = ef.MessageQueue(transport=server)
    queue.on("svc", lambda m: queue.reply(m, m.payload))
    interest_frames = []
    original = server._protocol.on_interest
    monkeypatch.setattr(server._protocol, "on_interest",
                        lambda conn, payload: (interest_frames.append(payload),
                                               original(conn, payload)))
    client = tcp.client(server.port)
    assert "reply" in client.debug_state()["features"]
    mq = ef.MessageQueue(transport=client)
    for i in range(100):
        assert mq.request("svc", i, timeout=5.0).payload == i
    # Only withdrawals, batched (at most one frame per tick), no adds.
    assert all("add" not in p for p in interest_frames)
    assert len(interest_frames) <= 5
    # withdrawn within a tick
    assert wait_until(lambda: server.debug_state()["exact"] == {}, timeout=2)
    assert client.stats["interest"] == 0


def test_implicit_reply_route_reaches_only_the_requester(tcp):
    server = tcp.server()
    queue = ef.MessageQueue(transport=server)
    queue.on("svc", lambda m: queue.reply(m, "yours"))
    with raw_connect(server.port) as asker, raw_connect(server.port) as other:
        assert "reply" in handshake(asker, ["interest", "reply"])["features"]
        handshake(other, ["interest", "reply"])
        other.sendall(frame({"topic": "$interest", "payload": {"add": ["_reply.*"]}}))
        other_reader = FrameReader(other)
        other.sendall(frame({"topic": "$ping", "payload": {}}))
        assert other_reader.read()["topic"] == "$pong"
        # No $interest: the reply_to of the request is enough.
        asker.sendall(message_frame("svc", None, reply_to="_reply.raw-7"))
        reply = FrameReader(asker).read_message()
        assert (reply["topic"], reply["payload"]) == ("_reply.raw-7", "yours")
        # Inbox topics are private: a '_reply.*' pattern does not see the reply.
        other.sendall(frame({"topic": "$ping", "payload": {}}))
        assert other_reader.read()["topic"] == "$pong"  # the next frame: no reply before it
        asker.sendall(frame({"topic": "$interest", "payload": {"remove": ["_reply.raw-7"]}}))
        assert wait_until(lambda: "_reply.raw-7" not in server.debug_state()["exact"])


def test_implicit_routes_are_bounded_and_cleared_with_the_connection(tcp):
    server = tcp.server(max_interest=10)
    with raw_connect(server.port) as sock:
        handshake(sock, ["interest", "reply"])
        for i in range(15):
            sock.sendall(message_frame("nobody.listens", i, reply_to=f"_reply.r{i}"))
        sock.sendall(message_frame("nobody.listens", 0, reply_to="_reply.bad topic"))
        assert wait_until(lambda: server.stats["messages_in"] == 16)
        assert len([t for t in server.debug_state()["exact"] if t.startswith("_reply.")]) == 10
        assert server.stats["protocol_errors"] == 6  # 5 over max_interest, 1 invalid
    assert wait_until(lambda: server.debug_state()["exact"] == {})


def test_peers_without_the_reply_feature_use_explicit_interest(tcp):
    server = tcp.server()
    hello = server._protocol.on_hello

    def old_hello(conn, payload):  # a server from before the feature
        payload = dict(payload, features=[f for f in payload["features"] if f != "reply"])
        hello(conn, payload)

    server._protocol.on_hello = old_hello
    queue = ef.MessageQueue(transport=server)
    queue.on("svc", lambda m: queue.reply(m, m.payload + 1))
    client = tcp.client(server.port)
    assert client.mode == "handshake" and not client.debug_state()["implicit"]
    mq = ef.MessageQueue(transport=client)
    for i in range(20):
        assert mq.request("svc", i, timeout=5.0).payload == i + 1
    # A frame-only peer's request is answered too: its reply_to routes the
    # reply to that peer alone, until it disconnects.
    with raw_connect(server.port) as sock:
        sock.sendall(message_frame("svc", 1, reply_to="_reply.frame-only"))
        assert FrameReader(sock).read_message()["payload"] == 2
        assert "_reply.frame-only" in server.debug_state()["exact"]
    assert wait_until(lambda: "_reply.frame-only" not in server.debug_state()["exact"])


def test_an_inbox_not_named_by_a_request_is_told_to_the_server(tcp):
    server = tcp.server()
    client, sender = tcp.client(server.port), tcp.client(server.port)
    inbox = client.open_inbox("_reply.handed-out")
    try:
        # Not used as a reply_to: the interest goes out with the next frame
        # (or the next tick), so a message sent to it by anyone arrives.
        client.send(ef.Message("unrelated.topic", None))
        assert wait_until(lambda: "_reply.handed-out" in server.debug_state()["exact"])
        sender.send(ef.Message("_reply.handed-out", "hi"))
        got = inbox.get(5.0)
        assert got is not None and got.payload == "hi"
    finally:
        inbox.close()
    assert wait_until(lambda: "_reply.handed-out" not in server.debug_state()["exact"])
    lone = client.open_inbox("_reply.lonely")  # no frame sent after it: a tick tells
    assert wait_until(lambda: "_reply.lonely" in server.debug_state()["exact"])
    lone.close()
