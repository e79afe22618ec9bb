"""Failures: restarts, killed peers, dead peers, close() under load; nothing left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from _tcp_helpers import FrameReader, frame, raw_connect, wait_until

import eventforge as ef

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _restartable_server(port, got):
    server = ef.TCPServerTransport("127.0.0.1", port)
    server.subscribe("stream", lambda m: got.append(m.id))
    return server.start()


def test_server_restart_while_client_publishes(tcp):
    got = []
    first = tcp.own(_restartable_server(0, got))
    port = first.port
    client = tcp.client(port, backoff_initial=0.01, backoff_max=0.1)
    pushed = []
    client.subscribe("push.*", pushed.append)
    ids, errors = [], []

    def publish():
        try:
            for i in range(3000):
                message = ef.Message("stream", i)
                client.send(message)
                ids.append(message.id)
                if i % 50 == 0:
                    time.sleep(0.002)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=publish)
    thread.start()
    assert wait_until(lambda: len(got) > 500)
    first.close()
    second = tcp.own(_restartable_server(port, got))
    thread.join(30)
    assert not errors
    assert wait_until(lambda: set(got) == set(ids), timeout=15), (len(set(got)), len(ids))
    assert wait_until(lambda: client.stats["pending"] == 0)
    assert client.stats["reconnects"] == 1
    # subscriptions were restored on the new server
    assert client.flush(10.0)
    second.send(ef.Message("push.after", "restored"))
    assert wait_until(lambda: pushed)
    duplicates = len(got) - len(set(got))
    assert duplicates <= 100  # at-least-once across a restart; usually zero


def test_frames_buffer_while_disconnected_then_flush_in_order(tcp):
    got = []
    first = tcp.own(_restartable_server(0, got))
    port = first.port
    client = tcp.client(port, backoff_initial=0.01, backoff_max=0.05, max_pending=100)
    first.close()
    assert wait_until(lambda: not client.connected)
    sent = []
    for i in range(100):
        message = ef.Message("stream", i)
        client.send(message)
        sent.append(message.id)
    with pytest.raises(ef.TransportFullError):
        client.send(ef.Message("stream", "one too many"))
    assert client.stats["full"] == 1
    tcp.own(_restartable_server(port, got))
    assert wait_until(lambda: len(got) == 100, timeout=10)
    assert got == sent


def test_reconnect_backoff_is_capped_and_jittered(tcp):
    server = tcp.server()
    port = server.port
    client = tcp.client(port, backoff_initial=0.01, backoff_max=0.08)
    server.close()
    time.sleep(1.0)
    attempts = client.stats["reconnect_attempts"]
    # 0.01, 0.02, 0.04, then 0.08 at most (times 0.5..1.0): roughly 12..30 in 1 s
    assert 8 <= attempts <= 60, attempts


def test_no_reconnect_means_sends_fail_clearly(tcp):
    server = tcp.server()
    client = tcp.client(server.port, reconnect=False)
    server.close()
    assert wait_until(lambda: not client.connected)
    time.sleep(0.05)
    with pytest.raises(ConnectionError, match="lost"):
        client.send(ef.Message("a", 1))


def _silent_server():
    """Answers $hello with a welcome (ping feature on), then never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def run():
        listener.settimeout(5)
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        held.append(sock)
        FrameReader(sock).read(5)
        sock.sendall(frame({"topic": "$welcome", "payload": {
            "version": 1, "features": ["ack", "interest", "ping"], "auth": None}}))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener, held, thread


def test_client_detects_a_dead_server_within_two_ping_intervals(tcp):
    listener, held, thread = _silent_server()
    try:
        client = tcp.client(listener.getsockname()[1], ping_interval=0.3, backoff_initial=0.5,
                            backoff_max=1.0)
        started = time.monotonic()
        assert wait_until(lambda: client.stats["dead_peers"] == 1, timeout=3)
        assert time.monotonic() - started < 0.3 * 2 + 0.4  # two intervals, plus a tick
    finally:
        thread.join(5)
        for sock in held:
            sock.close()
        listener.close()


def test_server_drops_a_client_that_stops_answering_pings(tcp, caplog):
    server = tcp.server(ping_interval=0.2)
    with raw_connect(server.port) as sock:
        sock.sendall(frame({"topic": "$hello", "payload": {
            "version": 1, "features": ["ping"], "nonce": "00" * 32}}))
        assert wait_until(lambda: server.stats["dead_peers"] == 1, timeout=3)
    assert "dead peer" in caplog.text


CLIENT_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import eventforge as ef
    port, role = int(sys.argv[1]), sys.argv[2]
    queue = ef.MessageQueue(transport=ef.TCPClientTransport("127.0.0.1", port).connect(5))
    if role == "requester":
        print("requesting", flush=True)
        queue.request("slow.op", None, timeout=30)
    else:
        queue.on("client.op", lambda m: (print("handling", flush=True), time.sleep(30)))
        print("ready", flush=True)
        time.sleep(30)
""")


def _spawn(port, role):
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT.format(root=ROOT), str(port), role],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_client_killed_mid_request(tcp):
    server = tcp.server()
    queue = ef.MessageQueue(transport=server)
    started, release = threading.Event(), threading.Event()

    @queue.on("slow.op")
    def slow(message):
        started.set()
        release.wait(10)
        queue.reply(message, "too late")

    process = _spawn(server.port, "requester")
    try:
        assert process.stdout.readline().strip() == "requesting"
        assert started.wait(10)
        process.kill()
        process.wait(10)
        assert wait_until(lambda: server.stats["connections"] == 0)
        release.set()
        assert wait_until(lambda: server.stats["dropped"] >= 1)  # the orphan reply
        assert server.debug_state()["exact"] == {} and server.stats["inboxes"] == 0
        queue.on("ping.op", lambda m: queue.reply(m, "pong"))
        fresh = ef.MessageQueue(transport=tcp.client(server.port))
        assert fresh.request("ping.op", None, timeout=5).payload == "pong"
    finally:
        release.set()
        process.kill()
        process.wait(10)
        process.stdout.close()
        process.stderr.close()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_server_request_to_a_client_killed_mid_request(tcp):
    server = tcp.server()
    process = _spawn(server.port, "handler")
    try:
        assert process.stdout.readline().strip() == "ready"
        assert wait_until(lambda: server.debug_state()["exact"] or server.debug_state()["patterns"])
        queue = ef.MessageQueue(transport=server)
        result = []
        thread = threading.Thread(target=lambda: result.append(
            queue.request("client.op", None, timeout=1.0)))
        thread.start()
        assert process.stdout.readline().strip() == "handling"
        process.kill()
        thread.join(5)
        assert result == [None]
        assert wait_until(lambda: server.stats["connections"] == 0)
        assert server.debug_state()["exact"] == {} and server.stats["inboxes"] == 0
    finally:
        process.kill()
        process.wait(10)
        process.stdout.close()
        process.stderr.close()


def test_client_close_while_threads_publish(tcp):
    server = tcp.server()
    server.subscribe("load", lambda m: None)
    client = tcp.client(server.port)
    outcomes = []

    def publish():
        try:
            while True:
                try:
                    client.send(ef.Message("load", "x" * 100))
                except ef.TransportFullError:  # backpressure: the server is slower
                    time.sleep(0.01)
        except ef.TransportClosedError:
            outcomes.append("closed")
        except Exception as exc:  # pragma: no cover - reported below
            outcomes.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    client.close()
    for t in threads:
        t.join(5)
    assert outcomes == ["closed"] * 4


def test_server_close_while_clients_publish_and_request(tcp):
    server = tcp.server()
    queue = ef.MessageQueue(transport=server)
    queue.on("svc", lambda m: queue.reply(m, m.payload))
    server.subscribe("load", lambda m: None)
    clients = [tcp.client(server.port, reconnect=False) for _ in range(3)]
    stop = threading.Event()

    def work(client):
        mq = ef.MessageQueue(transport=client)
        while not stop.is_set():
            try:
                client.send(ef.Message("load", 1))
                mq.request("svc", 1, timeout=1.0)
            except (ConnectionError, ef.TransportError):
                return

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    time.sleep(0.3)
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 3
    stop.set()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert wait_until(lambda: not any(c.connected for c in clients))


def test_close_from_inside_a_handler(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    closed = threading.Event()

    def handler(message):
        client.close()
        server.close()
        closed.set()

    client.subscribe("shutdown", handler)
    assert client.flush(10.0)
    server.send(ef.Message("shutdown", None))
    assert closed.wait(5)


EMFILE_SCRIPT = """
import logging, resource, socket, sys, time
sys.path.insert(0, {root!r})
import eventforge as ef
logging.basicConfig(level=logging.ERROR, format="%(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
server = ef.TCPServerTransport("127.0.0.1", 0).start()
print(server.port, flush=True)
sys.stdin.readline()
print(server.stats["accept_errors"] > 0, server.stats["connections"], flush=True)
sys.stdin.readline()
server.close()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_NOFILE, /proc")
def test_out_of_file_descriptors_pauses_accepting_without_spinning(no_leaks):
    process = subprocess.Popen(
        [sys.executable, "-c", EMFILE_SCRIPT.format(root=ROOT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    socks = []
    try:
        port = int(process.stdout.readline())
        for _ in range(80):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)
        with open(f"/proc/{process.pid}/stat") as f:
            before = sum(int(x) for x in f.read().split()[13:15])
        time.sleep(1.0)
        with open(f"/proc/{process.pid}/stat") as f:
            after = sum(int(x) for x in f.read().split()[13:15])
        assert (after - before) / os.sysconf("SC_CLK_TCK") < 0.5  # not spinning
        for sock in socks[:40]:
            sock.close()
        time.sleep(0.6)  # the paused listener is watched again on the next tick
        process.stdin.write("\n")
        process.stdin.flush()
        errors, connections = process.stdout.readline().split()
        assert errors == "True"
        assert int(connections) >= 40  # the waiting connections were accepted
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.wait(10) == 0
        assert "accept failed" in process.stderr.read()
    finally:
        for sock in socks:
            sock.close()
        process.kill()
        process.wait(5)
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()


def test_a_bug_in_housekeeping_does_not_kill_the_server(tcp, caplog, monkeypatch):
    real_tick = ef.TCPServerTransport._tick
    calls = []

    def broken_tick(self, now):
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("injected bug")
        return real_tick(self, now)

    monkeypatch.setattr(ef.TCPServerTransport, "_tick", broken_tick)
    server = tcp.server()
    queue = ef.MessageQueue(transport=server)
    queue.on("svc", lambda m: queue.reply(m, "alive"))
    assert wait_until(lambda: len(calls) >= 2, timeout=3)
    client = ef.MessageQueue(transport=tcp.client(server.port))
    assert client.request("svc", None, timeout=5).payload == "alive"
    assert server.stats["internal_errors"] == 1
    assert "injected bug" in caplog.text
