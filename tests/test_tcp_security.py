"""Hostile and broken peers over real sockets.

Each attack runs while a well-behaved client publishes 1,000 messages; after
it the server must still serve (nothing lost, a new client gets a reply),
keep its buffers small, and have logged and counted the reason.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time

import pytest
from _tcp_helpers import (
    FrameReader,
    Publisher,
    closed_by_peer,
    frame,
    make_test_certs,
    message_frame,
    raw_connect,
    rss_bytes,
    wait_until,
)

import eventforge as ef

MAX_FRAME = 1024 * 1024


def _serve(tcp, **options):
    server = tcp.server(**options)
    got = []
    queue = ef.MessageQueue(transport=server)
    queue.subscribe("good.**", lambda m: got.append(m.id))
    queue.on("svc.echo", lambda m: queue.reply(m, m.payload))
    return server, queue, got


def _still_serves(server, got, publisher, **client_options):
    publisher.join()
    assert wait_until(lambda: len(got) >= 1000, timeout=20), len(got)
    assert sorted(got) == sorted(publisher.ids)  # none lost, none doubled
    fresh = ef.TCPClientTransport("127.0.0.1", server.port, **client_options).connect(5.0)
    try:
        reply = ef.MessageQueue(transport=fresh).request("svc.echo", "still here", timeout=5.0)
        assert reply is not None and reply.payload == "still here"
    finally:
        fresh.close()
    stats = server.stats
    assert stats["inbound_buffered"] + stats["outbound_bytes"] < 2 * MAX_FRAME


def _attack(tcp, caplog, attack, counter, reason, server_options=None, client_options=None,
            rss_limit=40 * 1024 * 1024):
    caplog.set_level(logging.DEBUG, logger="eventforge")
    server, queue, got = _serve(tcp, **(server_options or {}))
    publisher = Publisher(server.port, **(client_options or {}))
    tcp.own(publisher)
    rss_before = rss_bytes()
    publisher.start()
    attack(server)
    counters = counter if isinstance(counter, tuple) else (counter,)
    assert wait_until(lambda: any(server.stats[c] >= 1 for c in counters), timeout=10), \
        server.stats
    _still_serves(server, got, publisher, **(client_options or {}))
    assert reason in caplog.text
    assert rss_bytes() - rss_before < rss_limit
    return server


# -- malformed frames -------------------------------------------------------------------


def test_truncated_frame(tcp, caplog):
    def attack(server):
        with raw_connect(server.port) as sock:
            sock.sendall(struct.pack(">I", 100) + b'{"topic":"good.partial"')
    _attack(tcp, caplog, attack, ("truncated_frames", "resets"), "in the middle of a frame")


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 2**31 - 1, 2**32 - 1])
def test_length_prefix_too_large_closes_before_buffering(tcp, caplog, length):
    def attack(server):
        with raw_connect(server.port) as sock:
            sock.sendall(struct.pack(">I", length))
            assert closed_by_peer(sock)
    server = _attack(tcp, caplog, attack, "oversize_frames", f"frame length {length} exceeds")
    assert server.stats["inbound_buffered"] == 0


@pytest.mark.parametrize("body, counter_reason", [
    (b'{"topic": "good.x", "payload": ', "not valid JSON"),
    (b'{"topic": "good.x", "payload": "\xff\xfe"}', "not valid UTF-8"),
    (b'[1, 2, 3]', "must be a JSON object"),
    (b'{"payload": 1}', "has no 'topic'"),
    (b'{"topic": "good.x", "payload": ' + b"[" * 100000 + b"]" * 100000 + b"}",
     "nested too deeply"),
], ids=["invalid-json", "invalid-utf8", "not-an-object", "no-topic", "nested-100000"])
def test_bad_frames_are_rejected_and_the_connection_kept(tcp, caplog, body, counter_reason):
    def attack(server):
        with raw_connect(server.port) as sock:
            sock.sendall(frame(body))
            # the same connection still works afterwards
            sock.sendall(message_frame("after.ok", "ok"))
            assert wait_until(lambda: server.stats["frame_errors"] >= 1)
            assert not closed_by_peer(sock, timeout=0.2)
    server = _attack(tcp, caplog, attack, "frame_errors", counter_reason)
    assert wait_until(lambda: server.stats["messages_in"] >= 1001)


def test_fifty_megabyte_frame_is_refused_at_the_header(tcp, caplog):
    def attack(server):
        with raw_connect(server.port) as sock:
            try:
                sock.sendall(struct.pack(">I", 50 * 1024 * 1024) + b"x" * (4 * 1024 * 1024))
            except OSError:
                pass  # the server hung up on us mid-send: expected
            assert closed_by_peer(sock)
    _attack(tcp, caplog, attack, "oversize_frames", "exceeds max_frame_size",
            rss_limit=20 * 1024 * 1024)


def test_one_byte_every_100_ms_is_dropped_by_the_frame_timeout(tcp, caplog):
    def attack(server):
        data = message_frame("good.slow", "x" * 50)
        with raw_connect(server.port) as sock:
            for byte in data[:25]:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                if server.stats["frame_timeouts"]:
                    break
                time.sleep(0.1)
    _attack(tcp, caplog, attack, "frame_timeouts", "slow sender",
            server_options={"frame_timeout": 1.0})


def test_two_hundred_clients_connect_and_close_at_once(tcp, caplog):
    def attack(server):
        sockets = []
        for i in range(200):
            sock = socket.socket()
            sock.connect(("127.0.0.1", server.port))
            if i % 2:
                sock.sendall(message_frame("good.burst", i)[:7])
            sockets.append(sock)
        for sock in sockets:
            sock.close()
        assert wait_until(lambda: server.stats["connections"] <= 1, timeout=10)
    # Each of them shows up as a truncated frame, a reset (the server had
    # relayed a message to it) or a plain disconnect, depending on timing.
    server = _attack(tcp, caplog, attack, ("truncated_frames", "resets", "disconnects"),
                     "tcp server: closed 127.0.0.1")
    assert server.stats["accepted"] >= 201
    stats = server.stats
    assert stats["truncated_frames"] + stats["resets"] + stats["disconnects"] >= 200


def test_reset_in_the_middle_of_a_frame(tcp, caplog):
    def attack(server):
        sock = raw_connect(server.port)
        sock.sendall(message_frame("good.rst", "y" * 100)[:40])
        time.sleep(0.05)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
    # Seen on the read side (ECONNRESET) or when relaying to it (EPIPE/ECONNRESET).
    _attack(tcp, caplog, attack, ("resets", "truncated_frames"), "in the middle of a frame")


def test_client_that_never_reads_is_dropped_as_slow_consumer(tcp, caplog):
    stop = threading.Event()

    def attack(server):
        sock = raw_connect(server.port)  # a frame-only peer gets every send
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert wait_until(lambda: server.stats["frame_peers"] >= 1)
        blob = "z" * 16384
        try:
            deadline = time.monotonic() + 10
            while not server.stats["slow_consumers"] and time.monotonic() < deadline:
                try:
                    server.send(ef.Message("bulk.data", blob))
                except ef.TransportFullError:
                    # The only consumer is gone: later sends fill the local
                    # mailbox until backpressure, as the delivery model says.
                    break
        finally:
            stop.set()
            sock.close()
    _attack(tcp, caplog, attack, "slow_consumers", "slow consumer",
            server_options={"max_outbound_bytes": 256 * 1024})


def test_http_request_to_the_port(tcp, caplog):
    def attack(server):
        with raw_connect(server.port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert closed_by_peer(sock)
    _attack(tcp, caplog, attack, "oversize_frames", "looks like an HTTP request")


def test_more_connections_than_max_connections(tcp, caplog):
    held = []

    def attack(server):
        while len(held) < 4:  # the publisher holds the fifth
            held.append(raw_connect(server.port))
            time.sleep(0.01)
        assert wait_until(lambda: server.stats["connections"] == 5)
        extra = raw_connect(server.port)
        reply = FrameReader(extra).read(5.0)
        assert reply["topic"] == "$error" and reply["payload"]["code"] == "full"
        assert closed_by_peer(extra)
        extra.close()
        refused = ef.TCPClientTransport("127.0.0.1", server.port, reconnect=False)
        with pytest.raises(ConnectionError, match="max_connections"):
            refused.connect(5.0)
        refused.close()
        for sock in held:
            sock.close()
        assert wait_until(lambda: server.stats["connections"] == 1)
    _attack(tcp, caplog, attack, "refused_connections", "max_connections=5 reached",
            server_options={"max_connections": 5})


# -- shared secret ----------------------------------------------------------------------


def test_wrong_secret_is_refused(tcp, caplog):
    def attack(server):
        intruder = ef.TCPClientTransport("127.0.0.1", server.port, secret="guess", reconnect=False)
        with pytest.raises(ef.AuthenticationError, match="wrong secret"):
            intruder.connect(5.0)
        intruder.close()
    _attack(tcp, caplog, attack, "auth_failures", "wrong secret",
            server_options={"secret": "s3cret"}, client_options={"secret": "s3cret"})


def test_frame_only_peer_is_refused_by_a_secret_server(tcp, caplog):
    def attack(server):
        with raw_connect(server.port) as sock:
            sock.sendall(message_frame("good.sneak", "no auth"))
            assert closed_by_peer(sock)
    _attack(tcp, caplog, attack, "auth_failures", "authentication required",
            server_options={"secret": b"s3cret"}, client_options={"secret": b"s3cret"})


def test_secret_server_receives_nothing_before_authentication(tcp, caplog):
    caplog.set_level(logging.DEBUG, logger="eventforge")
    server, queue, got = _serve(tcp, secret="k")
    with raw_connect(server.port) as sock:
        time.sleep(0.1)
        server.send(ef.Message("other.broadcast", "secret data"))
        assert FrameReader(sock).read(0.3) is None  # no broadcast to unauthenticated peers
        sock.sendall(frame({"topic": "$hello", "payload": {"version": 1, "nonce": "00" * 32}}))
        welcome = FrameReader(sock).read(5.0)
        assert welcome["payload"]["auth"] == "hmac-sha256"
        sock.sendall(message_frame("good.early", "before auth"))
        assert closed_by_peer(sock)
    assert server.stats["auth_failures"] == 1 and got == []


def test_client_secret_requires_an_authenticating_server(tcp):
    server = tcp.server()
    client = ef.TCPClientTransport("127.0.0.1", server.port, secret="k", reconnect=False)
    with pytest.raises(ef.AuthenticationError, match="cannot prove"):
        client.connect(5.0)
    client.close()
    secured = tcp.server(secret="k")
    anonymous = ef.TCPClientTransport("127.0.0.1", secured.port, reconnect=False)
    with pytest.raises(ef.AuthenticationError, match="requires a shared secret"):
        anonymous.connect(5.0)
    anonymous.close()


def test_handshake_timeout_on_a_secret_server(tcp, caplog):
    def attack(server):
        with raw_connect(server.port) as sock:
            assert closed_by_peer(sock, timeout=5.0)  # silent peer
    _attack(tcp, caplog, attack, "handshake_timeouts", "handshake not completed",
            server_options={"secret": "k", "handshake_timeout": 0.5},
            client_options={"secret": "k"})


def test_oversize_hello_before_authentication_is_capped(tcp, caplog):
    def attack(server):
        with raw_connect(server.port) as sock:
            sock.sendall(frame({"topic": "$hello", "payload": {"pad": "p" * 10000}}))
            assert closed_by_peer(sock)
    _attack(tcp, caplog, attack, "oversize_frames", "exceeds max_frame_size 4096",
            server_options={"secret": "k"}, client_options={"secret": "k"})


# -- TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    pytest.importorskip("cryptography")
    return make_test_certs(str(tmp_path_factory.mktemp("certs")))


def _server_context(certs, mutual=False):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server_cert"], certs["server_key"])
    if mutual:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certs["ca"])
    return context


def _client_context(certs, with_cert=False):
    context = ssl.create_default_context(cafile=certs["ca"])
    if with_cert:
        context.load_cert_chain(certs["client_cert"], certs["client_key"])
    return context


def test_tls_round_trip(tcp, certs):
    server = tcp.server(ssl_context=_server_context(certs))
    queue = ef.MessageQueue(transport=server)
    queue.on("svc", lambda m: queue.reply(m, m.payload + 1))
    client = tcp.client(server.port, ssl_context=_client_context(certs))
    client_queue = ef.MessageQueue(transport=client)
    assert client_queue.request("svc", 1, timeout=5.0).payload == 2
    got = []
    client_queue.subscribe("push.*", got.append)
    assert client.flush(10.0)
    for i in range(300):
        queue.publish("push.x", i)
    assert wait_until(lambda: len(got) == 300)
    assert [m.payload for m in got] == list(range(300))


def test_mutual_tls(tcp, certs, caplog):
    caplog.set_level(logging.DEBUG, logger="eventforge")
    server = tcp.server(ssl_context=_server_context(certs, mutual=True))
    queue = ef.MessageQueue(transport=server)
    queue.on("svc", lambda m: queue.reply(m, "mtls"))
    client = tcp.client(server.port, ssl_context=_client_context(certs, with_cert=True))
    assert ef.MessageQueue(transport=client).request("svc", None, timeout=5.0).payload == "mtls"
    anonymous = ef.TCPClientTransport("127.0.0.1", server.port, reconnect=False,
                                      ssl_context=_client_context(certs))
    with pytest.raises(ConnectionError):
        anonymous.connect(5.0)
    anonymous.close()
    assert wait_until(lambda: server.stats["tls_failures"] >= 1)


def test_plain_client_against_tls_server(tcp, caplog, certs):
    def attack(server):
        plain = ef.TCPClientTransport("127.0.0.1", server.port, reconnect=False)
        with pytest.raises(ConnectionError):
            plain.connect(5.0)
        plain.close()
    _attack(tcp, caplog, attack, "tls_failures", "TLS handshake failed",
            server_options={"ssl_context": _server_context(certs)},
            client_options={"ssl_context": _client_context(certs)})


def test_tls_client_against_plain_server(tcp, caplog, certs):
    def attack(server):
        secure = ef.TCPClientTransport("127.0.0.1", server.port, reconnect=False,
                                       ssl_context=_client_context(certs))
        with pytest.raises(ConnectionError, match="TLS"):
            secure.connect(5.0)
        secure.close()
    _attack(tcp, caplog, attack, "oversize_frames", "looks like a TLS ClientHello")


def test_ssl_is_not_imported_by_plain_tcp():
    import subprocess
    import sys

    code = (
        "import sys, eventforge as ef\n"
        "s = ef.TCPServerTransport(port=0).start()\n"
        "c = ef.TCPClientTransport('127.0.0.1', s.port).connect(5)\n"
        "c.send(ef.Message('a', 1)); c.close(); s.close()\n"
        "print('ssl' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False", out.stderr
