"""Interoperability with frame-only peers (the original eventforge client and server).

The original speaks only frames: 4-byte big-endian length + JSON message.
A raw-socket peer stands in for it in both directions.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
from _tcp_helpers import FrameReader, frame, message_frame, raw_connect, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

import eventforge as ef

VECTORS = os.path.join(os.path.dirname(__file__), "vectors", "tcp")


# -- a frame-only client talking to our server --------------------------------------------


def test_frame_only_client_publishes_and_gets_every_server_send(tcp):
    server = tcp.server()
    got = []
    server.subscribe("jobs.*", got.append)
    with raw_connect(server.port) as sock:
        reader = FrameReader(sock)
        sock.sendall(message_frame("jobs.new", {"n": 1}))
        assert wait_until(lambda: got)
        assert got[0].payload == {"n": 1}
        assert server.stats["frame_peers"] == 1
        # no handshake, so it is sent everything the server routes
        server.send(ef.Message("anything.at.all", "a"))
        server.send(ef.Message("jobs.other", "b"))
        first, second = reader.read(), reader.read()
        assert (first["topic"], first["payload"]) == ("anything.at.all", "a")
        assert (second["topic"], second["payload"]) == ("jobs.other", "b")
        # the frame has exactly the original's keys and a Z timestamp
        assert set(first) == {"id", "topic", "payload", "headers", "timestamp",
                              "reply_to", "correlation_id"}
        assert first["timestamp"].endswith("Z")


def test_frame_only_client_requests_and_gets_the_reply(tcp):
    server = tcp.server()
    queue = ef.MessageQueue(transport=server)
    queue.on("math.add", lambda m: queue.reply(m, m.payload["a"] + m.payload["b"]))
    with raw_connect(server.port) as sock:
        request = ef.Message("math.add", {"a": 2, "b": 3}, reply_to="_reply.raw-1")
        sock.sendall(ef.encode(request))
        reply = FrameReader(sock).read()
        assert reply["topic"] == "_reply.raw-1" and reply["payload"] == 5
        assert reply["correlation_id"] == request.id


def test_frame_only_client_reaches_a_handler_on_another_client(tcp):
    server = tcp.server()
    worker = ef.MessageQueue(transport=tcp.client(server.port))
    worker.on("remote.work", lambda m: worker.reply(m, m.payload.upper()))
    assert worker.transport.flush(10.0)
    with raw_connect(server.port) as sock:
        sock.sendall(ef.encode(ef.Message("remote.work", "abc", reply_to="_reply.raw-2")))
        reply = FrameReader(sock).read_message()
        assert reply["topic"] == "_reply.raw-2" and reply["payload"] == "ABC"


def test_frame_only_client_minimal_frame_without_id_or_timestamp(tcp):
    server = tcp.server()
    got = []
    server.subscribe("min", got.append)
    with raw_connect(server.port) as sock:
        sock.sendall(frame({"topic": "min", "payload": 1, "timestamp": 1700000000}))
        assert wait_until(lambda: got)
    assert got[0].id and got[0].timestamp.year == 2023


def test_frame_only_peers_do_not_get_their_own_messages_back(tcp):
    server = tcp.server()
    with raw_connect(server.port) as a, raw_connect(server.port) as b:
        assert wait_until(lambda: server.stats["frame_peers"] == 2)
        a.sendall(message_frame("chat", "from a"))
        got = FrameReader(b).read()
        assert got["payload"] == "from a"
        assert FrameReader(a).read(0.2) is None


# -- our client talking to a frame-only server ----------------------------------------------


class FrameOnlyServer:
    """A minimal original-style server: reads frames, echoes requests, broadcasts."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = []
        self.clients = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="frame-only-server", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.05)
        workers = []
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            self.clients.append(sock)
            worker = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            worker.start()
            workers.append(worker)
        for worker in workers:
            worker.join(2)

    def _serve(self, sock: socket.socket) -> None:
        decoder = ef.FrameDecoder()
        sock.settimeout(0.05)
        while not self.stop.is_set():
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            for body in decoder.feed(data):
                obj = json.loads(body)
                self.received.append(obj)
                if obj.get("reply_to"):  # answer like a handler on the server would
                    reply = ef.Message(obj["reply_to"], {"echo": obj["payload"]},
                                       correlation_id=obj["id"])
                    sock.sendall(ef.encode(reply))

    def broadcast(self, message: ef.Message) -> None:
        for sock in self.clients:
            sock.sendall(ef.encode(message))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(3)
        for sock in self.clients:
            sock.close()
        self.listener.close()


@pytest.fixture
def frame_server(no_leaks):
    server = FrameOnlyServer()
    yield server
    server.close()


def test_client_falls_back_to_plain_frames(tcp, frame_server):
    client = tcp.client(frame_server.port, hello_timeout=0.2)
    assert client.mode == "frames"
    queue = ef.MessageQueue(transport=client)
    queue.publish("plain.topic", {"x": 1})
    assert wait_until(lambda: any(m["topic"] == "plain.topic" for m in frame_server.received))
    sent = [m for m in frame_server.received if m["topic"] == "plain.topic"][0]
    assert sent["payload"] == {"x": 1} and sent["timestamp"].endswith("Z")
    # the only non-message frame it ever saw is the one $hello
    assert [m["topic"] for m in frame_server.received if m["topic"].startswith("$")] == ["$hello"]
    reply = queue.request("svc", "hi", timeout=5.0)
    assert reply is not None and reply.payload == {"echo": "hi"}
    got = []
    queue.subscribe("news.*", got.append)
    frame_server.broadcast(ef.Message("news.today", "n"))
    frame_server.broadcast(ef.Message("ignored.topic", "i"))  # filtered locally
    assert wait_until(lambda: got)
    time.sleep(0.05)
    assert [m.topic for m in got] == ["news.today"]


def test_client_without_handshake_sends_no_control_frame(tcp, frame_server):
    started = time.monotonic()
    client = tcp.client(frame_server.port, handshake=False)
    assert time.monotonic() - started < 0.5
    client.send(ef.Message("only.data", 1))
    assert wait_until(lambda: frame_server.received)
    assert [m["topic"] for m in frame_server.received] == ["only.data"]


def test_client_requiring_the_handshake_refuses_a_frame_only_server(tcp, frame_server):
    client = ef.TCPClientTransport("127.0.0.1", frame_server.port, handshake=True,
                                   reconnect=False)
    with pytest.raises(ef.AuthenticationError, match="did not answer the handshake"):
        client.connect(0.3)
    client.close()
    secret = ef.TCPClientTransport("127.0.0.1", frame_server.port, secret="k", reconnect=False)
    with pytest.raises(ef.AuthenticationError):
        secret.connect(0.3)
    secret.close()


# -- control-frame vectors ----------------------------------------------------------------


def _vectors():
    with open(os.path.join(VECTORS, "control.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_control_frame_vectors(vector):
    data = open(os.path.join(VECTORS, vector["file"]), "rb").read()
    # encoding: our writer produces exactly these bytes
    assert ef._control_frame(vector["topic"], vector["payload"]) == data
    # decoding: the bytes are a valid frame whose JSON is the vector
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert json.loads(data[4:]) == {"topic": vector["topic"], "payload": vector["payload"]}
    decoded = ef.decode(data[4:])
    assert decoded.topic == vector["topic"] and decoded.payload == vector["payload"]


def _vector_bytes(name):
    entry = next(v for v in _vectors() if v["name"] == name)
    with open(os.path.join(VECTORS, entry["file"]), "rb") as f:
        return f.read()


def _read_exactly(sock, size, timeout=5.0):
    sock.settimeout(timeout)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_server_speaks_the_flush_and_limit_vectors_byte_for_byte(tcp):
    """Decode direction: the server takes the vectors' bytes; encode: it writes theirs."""
    server = tcp.server()
    welcome, flushed = _vector_bytes("welcome-flush"), _vector_bytes("flushed")
    with raw_connect(server.port) as sock:
        sock.sendall(_vector_bytes("hello-limits"))
        assert _read_exactly(sock, len(welcome)) == welcome
        sock.sendall(_vector_bytes("flush"))
        assert _read_exactly(sock, len(flushed)) == flushed
        conn = next(iter(server.debug_state()["connections"].values()))
        assert conn["peer_max_frame"] == 65536  # from the $hello vector
        assert conn["features"] >= {"ack", "flush", "interest", "ping", "reply"}
    refusing = tcp.server(allow_frame_only=False)
    error = _vector_bytes("error-frame-only")
    with raw_connect(refusing.port) as sock:
        sock.sendall(message_frame("no.hello", 1))
        assert _read_exactly(sock, len(error) + 1) == error  # then the connection closes


def test_tcp_vector_generator_reproduces_the_checked_in_files(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "tcp_make_vectors", os.path.join(VECTORS, "make_vectors.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(str(tmp_path))
    written = sorted(p.name for p in tmp_path.iterdir())
    on_disk = sorted(n for n in os.listdir(VECTORS) if n.endswith((".bin", ".json")))
    assert written == on_disk
    for name in written:
        with open(os.path.join(VECTORS, name), "rb") as f:
            assert (tmp_path / name).read_bytes() == f.read(), name


def test_hmac_vector():
    v = json.load(open(os.path.join(VECTORS, "auth.json")))
    key = v["secret"].encode()
    cn, sn = bytes.fromhex(v["client_nonce"]), bytes.fromhex(v["server_nonce"])
    assert ef._proof(key, b"eventforge-v1 client", cn, sn).hex() == v["client_proof"]
    assert ef._proof(key, b"eventforge-v1 server", sn, cn).hex() == v["server_proof"]


@pytest.mark.parametrize(
    "topic", ["orders.*", "_reply.0a1b", "caf\u00e9.**", "a.\u00e9\u00e8", 'q"uote', "back\\slash"]
)
def test_interest_frames_match_the_generic_control_encoding(topic):
    control = ef._control_frame
    assert ef._interest_frame([topic], []) == control("$interest", {"add": [topic]})
    assert ef._interest_frame([], [topic]) == control("$interest", {"remove": [topic]})
    both = ef._interest_frame([topic, "a.b"], [topic, "x.y"])
    assert both == control("$interest", {"add": [topic, "a.b"], "remove": [topic, "x.y"]})


# -- the fast control-frame parser agrees with decode() ------------------------------------

_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
_field_names = st.sampled_from(
    ["topic", "payload", "id", "headers", "timestamp", "reply_to", "correlation_id", "x"])
_control_topics = st.one_of(
    st.sampled_from(["$hello", "$ack", "$flush", "$x.y", "$", "$a..b", "$a b", "$" + "a" * 70]),
    st.text(max_size=12).map(lambda t: "$" + t),
)


@st.composite
def _control_like_bodies(draw):
    """Bodies starting like a compact control frame, valid or not."""
    obj = {"topic": draw(_control_topics)}
    for name in draw(st.lists(_field_names, max_size=3)):
        obj[name] = draw(_json_values)
    if draw(st.booleans()):
        obj["payload"] = draw(_json_values)
    body = json.dumps(obj, ensure_ascii=draw(st.booleans()),
                      separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    body = body.encode("utf-8", "surrogatepass")
    cut = draw(st.one_of(st.none(), st.integers(0, len(body))))
    tail = draw(st.binary(max_size=4))
    return body if cut is None else body[:cut] + tail


@settings(max_examples=400, deadline=None)
@given(st.one_of(_control_like_bodies(),
                 st.binary(max_size=40).map(lambda b: ef._CONTROL_PREFIX + b)))
def test_fast_control_parser_agrees_with_decode(body):
    fast = ef._fast_control(body)
    if fast is None:
        return  # left to decode(), which then has the last word
    message = ef.decode(body)  # must not raise: the fast path accepted the frame
    assert (message.topic, message.payload) == fast


@pytest.mark.parametrize("body", [
    b'{"topic":"$x","timestamp":"bad"}', b'{"topic":"$x","id":5}',
    b'{"topic":"$x","headers":1}', b'{"topic":"$x","reply_to":[]}',
])
def test_fast_control_parser_leaves_other_keys_to_decode(body):
    assert ef._fast_control(body) is None
    with pytest.raises(ef.FrameError):
        ef.decode(body)
