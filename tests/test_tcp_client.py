"""TCPClientTransport when things go wrong: late welcomes, frame limits, abandoned
requests, nested requests, flush(), close() and exit, lost connections.

Real sockets on 127.0.0.1.  Where a misbehaving server is needed (one that
answers late, refuses a frame, or speaks an older protocol) a small raw
server run by the test plays it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, List, Optional

import pytest
from _tcp_helpers import FrameReader, frame, message_frame, wait_until

import eventforge as ef

WELCOME = {"version": 1, "features": ["interest", "ack", "ping", "reply"], "auth": None,
           "max_frame_size": 1024 * 1024, "ping_interval": 15}


def welcome(**changes: Any) -> bytes:
    payload = dict(WELCOME)
    payload.update(changes)
    return frame({"topic": "$welcome", "payload": payload})


class RawConn:
    """One accepted connection of a :class:`RawServer`: whole frames, raw or parsed."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader(sock)

    def body(self, timeout: float = 5.0) -> Optional[bytes]:
        return self.reader.read_body(timeout)

    def read(self, timeout: float = 5.0) -> Optional[dict]:
        return self.reader.read(timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


class RawServer:
    """A listener that runs ``serve(conn)`` on a thread for each connection it accepts."""

    def __init__(self, serve: Callable[[RawConn], Any], port: int = 0) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.serve = serve
        self.conns: List[RawConn] = []
        self.threads: List[threading.Thread] = []
        self.errors: List[BaseException] = []
        self._accepting = threading.Thread(target=self._accept, name="test-raw-server")
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            conn = RawConn(sock)
            self.conns.append(conn)
            thread = threading.Thread(target=self._run, args=(conn,), name="test-raw-conn")
            self.threads.append(thread)
            thread.start()

    def _run(self, conn: RawConn) -> None:
        try:
            self.serve(conn)
        except OSError:
            pass
        except BaseException as exc:  # reported by close()
            self.errors.append(exc)
        finally:
            conn.sock.close()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for conn in list(self.conns):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._accepting.join(5)
        for thread in self.threads:
            thread.join(5)
        if self.errors:
            raise self.errors[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _collecting_server(tcp, port: int = 0, got: Optional[List[Any]] = None, **options: Any):
    """A real server whose local subscriber records every ``stream`` payload."""
    got = [] if got is None else got
    server = tcp.own(ef.TCPServerTransport("127.0.0.1", port, **options))
    server.subscribe("stream", lambda m: got.append(m.payload))  # before a resend can come
    return server.start(), got


def _client_of_a_stopped_server(tcp, **options: Any):
    """A client whose server went away: (its port, the client, the list a server there fills)."""
    first, got = _collecting_server(tcp)
    port = first.port
    options.setdefault("backoff_initial", 0.01)
    options.setdefault("backoff_max", 0.05)
    client = tcp.client(port, **options)
    first.close()
    assert wait_until(lambda: not client.connected)
    return port, client, got


# -- 1. mode agreement ----------------------------------------------------------------


def test_a_late_welcome_switches_the_client_to_handshake_mode(tcp):
    interest: List[Any] = []

    def serve(conn: RawConn) -> None:
        hello = conn.read()
        assert hello is not None and hello["topic"] == "$hello"
        time.sleep(0.6)  # reads paused under load: well past the client's hello_timeout
        conn.send(welcome())
        # From here a handshake server sends only what the client asked for.
        while True:
            got = conn.read()
            if got is None:
                return
            if got["topic"] == "$interest":
                interest.extend(got["payload"].get("add", []))
                if "news.*" in interest:
                    break
        conn.send(message_frame("news.today", "routed by interest"))
        while conn.read() is not None:
            pass

    raw = tcp.own(RawServer(serve))
    client = tcp.client(raw.port, hello_timeout=0.2)
    assert client.mode == "frames"  # fell back: the welcome was late
    got: List[Any] = []
    client.subscribe("news.*", lambda m: got.append(m.payload))
    assert wait_until(lambda: client.mode == "handshake", timeout=10)
    assert wait_until(lambda: got == ["routed by interest"], timeout=10), (interest, got)


def test_a_real_server_busy_in_a_handler_answers_late_and_still_routes(tcp):
    # dispatch="inline": a handler that blocks stalls the server's I/O loop,
    # so a client connecting meanwhile gets its $welcome after hello_timeout.
    server = tcp.server(dispatch="inline")
    entered = threading.Event()

    def busy(message):
        entered.set()
        time.sleep(1.0)

    server.subscribe("busy", busy)
    tcp.client(server.port).send(ef.Message("busy", None))
    assert entered.wait(10)
    late = tcp.client(server.port, hello_timeout=0.2)
    assert late.mode == "frames"
    got: List[Any] = []
    late.subscribe("news.*", lambda m: got.append(m.payload))
    assert wait_until(lambda: late.mode == "handshake", timeout=10)
    assert late.flush(10.0) is True
    server.send(ef.Message("news.today", "routed"))
    assert wait_until(lambda: got == ["routed"], timeout=10), got


def test_a_late_welcome_asking_for_a_secret_drops_the_connection(tcp, caplog):
    def serve(conn: RawConn) -> None:
        conn.read()
        time.sleep(0.4)
        conn.send(welcome(auth="hmac-sha256", nonce="ab" * 32))
        while conn.read() is not None:
            pass

    raw = tcp.own(RawServer(serve))
    client = tcp.client(raw.port, hello_timeout=0.1, reconnect=False)
    assert wait_until(lambda: "pass secret=" in caplog.text, timeout=10)
    assert not client.connected


# -- 2. frame limits -------------------------------------------------------------------


def test_hello_carries_the_clients_max_frame_size(tcp):
    hellos: List[dict] = []

    def serve(conn: RawConn) -> None:
        hellos.append(conn.read())
        conn.send(welcome())
        while conn.read() is not None:
            pass

    raw = tcp.own(RawServer(serve))
    tcp.client(raw.port, max_frame_size=123456)
    assert hellos[0]["payload"]["max_frame_size"] == 123456
    assert "flush" in hellos[0]["payload"]["features"]


def test_send_refuses_a_frame_over_the_servers_limit(tcp):
    server = tcp.server(max_frame_size=4096)
    client = tcp.client(server.port, max_frame_size=1024 * 1024)
    with pytest.raises(ef.FrameTooLargeError, match=r"4096.*127\.0\.0\.1"):
        client.send(ef.Message("big", "x" * 5000))
    client.send(ef.Message("small", "x" * 100))
    assert client.flush(10.0) is True


def test_a_buffered_frame_over_a_restarted_servers_limit_is_dropped(tcp, caplog):
    port, client, got = _client_of_a_stopped_server(tcp)
    client.send(ef.Message("stream", "before"))
    client.send(ef.Message("stream", "x" * 8000))  # fine for the old server, not the new
    client.send(ef.Message("stream", "after"))
    _collecting_server(tcp, port, got, max_frame_size=4096)
    assert wait_until(lambda: got == ["before", "after"], timeout=10), got
    assert client.stats["too_large"] == 1
    assert "at most 4096 bytes" in caplog.text
    assert client.flush(10.0) is True
    assert client.stats["reconnects"] == 1  # no reconnect loop
    assert client.stats["pending"] == 0
    with pytest.raises(ef.FrameTooLargeError):  # and the limit is known from now on
        client.send(ef.Message("stream", "x" * 8000))


def test_a_frame_the_server_keeps_refusing_is_dropped_after_a_few_attempts(tcp, caplog):
    got: List[Any] = []

    def serve(conn: RawConn) -> None:  # claims 1 MiB, but closes on anything over 1000 bytes
        conn.read()
        conn.send(welcome())
        handled = 0
        while True:
            body = conn.body()
            if body is None:
                return
            if len(body) > 1000:
                return  # refused: the connection closes
            message = json.loads(body)
            if not message["topic"].startswith("$"):
                handled += 1
                got.append(message["payload"])
                conn.send(frame({"topic": "$ack", "payload": {"n": handled}}))

    raw = tcp.own(RawServer(serve))
    client = tcp.client(raw.port, backoff_initial=0.01, backoff_max=0.05)
    client.send(ef.Message("stream", "first"))
    client.send(ef.Message("stream", "y" * 2000))
    client.send(ef.Message("stream", "last"))
    assert wait_until(lambda: "last" in got, timeout=15), got
    assert client.stats["refused"] == 1
    assert "refuses it" in caplog.text
    assert got.count("first") == 1  # acknowledged before the refusal: never resent
    reconnects = client.stats["reconnects"]
    assert reconnects <= ef._MAX_SEND_ATTEMPTS
    time.sleep(0.3)
    assert client.stats["reconnects"] == reconnects  # and it stays connected
    assert client.stats["pending"] == 0


# -- 3. abandoned requests ---------------------------------------------------------------


class _Stopper:
    """Lets the ``tcp`` fixture stop an RPCServer (it calls ``close()``)."""

    def __init__(self, rpc: Any) -> None:
        self.rpc = rpc

    def close(self) -> None:
        self.rpc.stop(5.0)


def _billing(tcp, port: int, runs: List[Any]):
    server = tcp.own(ef.TCPServerTransport("127.0.0.1", port))
    rpc = ef.RPCServer(ef.MessageQueue(server), service_name="billing")
    rpc.add_method("charge", lambda amount: runs.append(amount) or "charged")
    rpc.serve(blocking=False)  # serving before a resent request could arrive
    tcp.own(_Stopper(rpc))
    return server.start()


def test_a_request_whose_caller_gave_up_is_never_delivered(tcp):
    runs: List[Any] = []
    port = _free_port()
    client = tcp.client(port, connect=False, backoff_initial=0.01, backoff_max=0.05)
    first = _billing(tcp, port, runs)
    client.connect(5.0)
    first.close()
    assert wait_until(lambda: not client.connected)
    billing = ef.with_retry(ef.RPCClient(ef.MessageQueue(client), "billing", timeout=0.3),
                            max_retries=3, backoff_initial=0.01)
    with pytest.raises(ef.RPCTimeoutError):
        billing.charge(99)  # four attempts, all while the server is down
    assert client.stats["withdrawn"] == 4
    _billing(tcp, port, runs)
    assert wait_until(lambda: client.connected, timeout=10)
    assert client.flush(10.0) is True
    assert billing.charge(1) == "charged"
    assert runs == [1]  # charge(99) ran 0 times


def test_a_resent_request_carries_only_the_time_its_caller_has_left(tcp):
    port, client, _ = _client_of_a_stopped_server(tcp)
    client.send(ef.Message("stream", "long", headers={"_ttl_ms": 20000}))
    client.send(ef.Message("stream", "short", headers={"_ttl_ms": 100}))
    time.sleep(0.5)  # the short one's caller has stopped waiting meanwhile
    seen: List[Any] = []
    second = tcp.own(ef.TCPServerTransport("127.0.0.1", port))
    second.subscribe("stream", lambda m: seen.append((m.payload, m.headers["_ttl_ms"])))
    second.start()
    assert wait_until(lambda: seen, timeout=10)
    assert client.flush(10.0) is True
    assert [payload for payload, _ in seen] == ["long"]
    assert 0 < seen[0][1] <= 19500
    assert client.stats["expired"] == 1


# -- 4. nested requests ----------------------------------------------------------------------


def test_a_callback_request_answered_by_another_subscriber_of_the_same_client(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    queue = ef.MessageQueue(client)
    queue.on("math.double", lambda m: queue.reply(m, m.payload * 2))
    answers: List[Any] = []

    @queue.on("jobs.*")
    def job(message):
        reply = queue.request("math.double", message.payload, timeout=30.0)
        answers.append(None if reply is None else reply.payload)

    client.flush(10.0)
    queue.publish("jobs.a", 21)
    queue.publish("jobs.b", 50)
    # Answered at once, as on MemoryTransport: not after the 30 s timeout.
    assert wait_until(lambda: len(answers) == 2, timeout=10), answers
    assert sorted(answers) == [42, 100]


def test_a_callback_rpc_call_to_a_service_on_the_same_client(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    queue = ef.MessageQueue(client)
    rpc = ef.RPCServer(queue, service_name="inner")
    tcp.own(_Stopper(rpc))
    rpc.add_method("square", lambda x: x * x)
    rpc.serve(blocking=False)
    caller = ef.RPCClient(queue, "inner", timeout=30.0)
    results: List[Any] = []
    queue.on("outer", lambda m: results.append(caller.square(m.payload)))
    client.flush(10.0)
    queue.publish("outer", 7)
    assert wait_until(lambda: results == [49], timeout=10), results


# -- 5. flush ---------------------------------------------------------------------------------


def test_flush_makes_a_new_subscription_live(tcp):
    server = tcp.server()
    listener = tcp.client(server.port)
    publisher = tcp.client(server.port)
    got: List[Any] = []
    for n in range(20):
        listener.subscribe(f"live.{n}", got.append)
        assert listener.flush(10.0) is True
        publisher.send(ef.Message(f"live.{n}", n))
    assert wait_until(lambda: len(got) == 20, timeout=10)


def test_flush_waits_for_the_servers_flushed(tcp):
    order: List[str] = []

    def serve(conn: RawConn) -> None:
        conn.read()
        conn.send(welcome(features=["interest", "ack", "ping", "reply", "flush"]))
        while True:
            got = conn.read()
            if got is None:
                return
            order.append(got["topic"])
            if got["topic"] == "a.b":  # a data frame, handled: acknowledge it
                conn.send(frame({"topic": "$ack", "payload": {"n": 1}}))
            if got["topic"] == "$flush":
                time.sleep(0.3)
                order.append("flushed")
                conn.send(frame({"topic": "$flushed", "payload": got["payload"]}))

    raw = tcp.own(RawServer(serve))
    client = tcp.client(raw.port)
    client.subscribe("a.*", lambda m: None)
    client.send(ef.Message("a.b", 1))
    assert client.flush(10.0) is True
    assert order == ["$interest", "a.b", "$flush", "flushed"]


def test_flush_times_out_when_the_server_never_confirms(tcp):
    def serve(conn: RawConn) -> None:
        conn.read()
        conn.send(welcome(features=["interest", "flush"]))
        while conn.read() is not None:
            pass

    raw = tcp.own(RawServer(serve))
    client = tcp.client(raw.port)
    with pytest.raises(ef.EventforgeTimeoutError, match="flush"):
        client.flush(0.3)


def test_flush_against_a_frame_only_server_says_it_cannot_confirm(tcp):
    received: List[Any] = []

    def serve(conn: RawConn) -> None:  # eventforge 0.1: no handshake at all
        while True:
            got = conn.read()
            if got is None:
                return
            received.append(got["topic"])

    raw = tcp.own(RawServer(serve))
    client = tcp.client(raw.port, hello_timeout=0.1)
    client.send(ef.Message("plain", 1))
    assert client.flush(10.0) is False
    assert wait_until(lambda: received == ["$hello", "plain"])


def test_flush_waits_for_a_reconnect(tcp):
    port, client, got = _client_of_a_stopped_server(tcp)
    client.send(ef.Message("stream", "buffered"))
    with pytest.raises(ef.EventforgeTimeoutError):
        client.flush(0.2)
    _collecting_server(tcp, port, got)
    assert client.flush(10.0) is True
    assert got == ["buffered"]


# -- 6. close and exit deliver what was accepted --------------------------------------------

_PUBLISH_AND_EXIT = textwrap.dedent("""
    import sys
    import eventforge as ef

    port, count, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    client = ef.TCPClientTransport("127.0.0.1", port).connect(10)
    for i in range(count):
        client.send(ef.Message("stream", i))
    if how == "close":
        client.close()
    print("published", flush=True)
""")


@pytest.mark.parametrize("how", ["exit", "close"])
def test_a_process_that_publishes_and_exits_loses_nothing(tcp, how):
    server, got = _collecting_server(tcp)
    count = 20000
    result = subprocess.run(
        [sys.executable, "-c", _PUBLISH_AND_EXIT, str(server.port), str(count), how],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: len(got) >= count, timeout=20), len(got)
    assert sorted(set(got)) == list(range(count))


def test_close_waits_for_a_reconnect_to_deliver_the_backlog(tcp):
    port, client, got = _client_of_a_stopped_server(tcp, backoff_max=2.0)
    time.sleep(0.5)  # let the backoff grow: close() must not sit it out
    for i in range(3):
        client.send(ef.Message("stream", i))
    restart = threading.Timer(0.3, lambda: _collecting_server(tcp, port, got))
    restart.start()
    client.close(timeout=20.0)
    restart.join()
    assert wait_until(lambda: got == [0, 1, 2], timeout=5), got


def test_open_clients_are_held_weakly(tcp):
    import gc
    import weakref

    server = tcp.server()
    client = ef.TCPClientTransport("127.0.0.1", server.port).connect(5.0)
    assert client in ef._open_clients
    client.close()
    assert client not in ef._open_clients
    ref = weakref.ref(client)
    del client
    gc.collect()
    assert ref() is None  # nothing (the exit hook included) keeps a closed client alive


# -- 7. RemoteQueue close during a reconnect ------------------------------------------------


def test_remote_queue_close_during_a_reconnect_does_not_wait_for_connect_timeout(tcp):
    server = tcp.server()
    port = server.port
    remote = tcp.own(ef.RemoteQueue("a"))
    remote.connect("b", "127.0.0.1", port, connect_timeout=30.0, backoff_initial=0.2,
                   backoff_max=0.2)
    link = remote.peer_transport("b")
    server.close()
    assert wait_until(lambda: not link.connected)
    # A listener whose backlog is full: a connect() to it hangs (SYNs are dropped).
    blackhole = socket.create_server(("127.0.0.1", port), backlog=0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.settimeout(0.3)
            try:
                filler.connect(("127.0.0.1", port))
            except OSError:
                filler.close()
                break
            fillers.append(filler)
        assert len(fillers) == 1
        assert wait_until(lambda: link.debug_state()["connecting"], timeout=10)
        attempts = link.stats["reconnect_attempts"]
        time.sleep(0.5)
        # stuck in one connect() (SYNs dropped), not retrying
        assert link.stats["reconnect_attempts"] == attempts and not link.connected
        started = time.monotonic()
        remote.close()
        assert time.monotonic() - started < 15.0  # not connect_timeout (30 s)
        assert not link.debug_state()["io_thread_alive"]
    finally:
        for filler in fillers:
            filler.close()
        blackhole.close()


def test_remote_queue_close_shares_one_timeout_across_its_peers(tcp):
    remote = tcp.own(ef.RemoteQueue("a"))
    for node in ("b", "c", "d"):
        server = tcp.server()
        remote.connect(node, "127.0.0.1", server.port, backoff_initial=0.01, backoff_max=0.05)
        server.close()
    for node in ("b", "c", "d"):
        link = remote.peer_transport(node)
        assert wait_until(lambda link=link: not link.connected)
        remote.send(node, "work", 1)  # buffered: its peer is gone for good
    started = time.monotonic()
    remote.close(timeout=1.0)
    assert time.monotonic() - started < 2.5  # about 1 s in all, not 1 s per peer


# -- 9. lost connections and the connection-state hook --------------------------------------


def test_a_call_in_flight_gets_connection_lost_at_once(tcp):
    server = tcp.server()
    queue = ef.MessageQueue(server)
    entered = threading.Event()

    def stall(message):
        entered.set()
        time.sleep(1.0)

    queue.on("stall", stall)
    client = tcp.client(server.port, backoff_initial=0.01)
    errors: List[BaseException] = []

    def call():
        try:
            ef.MessageQueue(client).request("stall", None, timeout=60.0)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert entered.wait(10)
    started = time.monotonic()
    server.debug_cut_connections("cut by the test")
    thread.join(30)
    assert not thread.is_alive()
    assert time.monotonic() - started < 20.0
    assert len(errors) == 1 and isinstance(errors[0], ef.ConnectionLostError), errors
    assert "lost before the reply came" in str(errors[0])
    assert client.stats["failed_requests"] == 1


def test_a_request_resent_after_a_reconnect_fails_at_once_if_that_connection_breaks(tcp):
    port, client, _ = _client_of_a_stopped_server(tcp)
    errors: List[BaseException] = []

    def call() -> None:
        try:
            ef.MessageQueue(client).request("stall", None, timeout=60.0)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()  # buffered: the server is down
    assert wait_until(lambda: client.stats["pending"] == 1)
    server = tcp.own(ef.TCPServerTransport("127.0.0.1", port))

    def cut(message):  # the resent request arrives: drop the connection instead of replying
        server.debug_cut_connections("cut by the test")

    server.subscribe("stall", cut)
    server.start()
    started = time.monotonic()
    thread.join(60)
    assert time.monotonic() - started < 20.0  # not the 60 s timeout
    assert len(errors) == 1 and isinstance(errors[0], ef.ConnectionLostError), errors


def test_an_async_call_in_flight_gets_connection_lost_at_once(tcp):
    import asyncio

    server = tcp.server()
    queue = ef.MessageQueue(server)
    entered = threading.Event()
    queue.on("stall", lambda m: (entered.set(), time.sleep(1.0)))
    client = tcp.client(server.port, backoff_initial=0.01)

    def cut() -> None:
        entered.wait(10)
        server.debug_cut_connections("cut by the test")

    async def main() -> None:
        cutter = threading.Thread(target=cut)
        cutter.start()
        try:
            with pytest.raises(ef.ConnectionLostError):
                await ef.MessageQueue(client).request_async("stall", None, timeout=60.0)
        finally:
            cutter.join(10)

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 20.0


def test_on_connection_change_reports_loss_and_return_once_each(tcp):
    changes: List[Any] = []
    port, client, _ = _client_of_a_stopped_server(
        tcp, on_connection_change=lambda up, detail: changes.append(up))
    assert wait_until(lambda: changes == [False])
    time.sleep(0.3)  # several failed attempts meanwhile: still one report
    assert changes == [False]
    _collecting_server(tcp, port)
    assert wait_until(lambda: changes == [False, True], timeout=10)
    assert client.connected


# -- 10. closed transports name themselves -------------------------------------------------


def test_an_rpc_call_after_close_names_the_tcp_transport(tcp):
    server = tcp.server()
    client = tcp.client(server.port)
    queue = ef.MessageQueue(client)
    queue.close()
    with pytest.raises(ef.TransportClosedError) as info:
        ef.RPCClient(queue, "math").call("add", 1, 2)
    assert "TCPClientTransport" in str(info.value) and "MemoryTransport" not in str(info.value)
    assert f"127.0.0.1:{server.port}" in str(info.value)
