"""TCP benchmarks, each printed beside baselines measured in the same run.

    python bench/bench_tcp.py              # all figures
    python bench/bench_tcp.py --quick      # less work per round, 3 rounds (smoke run)
    python bench/bench_tcp.py --rounds 15  # more rounds for a steadier median
    python bench/bench_tcp.py --cpus 0     # all processes on one CPU: no cross-CPU wake-ups

Figures (targets from issues 3 and 9):
  1. one-way publish: a client publishes small messages, a subscriber in the
     server process counts them; throughput against a raw length-prefixed
     JSON socket and pyzmq PUSH/PULL (target >= 1.0x pyzmq), and the cost per
     message of the client's publish loop alone;
  2. request/reply round trip p50/p99 over ``MessageQueue.request`` against a
     raw JSON echo floor (target p50 <= 1.2x, p99 <= 1.5x) and pyzmq REQ/REP,
     with the server in each dispatch mode;
  3. one server holding 1,000 idle connections: RSS per connection;
  4. fan-out of server publishes to 50 subscribed clients, against a raw
     socket floor writing the same frames.

Every receiver runs in its own process (this file, run with ``--role``), so
the sender and the receiver never share a GIL, for us and the baselines alike.
The baselines do what an application using them would: they send the JSON of
a plain ``{"topic": ..., "payload": ...}`` dict built per message, never an
eventforge ``Message`` (whose id, timestamp and headers are eventforge's own
cost), and the bytes each contender puts on the wire per message are printed.
Each one-way round ends the same way for all: the sender asks the receiver
for its count and waits for the answer, inside the timed span.
All the servers of a figure are up at once; eventforge and its baselines run
in the same rounds, in random order; each figure is the median over the
rounds with its min-max range, ratios are taken per round, and every verdict
is computed from the measured median (see ``bench/_common.py``).  The machine
may be shared: read ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import _common as bench  # noqa: E402

import eventforge as ef  # noqa: E402

PAYLOAD = {"user": "alice", "action": "login", "n": 0, "tags": ["a", "b"]}
HEADER = struct.Struct(">I")
US = 1e6  # seconds -> microseconds
ROUND_TRIP_P50_TARGET = 1.2  # x the raw echo floor (issue 9; issue 3 asked 1.3x)
ROUND_TRIP_P99_TARGET = 1.5


# ---------------------------------------------------------------------------
# Child processes (receivers)
# ---------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise ConnectionError("closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _raw_frame(obj: Any) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def _plain(topic: str) -> Dict[str, Any]:
    """What a baseline sends: the payload under a topic, nothing else."""
    return {"topic": topic, "payload": PAYLOAD}


def _zmq_bytes(obj: Any) -> int:
    # ZMTP 3 frame: 1 flag byte + 1 length byte below 256 bytes (else 8).
    body = len(json.dumps(obj).encode())  # send_json: json.dumps defaults
    return body + (2 if body < 256 else 9)


def _ef_bytes(message: ef.Message) -> int:
    return len(ef.encode(message))


def _split_frames(buffer: bytes) -> Tuple[List[Any], bytes]:
    """Decode the complete length-prefixed JSON frames in ``buffer``; return them and the rest."""
    frames = []
    pos = 0
    while len(buffer) - pos >= 4:
        (size,) = HEADER.unpack_from(buffer, pos)
        if len(buffer) - pos - 4 < size:
            break
        frames.append(json.loads(buffer[pos + 4:pos + 4 + size]))
        pos += 4 + size
    return frames, buffer[pos:]


def role_raw_server() -> None:
    """The floor: thread per connection, read a frame, json.loads, act."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)

    def serve(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        count = 0
        try:
            while True:
                data = sock.recv(1 << 18)
                if not data:
                    return
                frames, buffer = _split_frames(buffer + data)
                for obj in frames:
                    kind = obj.get("topic")
                    if kind == "echo":
                        sock.sendall(_raw_frame({"topic": "reply", "payload": obj["payload"]}))
                    elif kind == "end":
                        sock.sendall(_raw_frame({"topic": "done", "payload": count}))
                        count = 0
                    elif kind == "fanout":
                        return  # handled by role_raw_fanout
                    else:
                        count += 1
        except OSError:
            return

    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


def role_ef_server(dispatch: Optional[str] = None) -> None:
    options: Dict[str, Any] = {"dispatch": dispatch} if dispatch else {}
    server = ef.TCPServerTransport("127.0.0.1", 0, max_connections=2000, **options).start()
    queue = ef.MessageQueue(transport=server)
    counter = [0]

    def on_pub(message: ef.Message) -> None:
        counter[0] += 1

    def on_end(message: ef.Message) -> None:
        queue.reply(message, counter[0])
        counter[0] = 0

    def on_echo(message: ef.Message) -> None:
        queue.reply(message, message.payload)

    def on_fanout(message: ef.Message) -> None:
        count = message.payload["count"]
        for i in range(count):
            queue.publish("fan.data", i)
        queue.reply(message, count)

    queue.subscribe("bench.pub", on_pub)
    queue.subscribe("bench.end", on_end)
    queue.subscribe("bench.echo", on_echo)
    queue.subscribe("bench.fanout", on_fanout)
    print(server.port, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    queue.close()


def role_zmq_pull() -> None:
    import zmq

    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    rep = context.socket(zmq.REP)
    rep_port = rep.bind_to_random_port("tcp://127.0.0.1")
    push = context.socket(zmq.PUSH)
    print(port, rep_port, flush=True)
    done_port = int(sys.stdin.readline())
    push.connect(f"tcp://127.0.0.1:{done_port}")

    def echo() -> None:
        while True:
            obj = rep.recv_json()
            rep.send_json({"topic": "reply", "payload": obj["payload"]})

    threading.Thread(target=echo, daemon=True).start()
    count = 0
    while True:
        obj = pull.recv_json()
        if obj.get("topic") == "end":
            push.send_json(count)
            count = 0
        else:
            count += 1


def role_fan_clients(port: int, clients: int, count: int, kind: str) -> None:
    """``clients`` subscribers of fan.data; print when each got ``count``."""
    if kind == "ef":
        transports = []
        totals = [0] * clients
        done = threading.Event()
        finished = [0]
        lock = threading.Lock()

        def make(n: int) -> Any:
            def on(message: ef.Message) -> None:
                totals[n] += 1
                if totals[n] == count:
                    with lock:
                        finished[0] += 1
                        if finished[0] == clients:
                            done.set()
            return on

        for n in range(clients):
            transport = ef.TCPClientTransport("127.0.0.1", port).connect(10)
            transport.subscribe("fan.data", make(n))
            transports.append(transport)
        time.sleep(0.3)
        print("ready", flush=True)
        while True:
            done.wait()
            done.clear()
            for n in range(clients):  # before "done": the next round may start at once
                totals[n] = 0
            finished[0] = 0
            print("done", flush=True)
            if sys.stdin.readline() == "":
                break
        for transport in transports:
            transport.close()
        return
    # raw readers: one selector thread decoding frames for all clients
    # ("raw-hs" first does our handshake and asks for fan.data only)
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(clients):
        sock = socket.create_connection(("127.0.0.1", port))
        if kind == "raw-hs":
            sock.sendall(_raw_frame({"topic": "$hello", "payload": {
                "version": 1, "features": ["interest"], "nonce": os.urandom(32).hex()}}))
            _read_frame(sock)
            sock.sendall(_raw_frame({"topic": "$interest", "payload": {"add": ["fan.data"]}}))
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, [b"", 0])
        socks.append(sock)
    print("ready", flush=True)
    while True:
        finished = 0
        while finished < clients:
            for key, _ in sel.select():
                state = key.data
                frames, state[0] = _split_frames(state[0] + key.fileobj.recv(1 << 18))
                for obj in frames:
                    if obj["topic"] != "fan.data":
                        continue
                    state[1] += 1
                    if state[1] == count:
                        finished += 1
        for key in sel.get_map().values():
            key.data[1] = 0
        print("done", flush=True)
        if sys.stdin.readline() == "":
            break


def role_raw_fanout_server(clients: int) -> None:
    """Accept ``clients`` sockets; on each stdin line 'N', write N frames to all."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    socks = [listener.accept()[0] for _ in range(clients)]
    for sock in socks:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for line in sys.stdin:
        count = int(line)
        for i in range(count):
            message = ef.Message("fan.data", i)
            data = _raw_frame(message.model_dump(mode="json"))
            for sock in socks:
                sock.sendall(data)
        print("sent", flush=True)


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------


class Child:
    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--role", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def rss(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def close(self) -> None:
        try:
            assert self.process.stdin is not None
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(5)


def _read_frame(sock: socket.socket) -> Any:
    (size,) = HEADER.unpack(_recv_exact(sock, 4))
    return json.loads(_recv_exact(sock, size))


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# A one-way publish round: (messages per second end to end, microseconds per
# message spent in the client's publish loop alone).
Throughput = Tuple[float, float]


def _one_way(publish_all: Callable[[], None], finish: Callable[[], object],
             count: int) -> Throughput:
    clock = time.perf_counter
    started = clock()
    publish_all()
    looped = clock()
    got = finish()
    elapsed = clock() - started
    assert got == count, got
    return count / elapsed, (looped - started) / count * US


def throughput_raw(sock: socket.socket, count: int) -> Throughput:
    def publish_all() -> None:
        for _ in range(count):
            sock.sendall(_raw_frame(_plain("bench.pub")))

    def finish() -> object:
        sock.sendall(_raw_frame({"topic": "end"}))
        return _read_frame(sock)["payload"]

    return _one_way(publish_all, finish, count)


def throughput_zmq(push: Any, done: Any, count: int) -> Throughput:
    def publish_all() -> None:
        for _ in range(count):
            push.send_json(_plain("bench.pub"))

    def finish() -> object:
        push.send_json({"topic": "end"})
        return done.recv_json()

    return _one_way(publish_all, finish, count)


def throughput_ef(queue: ef.MessageQueue, count: int) -> Throughput:
    def publish_all() -> None:
        publish = queue.publish
        for _ in range(count):
            publish("bench.pub", PAYLOAD)

    def finish() -> object:
        reply = queue.request("bench.end", None, timeout=60)
        return None if reply is None else reply.payload

    return _one_way(publish_all, finish, count)


def latency_raw(sock: socket.socket, count: int) -> List[float]:
    def call(i: int) -> None:
        sock.sendall(_raw_frame(_plain("echo")))
        _read_frame(sock)

    return bench.time_calls(call, count)


def latency_zmq(req: Any, count: int) -> List[float]:
    def call(i: int) -> None:
        req.send_json(_plain("echo"))
        req.recv_json()

    return bench.time_calls(call, count)


def latency_ef(queue: ef.MessageQueue, count: int) -> List[float]:
    request = queue.request

    def call(i: int) -> None:
        reply = request("bench.echo", PAYLOAD, timeout=10)
        assert reply is not None

    return bench.time_calls(call, count)


def _p50_p99(rounds_of_samples: List[List[float]]) -> Tuple[List[float], List[float]]:
    """Per-round p50 and p99, in microseconds."""
    return ([bench.percentile(samples, 50) * US for samples in rounds_of_samples],
            [bench.percentile(samples, 99) * US for samples in rounds_of_samples])


def bench_throughput_and_latency(count: int, calls: int, rounds: int) -> None:
    import zmq

    children: List[Child] = []
    closers: List[Callable[[], None]] = []
    context = zmq.Context()
    try:
        raw = Child("raw-server")
        children.append(raw)
        raw_sock = _connect(int(raw.line()))
        closers.append(raw_sock.close)
        zq = Child("zmq-pull")
        children.append(zq)
        pull_port, rep_port = (int(x) for x in zq.line().split())
        done = context.socket(zmq.PULL)
        closers.append(lambda: done.close(linger=0))
        zq.send(str(done.bind_to_random_port("tcp://127.0.0.1")))
        push = context.socket(zmq.PUSH)
        closers.append(lambda: push.close(linger=0))
        push.connect(f"tcp://127.0.0.1:{pull_port}")
        req = context.socket(zmq.REQ)
        closers.append(lambda: req.close(linger=0))
        req.connect(f"tcp://127.0.0.1:{rep_port}")
        queues: Dict[str, ef.MessageQueue] = {}
        for mode in ("leader", "inline", "thread"):
            child = Child("ef-server", mode)
            children.append(child)
            client = ef.TCPClientTransport("127.0.0.1", int(child.line())).connect(10)
            queues[mode] = ef.MessageQueue(transport=client)
            closers.append(queues[mode].close)
        queue = queues["leader"]  # the default dispatch mode

        print(f"\n1. one-way publish, client -> subscriber in the server process "
              f"({count:,} messages per round)")
        for warm in (throughput_raw(raw_sock, 1000), throughput_zmq(push, done, 1000),
                     throughput_ef(queue, 1000)):
            assert warm[0] > 0
        got = bench.interleave({
            "raw": lambda: throughput_raw(raw_sock, count),
            "zmq": lambda: throughput_zmq(push, done, count),
            "ef": lambda: throughput_ef(queue, count),
        }, rounds)
        rate = {name: [r for r, _ in results] for name, results in got.items()}
        loop = {name: [c for _, c in results] for name, results in got.items()}
        bench.row("raw JSON socket, one sendall per message", rate["raw"], "msg/s")
        bench.row("pyzmq PUSH/PULL, send_json/recv_json", rate["zmq"], "msg/s")
        bench.row("eventforge MessageQueue.publish over TCP", rate["ef"], "msg/s", rate["raw"],
                  "of raw")
        bench.row("", rate["ef"], "msg/s", rate["zmq"], "of pyzmq")
        print("  client publish loop alone, per message:")
        bench.row("  raw: build dict, json.dumps, sendall", loop["raw"], "us")
        bench.row("  pyzmq: build dict, send_json", loop["zmq"], "us")
        bench.row("  eventforge: MessageQueue.publish", loop["ef"], "us", loop["zmq"],
                  "of pyzmq")
        print(f"  bytes per message on the wire, client -> server: raw "
              f"{len(_raw_frame(_plain('bench.pub')))}, pyzmq {_zmq_bytes(_plain('bench.pub'))}, "
              f"eventforge {_ef_bytes(ef.Message('bench.pub', PAYLOAD))} (its id, timestamp, "
              "headers, reply_to and correlation_id included)")
        bench.verdict("eventforge / pyzmq throughput", bench.ratios(rate["ef"], rate["zmq"]),
                      1.0, at_most=False)

        print(f"\n2. request/reply round trip ({calls:,} calls per round, microseconds)")
        for warm in (latency_raw(raw_sock, 100), latency_zmq(req, 100),
                     *(latency_ef(q, 100) for q in queues.values())):
            assert warm
        contenders: Dict[str, Callable[[], List[float]]] = {
            "raw": lambda: latency_raw(raw_sock, calls),
            "zmq": lambda: latency_zmq(req, calls),
        }
        for mode, mode_queue in queues.items():
            contenders[mode] = lambda q=mode_queue: latency_ef(q, calls)
        latency = {name: _p50_p99(samples)
                   for name, samples in bench.interleave(contenders, rounds).items()}
        raw_p50, raw_p99 = latency["raw"]
        request = ef.Message("bench.echo", PAYLOAD, headers={"_ttl_ms": 10000},
                             reply_to="_reply." + ef.new_id())
        print(f"  request bytes on the wire: raw {len(_raw_frame(_plain('echo')))}, pyzmq "
              f"{_zmq_bytes(_plain('echo'))}, eventforge {_ef_bytes(request)}")
        bench.row("raw JSON echo floor p50", raw_p50, "us")
        bench.row("raw JSON echo floor p99", raw_p99, "us")
        bench.row("pyzmq REQ/REP p50", latency["zmq"][0], "us", raw_p50, "of raw")
        bench.row("pyzmq REQ/REP p99", latency["zmq"][1], "us", raw_p99, "of raw")
        for mode in queues:
            p50, p99 = latency[mode]
            label = ("eventforge MessageQueue.request" if mode == "leader"
                     else f"  same, server dispatch={mode!r}")
            bench.row(f"{label} p50", p50, "us", raw_p50, "of raw")
            bench.row(f"{label} p99", p99, "us", raw_p99, "of raw")
        ef_p50, ef_p99 = latency["leader"]
        bench.verdict("request p50 / raw floor p50", bench.ratios(ef_p50, raw_p50),
                      ROUND_TRIP_P50_TARGET)
        bench.verdict("request p99 / raw floor p99", bench.ratios(ef_p99, raw_p99),
                      ROUND_TRIP_P99_TARGET)
    finally:
        for close in reversed(closers):
            close()
        context.term()
        for child in children:
            child.kill()  # the raw and pyzmq servers never read stdin


def bench_idle_connections(connections: int) -> None:
    print(f"\n3. one server holding {connections:,} idle connections")
    efs = Child("ef-server")
    port = int(efs.line())
    socks = []
    try:
        time.sleep(0.3)
        before = efs.rss()
        hello = ef.encode(ef.Message("$hello", {"version": 1, "features": ["interest", "ping"],
                                                "nonce": os.urandom(32).hex()}))
        for i in range(connections):
            sock = socket.create_connection(("127.0.0.1", port))
            if i % 2 == 0:
                sock.sendall(hello)  # half speak the handshake, half are frame-only
            socks.append(sock)
        for i, sock in enumerate(socks):
            if i % 2 == 0:
                _read_frame(sock)
        time.sleep(0.5)
        after = efs.rss()
        bench.row("server RSS before", [before / 1e6], "MB")
        bench.row(f"server RSS with {connections:,} connections", [after / 1e6], "MB")
        bench.row("RSS per idle connection", [(after - before) / connections / 1024], "KiB")
    finally:
        for sock in socks:
            sock.close()
        efs.close()


class FanOut:
    """A server and ``clients`` subscribed readers; :meth:`round` times one fan-out."""

    def __init__(self, server: str, clients: int, count: int, kind: str) -> None:
        self.clients, self.count, self.rounds = clients, count, 0
        self.children: List[Child] = []
        self.control: Optional[ef.MessageQueue] = None
        self.server = self._child(server, *([str(clients)] if server != "ef-server" else []))
        port = self.server.line()
        self.readers = self._child("fan-clients", port, str(clients), str(count), kind)
        assert self.readers.line() == "ready"
        if server == "ef-server":
            transport = ef.TCPClientTransport("127.0.0.1", int(port)).connect(10)
            self.control = ef.MessageQueue(transport=transport)
        time.sleep(0.2)

    def _child(self, *args: str) -> Child:
        child = Child(*args)
        self.children.append(child)
        return child

    def round(self) -> float:
        """Deliveries per second of one server-side fan-out of ``count`` messages."""
        if self.rounds:
            self.readers.send("again")  # the readers wait for this after each "done"
        self.rounds += 1
        started = time.perf_counter()
        if self.control is not None:
            self.control.request("bench.fanout", {"count": self.count}, timeout=60)
        else:
            self.server.send(str(self.count))
            assert self.server.line() == "sent"
        assert self.readers.line() == "done"
        return self.clients * self.count / (time.perf_counter() - started)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        for child in reversed(self.children):
            child.close()


def bench_fanout(clients: int, count: int, rounds: int) -> None:
    print(f"\n4. fan-out: server publishes {count:,} messages to {clients} subscribed clients")
    setups: Dict[str, FanOut] = {}
    try:
        for name, server, kind in (("raw", "raw-fanout-server", "raw"),
                                   ("ef-raw", "ef-server", "raw-hs"),
                                   ("ef", "ef-server", "ef")):
            setups[name] = FanOut(server, clients, count, kind)
        got = bench.interleave({name: setup.round for name, setup in setups.items()}, rounds)
    finally:
        for setup in setups.values():
            setup.close()
    bench.row("raw sockets, same frames (floor)", got["raw"], "msg/s")
    bench.row("eventforge server -> raw readers", got["ef-raw"], "msg/s", got["raw"], "of raw")
    bench.row(f"eventforge server -> {clients} TCPClientTransports", got["ef"], "msg/s",
              got["raw"], "of raw")
    print(f"  (deliveries per second; the last row runs {clients} client transports, "
          f"{2 * clients} threads, in one process; the raw readers use one thread)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = bench.parser(__doc__)
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        name, rest = args.role[0], args.role[1:]
        roles: Dict[str, Any] = {
            "raw-server": role_raw_server,
            "ef-server": lambda: role_ef_server(*rest),
            "zmq-pull": role_zmq_pull,
            "fan-clients": lambda: role_fan_clients(int(rest[0]), int(rest[1]), int(rest[2]),
                                                    rest[3]),
            "raw-fanout-server": lambda: role_raw_fanout_server(int(rest[0])),
        }
        roles[name]()
        return 0
    quick = args.quick
    rounds = bench.rounds_of(args)
    bench.header("TCP benchmarks", ef.__version__, rounds)
    bench_throughput_and_latency(count=5_000 if quick else 50_000,
                                 calls=300 if quick else 2_000, rounds=rounds)
    bench_idle_connections(100 if quick else 1000)
    bench_fanout(clients=10 if quick else 50, count=100 if quick else 1000, rounds=rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
