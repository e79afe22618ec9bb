"""TCP transports under MessageQueue: pub-sub, request-reply, receive, both directions."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from _tcp_helpers import wait_until

import eventforge as ef


def test_start_binds_loopback_and_picks_a_free_port(tcp):
    server = tcp.server()
    host, port = server.address
    assert host == "127.0.0.1" and port > 0 and server.port == port
    assert ef.TCPServerTransport().host == "127.0.0.1"  # the default bind address
    assert ef.TCPServerTransport(port=0).address is None  # not started


def test_import_paths_of_the_original():
    from eventforge.transports.tcp import TCPClientTransport, TCPServerTransport

    assert TCPServerTransport is ef.TCPServerTransport
    assert TCPClientTransport is ef.TCPClientTransport


def test_connect_refused_is_a_connection_error(tcp):
    server = tcp.server()
    port = server.port
    server.close()
    client = ef.TCPClientTransport("127.0.0.1", port)
    with pytest.raises(ConnectionError):
        client.connect(1.0)
    client.close()


def test_send_before_connect_and_after_close(tcp):
    server = tcp.server()
    client = tcp.client(server.port, connect=False)
    with pytest.raises(ef.ConnectionLostError, match="connect"):
        client.send(ef.Message("a.b", 1))
    client.connect(5.0)
    client.close()
    with pytest.raises(ef.TransportClosedError):
        client.send(ef.Message("a.b", 1))
    server.close()
    with pytest.raises(RuntimeError):
        server.send(ef.Message("a.b", 1))


def test_client_publish_reaches_server_subscribers(tcp):
    server = tcp.server()
    got = []
    ef.MessageQueue(transport=server).subscribe("events.*", got.append)
    queue = ef.MessageQueue(transport=tcp.client(server.port))
    msg_id = queue.publish("events.user", {"action": "login"}, source="test")
    assert wait_until(lambda: got)
    assert got[0].id == msg_id and got[0].payload == {"action": "login"}
    assert got[0].headers == {"source": "test"}


def test_server_publish_reaches_matching_client_subscribers_and_local(tcp):
    server = tcp.server()
    local = []
    server_queue = ef.MessageQueue(transport=server)
    server_queue.subscribe("orders.**", local.append)
    client = tcp.client(server.port)
    got = []
    ef.MessageQueue(transport=client).subscribe("orders.*.created", got.append)
    assert client.flush(10.0)  # the server has the interest now
    server_queue.publish("orders.eu.created", 1)
    server_queue.publish("orders.eu.paid", 2)
    assert wait_until(lambda: got)
    assert [m.payload for m in got] == [1]
    assert [m.payload for m in local] == [1, 2]  # synchronous, in the publisher's thread


def test_request_reply_client_to_server(tcp):
    server = tcp.server()
    server_queue = ef.MessageQueue(transport=server)

    @server_queue.on("math.add")
    def add(message):
        server_queue.reply(message, message.payload["a"] + message.payload["b"])

    queue = ef.MessageQueue(transport=tcp.client(server.port))
    response = queue.request("math.add", {"a": 10, "b": 20}, timeout=5.0)
    assert response is not None and response.payload == 30
    for i in range(200):
        assert queue.request("math.add", {"a": i, "b": 1}, timeout=5.0).payload == i + 1
    assert server.stats["inboxes"] == 0


def test_request_reply_server_to_client(tcp):
    server = tcp.server()
    client_queue = ef.MessageQueue(transport=tcp.client(server.port))

    @client_queue.on("client.echo")
    def echo(message):
        client_queue.reply(message, {"echo": message.payload})

    assert client_queue.transport.flush(10.0)
    server_queue = ef.MessageQueue(transport=server)
    response = server_queue.request("client.echo", "hi", timeout=5.0)
    assert response is not None and response.payload == {"echo": "hi"}
    assert server.stats["inboxes"] == 0


def test_handler_on_the_same_client_answers_its_own_request(tcp):
    server = tcp.server()
    queue = ef.MessageQueue(transport=tcp.client(server.port))

    @queue.on("self.add")
    def add(message):
        queue.reply(message, message.payload + 1)

    assert queue.request("self.add", 41, timeout=5.0).payload == 42


def test_handler_may_block_on_a_request_over_the_same_connection(tcp):
    server = tcp.server()
    server_queue = ef.MessageQueue(transport=server)
    server_queue.on("inner", lambda m: server_queue.reply(m, "inner-ok"))
    queue = ef.MessageQueue(transport=tcp.client(server.port))

    @queue.on("outer")
    def outer(message):  # runs on the client's dispatcher thread
        inner = queue.request("inner", None, timeout=5.0)
        queue.reply(message, inner.payload if inner else None)

    assert queue.transport.flush(10.0)
    response = server_queue.request("outer", None, timeout=5.0)
    assert response is not None and response.payload == "inner-ok"


def test_receive_on_client_and_server(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    # send-then-receive across the wire: the server keeps it until a client asks
    server.send(ef.Message("jobs.a", 1))
    server.send(ef.Message("jobs.a", 2))
    first = client.receive("jobs.a", timeout=5.0)
    second = client.receive("jobs.a", timeout=5.0)
    assert (first.payload, second.payload) == (1, 2)
    assert client.receive("jobs.a", timeout=0.05) is None
    # client -> server receive
    client.send(ef.Message("to.server", "x"))
    got = server.receive("to.server", timeout=5.0)
    assert got is not None and got.payload == "x"
    with pytest.raises(ValueError):
        client.receive("jobs.*", timeout=0.1)


def test_receive_timeout_is_honoured(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    started = time.monotonic()
    assert client.receive("nothing.here", timeout=0.2) is None
    assert 0.15 <= time.monotonic() - started < 0.5


def test_async_receive_and_request(tcp):
    server = tcp.server()
    server_queue = ef.MessageQueue(transport=server)
    server_queue.on("svc", lambda m: server_queue.reply(m, m.payload * 2))
    queue = ef.MessageQueue(transport=tcp.client(server.port))

    async def main():
        replies = await asyncio.gather(
            *(queue.request_async("svc", i, timeout=5.0) for i in range(20))
        )
        assert [r.payload for r in replies] == [i * 2 for i in range(20)]
        waiter = asyncio.ensure_future(queue.receive_async("async.topic", timeout=5.0))
        await asyncio.sleep(0)  # the receiver registers; a message sent before its
        # interest reaches the server waits in the server's mailbox for it
        server.send(ef.Message("async.topic", "late"))
        got = await waiter
        assert got.payload == "late"
        assert await queue.receive_async("async.none", timeout=0.1) is None

    asyncio.run(main())


def test_unsubscribe_withdraws_interest(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    got = []
    sub = client.subscribe("news.*", got.append)
    assert client.flush(10.0)
    server.send(ef.Message("news.a", 1))
    assert wait_until(lambda: got)
    assert client.unsubscribe(sub) is True
    assert client.unsubscribe(sub) is False
    # the removal is not urgent: it leaves with the next $interest or on a tick
    assert wait_until(lambda: server.debug_state()["patterns"] == 0, timeout=2)
    before = server.stats["messages_out"]
    server.send(ef.Message("news.b", 2))
    assert server.stats["messages_out"] == before  # not routed any more
    assert [m.payload for m in got] == [1]


def test_ordering_per_connection(tcp):
    server = tcp.server()
    got = []
    server.subscribe("seq", lambda m: got.append(m.payload))
    client = tcp.client(server.port)
    for i in range(5000):
        client.send(ef.Message("seq", i))
    assert wait_until(lambda: len(got) == 5000, timeout=20)
    assert got == list(range(5000))


def test_send_from_many_threads_never_interleaves(tcp):
    server = tcp.server()
    got = []
    server.subscribe("t.*", lambda m: got.append((m.topic, m.payload)))
    client = tcp.client(server.port)
    payload = "x" * 3000  # frames larger than one small write

    def worker(n):
        for i in range(300):
            client.send(ef.Message(f"t.{n}", [i, payload]))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert wait_until(lambda: len(got) == 2400, timeout=20)
    assert server.stats["frame_errors"] == 0 if "frame_errors" in server.stats else True
    for n in range(8):
        assert [p[0] for topic, p in got if topic == f"t.{n}"] == list(range(300))


def test_large_payload_round_trip_and_size_limit(tcp):
    server = tcp.server(max_frame_size=2 * 1024 * 1024)
    server_queue = ef.MessageQueue(transport=server)
    server_queue.on("big", lambda m: server_queue.reply(m, m.payload))
    client = tcp.client(server.port, max_frame_size=2 * 1024 * 1024)
    queue = ef.MessageQueue(transport=client)
    blob = "é" * (700 * 1024)
    assert queue.request("big", blob, timeout=10.0).payload == blob
    with pytest.raises(ef.FrameTooLargeError):
        client.send(ef.Message("big", "x" * (2 * 1024 * 1024)))
    with pytest.raises(TypeError):
        client.send(ef.Message("big", float("nan")))


def test_server_handler_errors_are_isolated_and_counted(tcp):
    server = tcp.server()
    errors = []
    server_queue = ef.MessageQueue(transport=server, on_error=lambda exc, m: errors.append(exc))

    @server_queue.on("boom")
    def boom(message):
        raise ValueError("boom")

    ok = []
    server_queue.on("boom", ok.append)
    client = tcp.client(server.port)
    client.send(ef.Message("boom", 1))
    assert wait_until(lambda: ok and errors)
    assert server_queue.stats["handler_errors"] == 1


def test_stats_and_repr(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    client.send(ef.Message("s.t", 1))
    assert wait_until(lambda: server.stats["messages_in"] == 1)
    stats = server.stats
    for key in ("connections", "accepted", "messages_in", "bytes_in", "handshake_peers"):
        assert key in stats
    assert client.stats["connected"] is True and client.stats["messages_out"] == 1
    assert client.mode == "handshake"
    assert "TCPServerTransport" in repr(server) and "TCPClientTransport" in repr(client)


def test_close_is_idempotent_and_wakes_receivers(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    results = []
    thread = threading.Thread(target=lambda: results.append(client.receive("x.y", timeout=10)))
    thread.start()
    time.sleep(0.1)
    client.close()
    client.close()
    thread.join(5)
    assert results == [None]
    server.close()
    server.close()


SERVER_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import eventforge as ef
server = ef.TCPServerTransport("127.0.0.1", 0).start()
queue = ef.MessageQueue(transport=server)
queue.on("math.add", lambda m: queue.reply(m, m.payload["a"] + m.payload["b"]))
queue.on("events.*", lambda m: queue.publish("seen." + m.topic, m.payload))
print(server.port, flush=True)
sys.stdin.readline()
reply = queue.request("client.ask", "from the server", timeout=5)
print(reply.payload if reply else None, flush=True)
sys.stdin.readline()
queue.close()
"""


def test_cross_process_both_directions(no_leaks):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT.format(root=root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        port = int(process.stdout.readline())
        with ef.MessageQueue(transport=ef.TCPClientTransport("127.0.0.1", port).connect(5)) as q:
            assert q.request("math.add", {"a": 10, "b": 20}, timeout=5).payload == 30
            seen = []
            q.subscribe("seen.**", seen.append)
            q.on("client.ask", lambda m: q.reply(m, m.payload.upper()))
            q.publish("events.user", {"action": "login"})
            assert wait_until(lambda: seen)
            assert seen[0].topic == "seen.events.user"
            process.stdin.write("\n")
            process.stdin.flush()
            assert process.stdout.readline().strip() == "FROM THE SERVER"
            process.stdin.write("\n")
            process.stdin.flush()
            assert process.wait(10) == 0
    finally:
        process.kill()
        process.wait(5)
        process.stdin.close()
        process.stdout.close()


def test_subscribe_before_connect_and_close_waits_for_acknowledgement(tcp, caplog):
    server = tcp.server()
    got = []
    server.subscribe("early.*", got.append)
    client = tcp.client(server.port, connect=False)
    pushed = []
    client.subscribe("push.*", pushed.append)  # sent with the handshake
    client.connect(5.0)
    assert client.flush(10.0)
    server.send(ef.Message("push.a", "hello"))
    assert wait_until(lambda: pushed)
    for i in range(100):
        client.send(ef.Message("early.x", i))
    client.close()  # waits (briefly) until the server acknowledged all 100
    assert client.stats["pending"] == 0
    assert "closed with" not in caplog.text
    assert wait_until(lambda: len(got) == 100)


def test_inline_dispatch(tcp):
    with pytest.raises(ValueError, match="dispatch"):
        ef.TCPServerTransport(port=0, dispatch="fibers")
    server = tcp.server(dispatch="inline")
    queue = ef.MessageQueue(transport=server)
    threads = []

    @queue.on("svc")
    def svc(message):
        threads.append(threading.current_thread().name)
        queue.reply(message, message.payload + 1)

    @queue.on("boom")
    def boom(message):
        raise ValueError("boom")

    client = ef.MessageQueue(transport=tcp.client(server.port))
    client.publish("boom", None)
    for i in range(50):
        assert client.request("svc", i, timeout=5).payload == i + 1
    assert set(threads) == {f"eventforge-tcp-server-io-{server.port}"}
    assert wait_until(lambda: queue.stats["handler_errors"] == 1)


def test_inline_dispatch_handler_waiting_on_the_network_times_out(tcp):
    # The documented trade-off: the I/O thread is busy in the handler, so a
    # request it makes over the same server cannot be answered in time.
    server = tcp.server(dispatch="inline")
    queue = ef.MessageQueue(transport=server)
    results = []
    client = ef.MessageQueue(transport=tcp.client(server.port))
    client.on("client.echo", lambda m: client.reply(m, m.payload))

    @queue.on("outer")
    def outer(message):
        results.append(queue.request("client.echo", "x", timeout=0.3))

    assert client.transport.flush(10.0)
    client.publish("outer", None)
    assert wait_until(lambda: results, timeout=5)
    assert results == [None]
    # and the server is fine afterwards
    queue.on("svc", lambda m: queue.reply(m, "ok"))
    assert client.request("svc", None, timeout=5).payload == "ok"


def test_concurrent_connect_calls_open_one_connection(tcp):
    server = tcp.server()
    client = tcp.client(server.port, connect=False)
    threads = [threading.Thread(target=client.connect, args=(5.0,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert wait_until(lambda: server.stats["connections"] == 1)
    time.sleep(0.1)
    assert server.stats["accepted"] == 1
