"""RemoteQueue: push-only switchboard over TCP links, and the README samples."""

from __future__ import annotations

import contextlib
import io
import logging
import time

import pytest
from _reference_samples import SAMPLE_REMOTE_QUEUE
from _tcp_helpers import wait_until

import eventforge as ef

README_REMOTE_SAMPLE = SAMPLE_REMOTE_QUEUE  # the reference's sample, verbatim

README_TCP_SAMPLE = '''
from eventforge import MessageQueue
from eventforge.transports.tcp import TCPServerTransport

# in-process (default)
local = MessageQueue()

# cross-process: same MessageQueue API, different wire
transport = TCPServerTransport(host="127.0.0.1", port=9090)
transport.start()
networked = MessageQueue(transport=transport)
'''


@pytest.fixture
def loopback_ports(monkeypatch):
    """Run README text verbatim, but on 127.0.0.1 and free ports.

    Tests bind only loopback and port 0; fixed ports in the README are mapped
    to the free ports actually bound.
    """
    mapping = {}
    created = []
    real_server = ef.TCPServerTransport
    real_connect = ef.RemoteQueue.connect

    class LoopbackServer(real_server):
        def __init__(self, host="127.0.0.1", port=9090, **options):
            super().__init__("127.0.0.1", 0, **options)
            self._readme_port = port
            created.append(self)

        def start(self):
            result = super().start()
            mapping[self._readme_port] = self.port
            return result

    def connect(self, node_id, host, port, **options):
        return real_connect(self, node_id, host, mapping.get(port, port), **options)

    monkeypatch.setattr(ef, "TCPServerTransport", LoopbackServer)
    monkeypatch.setattr(ef.RemoteQueue, "connect", connect)
    yield created


def test_readme_remote_queue_sample_runs_verbatim(no_leaks, loopback_ports):
    namespace = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(README_REMOTE_SAMPLE, "README", "exec"), namespace)
        try:
            assert wait_until(lambda: out.getvalue().count("worker got") == 2)
        finally:
            namespace["coord"].close()
            namespace["worker"].close()
    text = out.getvalue()
    assert "worker got: {'task': 42}" in text and "worker got: {'task': 99}" in text
    assert "['worker-1']" in text


def test_readme_tcp_transport_sample_runs_verbatim(no_leaks, loopback_ports):
    namespace = {}
    exec(compile(README_TCP_SAMPLE, "README", "exec"), namespace)
    try:
        assert namespace["transport"].address[0] == "127.0.0.1"
        networked = namespace["networked"]
        networked.on("ping", lambda m: networked.reply(m, "pong"))
        assert networked.request("ping", None, timeout=5).payload == "pong"
    finally:
        namespace["networked"].close()
        namespace["local"].close()


def _node(tcp, name):
    server = tcp.server()
    return ef.RemoteQueue(name, local=ef.MessageQueue(transport=server)), server


def test_send_broadcast_peers_and_headers(tcp):
    a, a_srv = _node(tcp, "a")
    b, b_srv = _node(tcp, "b")
    coord = tcp.own(ef.RemoteQueue("coord"))
    tcp.own(a), tcp.own(b)
    got = {"a": [], "b": []}
    a.subscribe("work", got["a"].append)
    b.on("work", got["b"].append)
    coord.connect("a", "127.0.0.1", a_srv.port)
    coord.connect("b", "127.0.0.1", b_srv.port, timeout=5.0)
    assert coord.peers == ["a", "b"]
    msg_id = coord.send("a", "work", {"n": 1}, priority="high")
    result = coord.broadcast("work", {"n": 2})
    assert set(result) == {"a", "b"} and len(set(result.values())) == 1
    assert wait_until(lambda: len(got["a"]) == 2 and len(got["b"]) == 1)
    first = got["a"][0]
    assert first.id == msg_id and first.payload == {"n": 1}
    assert first.headers == {"priority": "high", "source_node": "coord"}
    assert coord.last_errors == {}
    assert coord.stats["sent"] == 3


def test_send_to_unknown_peer_is_a_key_error(tcp):
    coord = tcp.own(ef.RemoteQueue("coord"))
    with pytest.raises(KeyError, match="nobody"):
        coord.send("nobody", "work", 1)


def test_subscribe_without_local_is_a_runtime_error():
    sender = ef.RemoteQueue("sender")
    with pytest.raises(RuntimeError, match="no local queue"):
        sender.subscribe("x", print)
    with pytest.raises(RuntimeError):
        sender.on("x")
    with pytest.raises(RuntimeError):
        sender.on("x", print)
    sender.close()


def test_broadcast_survives_a_failing_peer(tcp, caplog):
    caplog.set_level(logging.WARNING, logger="eventforge")
    good, good_srv = _node(tcp, "good")
    tcp.own(good)
    got = []
    good.subscribe("work", got.append)
    bad_srv = tcp.server()
    errors = []
    coord = tcp.own(ef.RemoteQueue("coord", on_error=lambda node, exc: errors.append(node)))
    coord.connect("bad", "127.0.0.1", bad_srv.port, max_pending=1, backoff_initial=1.0,
                  backoff_max=2.0)
    coord.connect("good", "127.0.0.1", good_srv.port)
    bad_srv.close()  # "bad" now buffers, and is full after one message
    assert wait_until(lambda: not coord.peer_transport("bad").connected)
    first = coord.broadcast("work", 1)
    second = coord.broadcast("work", 2)
    assert set(first) == {"bad", "good"}
    assert set(second) == {"good"}
    assert isinstance(coord.last_errors["bad"], ef.TransportFullError)
    assert errors == ["bad"] and coord.stats["send_failures"] == 1
    assert "broadcast" in caplog.text and "bad" in caplog.text
    assert wait_until(lambda: [m.payload for m in got] == [1, 2])


def test_disconnect_and_reconnect_and_context_manager(tcp):
    node, server = _node(tcp, "n")
    with node:
        got = []
        node.on("t", got.append)
        with ef.RemoteQueue("coord") as coord:
            coord.connect("n", "127.0.0.1", server.port)
            coord.connect("n", "127.0.0.1", server.port)  # replaces the link
            assert coord.peers == ["n"]
            coord.send("n", "t", 1)
            assert wait_until(lambda: got)
            assert coord.disconnect("n") is True
            assert coord.disconnect("n") is False
            assert coord.peers == []
            with pytest.raises(ef.TransportError, match="no peers"):
                coord.broadcast("t", 2)  # never a silent {}
    assert server.closed  # closing the node closed its local queue and server


def test_connect_to_a_dead_address_raises(tcp):
    server = tcp.server()
    port = server.port
    server.close()
    coord = tcp.own(ef.RemoteQueue("coord"))
    with pytest.raises(ConnectionError):
        coord.connect("gone", "127.0.0.1", port, timeout=1.0)
    assert coord.peers == []


def test_bidirectional_nodes(tcp):
    a, a_srv = _node(tcp, "a")
    b, b_srv = _node(tcp, "b")
    tcp.own(a), tcp.own(b)
    a.connect("b", "127.0.0.1", b_srv.port)
    b.connect("a", "127.0.0.1", a_srv.port)
    results = []

    @b.on("job")
    def job(message):
        b.send(message.headers["source_node"], "result", message.payload * 2)

    a.on("result", results.append)
    a.send("b", "job", 21)
    assert wait_until(lambda: results)
    assert results[0].payload == 42 and results[0].headers["source_node"] == "b"
    time.sleep(0.01)


def _readme_blocks():
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_readme_remote_queue_block_runs(no_leaks, loopback_ports):
    block = next(b for b in _readme_blocks() if 'RemoteQueue("worker-1"' in b)
    namespace = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README", "exec"), namespace)
        try:
            assert wait_until(lambda: out.getvalue().count("worker got") == 2)
        finally:
            namespace["coord"].close()
            namespace["worker"].close()
    assert "worker got: {'task': 42}" in out.getvalue()


def test_readme_cross_process_blocks_run(no_leaks):
    import os
    import socket
    import subprocess
    import sys

    blocks = _readme_blocks()
    server_code = next(b for b in blocks if b.startswith("# server.py"))
    client_code = next(b for b in blocks if b.startswith("# client.py"))
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    server = subprocess.Popen(
        [sys.executable, "-c", server_code.replace("9090", str(port))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert server.stdout.readline().startswith("serving")
        out = subprocess.run(
            [sys.executable, "-c", client_code.replace("9090", str(port))],
            capture_output=True, text=True, timeout=30, env=env,
        )
        assert out.stdout.strip() == "30", out.stderr
        server.stdin.write("\n")
        server.stdin.flush()
        assert server.wait(10) == 0
    finally:
        server.kill()
        server.wait(5)
        server.stdin.close()
        server.stdout.close()


def test_send_and_broadcast_after_close_raise_transport_closed(tcp):
    node, server = _node(tcp, "n")
    coord = ef.RemoteQueue("coord")
    coord.connect("n", "127.0.0.1", server.port)
    coord.close()
    with pytest.raises(ef.TransportClosedError, match="closed"):
        coord.send("n", "t", 1)  # was a KeyError: the peer table was emptied
    with pytest.raises(ef.TransportClosedError):
        coord.send("never-known", "t", 1)
    with pytest.raises(ef.TransportClosedError):
        coord.broadcast("t", 1)
    node.close()


def test_broadcast_that_reaches_no_peer_raises_with_every_reason(tcp):
    node, server = _node(tcp, "n")
    errors = []
    coord = tcp.own(ef.RemoteQueue("coord", on_error=lambda peer, exc: errors.append(peer)))
    coord.connect("n", "127.0.0.1", server.port, reconnect=False)
    server.close()
    assert wait_until(lambda: not coord.peer_transport("n").connected)
    with pytest.raises(ef.TransportError, match="reached none of the 1 peer") as caught:
        coord.broadcast("t", 1)
    assert "n:" in str(caught.value) and isinstance(caught.value.__cause__, ef.TransportError)
    assert errors == ["n"] and set(coord.last_errors) == {"n"}
    node.close()
