"""TCP benchmarks, each printed beside baselines measured in the same run.

    python bench/bench_tcp.py            # all figures
    python bench/bench_tcp.py --quick    # fewer messages (smoke run)

Figures (targets from issue 3):
  1. one-way publish throughput, client -> server subscriber, against a raw
     length-prefixed JSON socket floor and pyzmq PUSH/PULL (target >= 1.0x pyzmq);
  2. request/reply round trip p50/p99 over ``MessageQueue.request`` against a
     raw JSON echo floor (target p50 <= 1.3x) and pyzmq REQ/REP;
  3. one server holding 1,000 idle connections: RSS per connection;
  4. fan-out of server publishes to 50 subscribed clients, against a raw
     socket floor writing the same frames.

Every receiver runs in its own process (this file, run with ``--role``), so
the sender and the receiver never share a GIL, for us and the baselines alike.
Throughput takes the best of a few rounds; latency uses all samples.
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
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import eventforge as ef  # noqa: E402

PAYLOAD = {"user": "alice", "action": "login", "n": 0, "tags": ["a", "b"]}
HEADER = struct.Struct(">I")


def row(label: str, value: float, unit: str, baseline: float = 0.0, base_label: str = "",
        invert: bool = False) -> None:
    text = f"  {label:<44} {value:>12,.1f} {unit}"
    if baseline:
        ratio = baseline / value if invert else value / baseline
        text += f"   {ratio:5.2f}x {base_label}"
    print(text, flush=True)


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


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
                buffer += data
                pos = 0
                while len(buffer) - pos >= 4:
                    (size,) = HEADER.unpack_from(buffer, pos)
                    if len(buffer) - pos - 4 < size:
                        break
                    obj = json.loads(buffer[pos + 4:pos + 4 + size])
                    pos += 4 + size
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
                buffer = buffer[pos:]
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
                data = key.fileobj.recv(1 << 18)
                buffer = state[0] + data
                pos = 0
                while len(buffer) - pos >= 4:
                    (size,) = HEADER.unpack_from(buffer, pos)
                    if len(buffer) - pos - 4 < size:
                        break
                    obj = json.loads(buffer[pos + 4:pos + 4 + size])
                    pos += 4 + size
                    if obj["topic"] != "fan.data":
                        continue
                    state[1] += 1
                    if state[1] == count:
                        finished += 1
                state[0] = buffer[pos:]
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
            data = _raw_frame(message._wire_dict())
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


def _read_frame(sock: socket.socket) -> Any:
    (size,) = HEADER.unpack(_recv_exact(sock, 4))
    return json.loads(_recv_exact(sock, size))


def throughput_raw(port: int, count: int) -> float:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started = time.perf_counter()
    for _ in range(count):
        message = ef.Message("pub", PAYLOAD)
        sock.sendall(_raw_frame(message._wire_dict()))
    sock.sendall(_raw_frame({"topic": "end"}))
    got = _read_frame(sock)
    elapsed = time.perf_counter() - started
    assert got["payload"] == count, got
    sock.close()
    return count / elapsed


def throughput_zmq(push: Any, done: Any, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        message = ef.Message("pub", PAYLOAD)
        push.send_json(message._wire_dict())
    push.send_json({"topic": "end"})
    got = done.recv_json()
    elapsed = time.perf_counter() - started
    assert got == count, got
    return count / elapsed


def throughput_ef(queue: ef.MessageQueue, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        queue.publish("bench.pub", PAYLOAD)
    reply = queue.request("bench.end", None, timeout=60)
    elapsed = time.perf_counter() - started
    assert reply is not None and reply.payload == count, reply
    return count / elapsed


def percentiles(samples: List[float]) -> Tuple[float, float]:
    samples = sorted(samples)
    p50 = samples[len(samples) // 2]
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return p50 * 1e6, p99 * 1e6


def latency_raw(port: int, rounds: int) -> Tuple[float, float]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        message = ef.Message("echo", PAYLOAD)
        sock.sendall(_raw_frame(message._wire_dict()))
        _read_frame(sock)
        samples.append(time.perf_counter() - started)
    sock.close()
    return percentiles(samples[rounds // 10:])


def latency_zmq(req: Any, rounds: int) -> Tuple[float, float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        req.send_json(ef.Message("echo", PAYLOAD)._wire_dict())
        req.recv_json()
        samples.append(time.perf_counter() - started)
    return percentiles(samples[rounds // 10:])


def latency_ef(queue: ef.MessageQueue, rounds: int) -> Tuple[float, float]:
    samples = []
    request = queue.request
    for _ in range(rounds):
        started = time.perf_counter()
        reply = request("bench.echo", PAYLOAD, timeout=10)
        samples.append(time.perf_counter() - started)
        assert reply is not None
    return percentiles(samples[rounds // 10:])


def bench_throughput_and_latency(count: int, rounds: int, repeat: int) -> None:
    import zmq

    raw = Child("raw-server")
    raw_port = int(raw.line())
    efs = Child("ef-server")
    ef_port = int(efs.line())
    zq = Child("zmq-pull")
    pull_port, rep_port = (int(x) for x in zq.line().split())
    context = zmq.Context()
    done = context.socket(zmq.PULL)
    done_port = done.bind_to_random_port("tcp://127.0.0.1")
    zq.send(str(done_port))
    push = context.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{pull_port}")
    req = context.socket(zmq.REQ)
    req.connect(f"tcp://127.0.0.1:{rep_port}")
    client = ef.TCPClientTransport("127.0.0.1", ef_port).connect(10)
    queue = ef.MessageQueue(transport=client)
    try:
        print(f"\n1. one-way publish throughput, client -> server subscriber "
              f"({count:,} messages, best of {repeat})")
        raw_rate = max(throughput_raw(raw_port, count) for _ in range(repeat))
        zmq_rate = max(throughput_zmq(push, done, count) for _ in range(repeat))
        ef_rate = max(throughput_ef(queue, count) for _ in range(repeat))
        row("raw length-prefixed JSON socket (floor)", raw_rate, "msg/s")
        row("pyzmq PUSH/PULL, send_json/recv_json", zmq_rate, "msg/s")
        row("eventforge MessageQueue.publish over TCP", ef_rate, "msg/s", raw_rate,
            "of raw")
        print(f"  {'':<44} {'':>12}       {ef_rate / zmq_rate:5.2f}x of pyzmq "
              f"(target >= 1.0x: {verdict(ef_rate >= zmq_rate)})")

        print(f"\n2. request/reply round trip ({rounds:,} rounds, microseconds)")
        raw_p50, raw_p99 = latency_raw(raw_port, rounds)
        zmq_p50, zmq_p99 = latency_zmq(req, rounds)
        ef_p50, ef_p99 = latency_ef(queue, rounds)
        other = {}
        for mode in ("inline", "thread"):
            child = Child("ef-server", mode)
            mode_client = ef.TCPClientTransport("127.0.0.1", int(child.line())).connect(10)
            try:
                other[mode] = latency_ef(ef.MessageQueue(transport=mode_client), rounds)
            finally:
                mode_client.close()
                child.close()
        row("raw JSON echo floor p50", raw_p50, "us")
        row("raw JSON echo floor p99", raw_p99, "us")
        row("pyzmq REQ/REP p50", zmq_p50, "us", raw_p50, "of raw")
        row("pyzmq REQ/REP p99", zmq_p99, "us", raw_p99, "of raw")
        row("eventforge MessageQueue.request p50", ef_p50, "us", raw_p50, "of raw")
        row("eventforge MessageQueue.request p99", ef_p99, "us", raw_p99, "of raw")
        for mode, (p50, p99) in other.items():
            row(f"  same, server dispatch={mode!r} p50", p50, "us", raw_p50, "of raw")
            row(f"  same, server dispatch={mode!r} p99", p99, "us", raw_p99, "of raw")
        print(f"  p50 target <= 1.3x raw floor: {verdict(ef_p50 <= 1.3 * raw_p50)}")
    finally:
        client.close()
        for sock in (push, req, done):
            sock.close(linger=0)
        context.term()
        efs.close()
        for child in (raw, zq):
            child.process.kill()
            child.process.wait(5)


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
        row("server RSS before", before / 1e6, "MB")
        row(f"server RSS with {connections:,} connections", after / 1e6, "MB")
        row("RSS per idle connection", (after - before) / connections / 1024, "KiB")
    finally:
        for sock in socks:
            sock.close()
        efs.close()


def _fanout_ef(clients: int, count: int, repeat: int, kind: str) -> float:
    efs = Child("ef-server")
    port = int(efs.line())
    fans = Child("fan-clients", str(port), str(clients), str(count), kind)
    control = None
    best = 0.0
    try:
        assert fans.line() == "ready"
        control = ef.MessageQueue(transport=ef.TCPClientTransport("127.0.0.1", port).connect(10))
        time.sleep(0.2)
        for r in range(repeat):
            started = time.perf_counter()
            control.request("bench.fanout", {"count": count}, timeout=60)
            assert fans.line() == "done"
            elapsed = time.perf_counter() - started
            best = max(best, clients * count / elapsed)
            if r < repeat - 1:
                fans.send("again")
    finally:
        if control is not None:
            control.close()
        fans.close()
        efs.close()
    return best


def bench_fanout(clients: int, count: int, repeat: int) -> None:
    print(f"\n4. fan-out: server publishes {count:,} messages to {clients} subscribed clients")
    best_ef = _fanout_ef(clients, count, repeat, "ef")
    best_ef_raw = _fanout_ef(clients, count, repeat, "raw-hs")
    raw_server = Child("raw-fanout-server", str(clients))
    port = int(raw_server.line())
    fans = Child("fan-clients", str(port), str(clients), str(count), "raw")
    best_raw = 0.0
    try:
        assert fans.line() == "ready"
        for r in range(repeat):
            started = time.perf_counter()
            raw_server.send(str(count))
            assert raw_server.line() == "sent"
            assert fans.line() == "done"
            elapsed = time.perf_counter() - started
            best_raw = max(best_raw, clients * count / elapsed)
            if r < repeat - 1:
                fans.send("again")
    finally:
        fans.close()
        raw_server.close()
    row("raw sockets, same frames (floor)", best_raw, "deliveries/s")
    row("eventforge server -> raw readers", best_ef_raw, "deliveries/s", best_raw, "of raw")
    row(f"eventforge server -> {clients} TCPClientTransports", best_ef, "deliveries/s",
        best_raw, "of raw")
    print(f"  (the last row runs {clients} client transports, {2 * clients} threads, in one "
          "process; the raw readers use one thread)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages (smoke run)")
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
    print(f"eventforge {ef.__version__} TCP benchmarks, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs")
    bench_throughput_and_latency(count=5000 if quick else 100000,
                                 rounds=300 if quick else 5000, repeat=1 if quick else 3)
    bench_idle_connections(100 if quick else 1000)
    bench_fanout(clients=10 if quick else 50, count=100 if quick else 2000,
                 repeat=1 if quick else 3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
