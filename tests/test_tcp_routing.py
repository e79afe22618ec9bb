"""Interest routing: each connection gets only what matches; replies reach only the requester."""

from __future__ import annotations

import threading
import time

from _tcp_helpers import FrameReader, frame, handshake, raw_connect, wait_until

import eventforge as ef


def _settle(server, peers):
    assert wait_until(lambda: server.stats["handshake_peers"] == peers)
    time.sleep(0.05)


def test_client_publish_reaches_other_clients_by_interest_only(tcp):
    server = tcp.server()
    a, b, c = (tcp.client(server.port) for _ in range(3))
    got_b, got_c = [], []
    b.subscribe("orders.**", got_b.append)
    c.subscribe("users.*", got_c.append)
    _settle(server, 3)
    a.send(ef.Message("orders.eu.created", 1))
    a.send(ef.Message("users.alice", 2))
    assert wait_until(lambda: got_b and got_c)
    time.sleep(0.05)
    assert [m.payload for m in got_b] == [1] and [m.payload for m in got_c] == [2]
    assert a.stats["messages_in"] == 0


def test_overlapping_patterns_deliver_one_copy(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    got = []
    client.subscribe("a.*", got.append)
    client.subscribe("a.b", got.append)
    client.subscribe("**", got.append)
    _settle(server, 1)
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
    _settle(server, 2)
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
    assert wait_until(lambda: server.stats["dropped"] == 0 and server._exact == {}, timeout=2)


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
    _settle(server, 5)
    for i in range(1000):
        server.send(ef.Message("fan.out", i))
    assert wait_until(lambda: all(len(g) == 1000 for g in got), timeout=20)
    assert all(g == list(range(1000)) for g in got)


def test_handshake_peer_without_interest_feature_gets_everything(tcp):
    server = tcp.server()
    with raw_connect(server.port) as sock:
        handshake(sock, features=["ping"])
        time.sleep(0.05)
        server.send(ef.Message("any.topic", 1))
        got = FrameReader(sock).read_message()
        assert (got["topic"], got["payload"]) == ("any.topic", 1)
