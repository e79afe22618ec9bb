"""How a TCP server runs handlers: dispatch="leader" (the default), "thread", "inline".

The default runs a handler on the thread that read its frame and lets a
standby thread take the I/O loop over when a handler blocks, so handlers may
block without stalling sockets, and each connection's messages keep their
order.  Also: writes from many threads to one connection keep each thread's
order.
"""

from __future__ import annotations

import threading
import time

import pytest
from _tcp_helpers import wait_until

import eventforge as ef


def _settle(*clients):
    """Return once the server has applied every client's interest."""
    for client in clients:
        assert client.flush(10.0)


@pytest.mark.parametrize("dispatch", ["leader", "thread", "inline"])
def test_request_reply_in_every_mode(tcp, dispatch):
    server = tcp.server(dispatch=dispatch)
    assert server.dispatch == dispatch
    queue = ef.MessageQueue(transport=server)
    queue.on("svc", lambda m: queue.reply(m, m.payload * 2))
    client = ef.MessageQueue(transport=tcp.client(server.port))
    for i in range(100):
        assert client.request("svc", i, timeout=5.0).payload == 2 * i


def test_default_is_leader_and_options_are_checked():
    assert ef.TCPServerTransport(port=0).dispatch == "leader"
    with pytest.raises(ValueError, match="max_handler_threads"):
        ef.TCPServerTransport(port=0, max_handler_threads=1)


def test_server_handler_may_block_on_a_request_to_its_own_caller(tcp):
    # The handler runs on the thread that read the request, then waits for a
    # reply that only the I/O loop can read: the standby takes the loop over.
    server = tcp.server()
    server_queue = ef.MessageQueue(transport=server)
    client = ef.MessageQueue(transport=tcp.client(server.port))
    client.on("client.double", lambda m: client.reply(m, m.payload * 2))

    @server_queue.on("outer")
    def outer(message):
        inner = server_queue.request("client.double", message.payload, timeout=5.0)
        server_queue.reply(message, inner.payload if inner else None)

    _settle(client.transport)
    for i in range(5):
        assert client.request("outer", i, timeout=5.0).payload == 2 * i


def test_a_blocked_handler_does_not_stop_other_connections(tcp):
    server = tcp.server()
    queue = ef.MessageQueue(transport=server)
    gate = threading.Event()
    queue.on("slow", lambda m: (gate.wait(10), queue.reply(m, "slow")))
    queue.on("fast", lambda m: queue.reply(m, "fast"))
    slow_client = ef.MessageQueue(transport=tcp.client(server.port))
    fast_client = ef.MessageQueue(transport=tcp.client(server.port))
    results = []
    thread = threading.Thread(target=lambda: results.append(
        slow_client.request("slow", None, timeout=10).payload))
    thread.start()
    try:
        assert wait_until(lambda: server.stats["messages_in"] >= 1)
        started = time.monotonic()
        for _ in range(20):
            assert fast_client.request("fast", None, timeout=5.0).payload == "fast"
        assert time.monotonic() - started < 5.0
        assert not results  # the slow handler is still blocked
    finally:
        gate.set()
        thread.join(10)
    assert results == ["slow"]


def test_a_connection_keeps_its_order_while_its_handler_blocks(tcp):
    server = tcp.server()
    seen = []
    first = threading.Event()

    def handler(message):
        if message.payload == 0:
            first.wait(0.2)  # long enough for the standby to take the loop over
        seen.append((message.payload, threading.current_thread().name))

    server.subscribe("seq", handler)
    client = tcp.client(server.port)
    for i in range(300):
        client.send(ef.Message("seq", i))
    assert wait_until(lambda: len(seen) == 300, timeout=10)
    assert [n for n, _ in seen] == list(range(300))
    assert all(name.startswith(f"eventforge-tcp-server-io-{server.port}") for _, name in seen)


def test_handler_threads_are_bounded_and_io_goes_on_when_all_block(tcp):
    server = tcp.server(max_handler_threads=2)
    gate = threading.Event()
    blocked = []

    def block(message):
        blocked.append(message.payload)
        gate.wait(10)

    server.subscribe("block", block)
    a, b, c = (tcp.client(server.port) for _ in range(3))
    got = []
    c.subscribe("relay", got.append)
    _settle(a, b, c)
    a.send(ef.Message("block", "a"))
    assert wait_until(lambda: blocked == ["a"])
    b.send(ef.Message("block", "b"))  # no thread left to run it: it waits its turn
    time.sleep(0.1)
    try:
        # The I/O loop still serves every socket: routing between clients works.
        a.send(ef.Message("relay", 1))
        assert wait_until(lambda: len(got) == 1)
        assert blocked == ["a"]
        names = [t.name for t in threading.enumerate()
                 if t.name.startswith(f"eventforge-tcp-server-io-{server.port}")]
        assert len(names) <= 2
    finally:
        gate.set()
    assert wait_until(lambda: blocked == ["a", "b"])


def test_close_from_a_blocked_handler_and_with_handlers_in_flight(tcp):
    server = tcp.server()
    calls = []

    def handler(message):
        calls.append(message.payload)
        if message.payload == "close":
            time.sleep(0.01)  # on the leader: the standby takes over meanwhile
            server.close()

    server.subscribe("x", handler)
    client = tcp.client(server.port)
    for i in range(50):
        client.send(ef.Message("x", i))
    client.send(ef.Message("x", "close"))
    assert wait_until(lambda: server.closed and "close" in calls, timeout=10)
    assert calls == list(range(50)) + ["close"]


def test_concurrent_server_senders_keep_their_own_order(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    got = {n: [] for n in range(4)}
    client.subscribe("seq.*", lambda m: got[int(m.topic[4:])].append(m.payload))
    _settle(client)

    def send(n):
        for i in range(500):
            server.send(ef.Message(f"seq.{n}", i))

    threads = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert wait_until(lambda: all(len(v) == 500 for v in got.values()), timeout=10)
    assert all(v == list(range(500)) for v in got.values())


def test_caller_reading_its_reply_delivers_everything_else_too(tcp):
    # A waiting caller reads the socket itself; other messages it reads on
    # the way reach their subscribers and other callers' inboxes.
    server = tcp.server()
    queue = ef.MessageQueue(transport=server)

    @queue.on("svc")
    def svc(message):
        queue.publish("event.tick", message.payload)
        queue.reply(message, message.payload)

    client = tcp.client(server.port)
    events = []
    client.subscribe("event.*", lambda m: events.append(m.payload))
    mq = ef.MessageQueue(transport=client)
    _settle(client)
    results = {}

    def ask(n):
        results[n] = [mq.request("svc", n * 1000 + i, timeout=5.0).payload for i in range(50)]

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(results[n] == [n * 1000 + i for i in range(50)] for n in range(3))
    assert wait_until(lambda: len(events) == 150)
    assert sorted(events) == sorted(v for r in results.values() for v in r)


def test_connection_lost_while_a_caller_reads(tcp):
    server = tcp.server()
    queue = ef.MessageQueue(transport=server)
    queue.on("ok", lambda m: queue.reply(m, "ok"))

    cuts = []

    @queue.on("cut")
    def cut(message):  # drop every connection instead of replying (once: it is resent)
        if not cuts:
            cuts.append(message.id)
            server.debug_cut_connections("cut by the test")

    client = tcp.client(server.port, backoff_initial=0.01)
    mq = ef.MessageQueue(transport=client)
    assert mq.request("ok", None, timeout=5.0).payload == "ok"
    started = time.monotonic()
    with pytest.raises(ef.ConnectionLostError, match="lost before the reply came"):
        mq.request("cut", None, timeout=30.0)  # the caller learns at once, not after 30 s
    assert time.monotonic() - started < 15.0
    assert wait_until(lambda: client.stats["reconnects"] >= 1)
    assert mq.request("ok", None, timeout=5.0).payload == "ok"
