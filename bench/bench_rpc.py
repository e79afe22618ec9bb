"""RPC benchmarks, each printed beside baselines measured in the same run.

    python bench/bench_rpc.py              # all figures (peers: pip install pyro5 rpyc pyzmq)
    python bench/bench_rpc.py --quick      # fewer calls, 3 rounds (smoke run)
    python bench/bench_rpc.py --rounds 15  # more rounds for a steadier median
    python bench/bench_rpc.py --cpus 0     # all processes on one CPU: no cross-CPU wake-ups

Figures (targets from issues 4 and 9):
  1. RPC over MemoryTransport, p50 of a call (target <= 10 us), beside
     MessageQueue.request on the same transport;
  2. RPC round trip over TCP loopback, p50 and p99, against a raw
     length-prefixed JSON echo over a socket (the floor), xmlrpc, Pyro5,
     RPyC and pyzmq REQ/REP (target: p50 <= 1.2x the floor, p99 <= 1.5x,
     ahead of RPyC), to an ``eventforge worker --workers 1`` and to an
     RPCServer without an executor (methods run inline), with
     ``MessageQueue.request`` to a plain subscriber against the same floor.
     Every server runs in its own process (this script with --serve KIND),
     all at once;
  3. throughput of one worker process with 4 concurrent callers on a method
     sleeping 5 ms, --workers 4 against --workers 1 (should scale near 4x).

A peer that is not installed is reported as skipped.  eventforge and its
baselines run in the same rounds, in random order; each figure is the median
over the rounds with its min-max range, ratios are taken per round, and every
verdict is computed from the measured median (see ``bench/_common.py``).  The
machine may be shared: read ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import _common as bench  # noqa: E402

import eventforge as ef  # noqa: E402

US = 1e6  # seconds -> microseconds
ROUND_TRIP_P50_TARGET = 1.2  # x the raw echo floor (issue 9; issue 4 asked 1.3x)
ROUND_TRIP_P99_TARGET = 1.5

HANDLERS = '''
import time

def add(a, b):
    return a + b

def sleep5():
    time.sleep(0.005)
    return True

HANDLERS = {"add": add, "sleep5": sleep5}
'''


# -- servers (run as: bench_rpc.py --serve KIND; they print "PORT <n>") ---------


def _announce(port):
    print(f"PORT {port}", flush=True)


def _recv_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve_raw():
    """Length-prefixed JSON echo-add: the floor any JSON-over-TCP RPC pays."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    _announce(listener.getsockname()[1])

    def handle(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            header = _recv_exact(conn, 4)
            if header is None:
                return
            body = _recv_exact(conn, struct.unpack(">I", header)[0])
            request = json.loads(body)
            reply = json.dumps({"id": request["id"],
                                "result": request["args"][0] + request["args"][1]}).encode()
            conn.sendall(struct.pack(">I", len(reply)) + reply)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def serve_xmlrpc():
    from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

    class Handler(SimpleXMLRPCRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, the fair setting

    server = SimpleXMLRPCServer(("127.0.0.1", 0), requestHandler=Handler, logRequests=False)
    server.register_function(lambda a, b: a + b, "add")
    _announce(server.server_address[1])
    server.serve_forever()


def serve_pyro5():
    import Pyro5.api

    @Pyro5.api.expose
    class Calc:
        def add(self, a, b):
            return a + b

    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    daemon.register(Calc, "calc")
    _announce(daemon.locationStr.rsplit(":", 1)[1])
    daemon.requestLoop()


def serve_rpyc():
    import rpyc
    from rpyc.utils.server import ThreadedServer

    class Calc(rpyc.Service):
        def exposed_add(self, a, b):
            return a + b

    server = ThreadedServer(Calc, hostname="127.0.0.1", port=0)
    _announce(server.port)
    server.start()


def serve_zmq():
    import zmq

    context = zmq.Context()
    rep = context.socket(zmq.REP)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    _announce(port)
    while True:
        request = json.loads(rep.recv())
        rep.send(json.dumps({"id": request["id"],
                             "result": request["args"][0] + request["args"][1]}).encode())


def serve_ef_inline():
    """An RPCServer without an executor (methods run in the transport's dispatch
    thread), and a plain ``math.add`` subscriber answering MessageQueue.request."""
    transport = ef.TCPServerTransport("127.0.0.1", 0).start()
    queue = ef.MessageQueue(transport)
    queue.subscribe("math.add", lambda m: queue.reply(m, m.payload[0] + m.payload[1]))
    server = ef.RPCServer(queue, service_name="bench")
    server.add_method("add", lambda a, b: a + b)
    server.serve(blocking=False)
    _announce(transport.port)
    threading.Event().wait()  # until the parent terminates us


SERVERS = {"raw": serve_raw, "xmlrpc": serve_xmlrpc, "pyro5": serve_pyro5,
           "rpyc": serve_rpyc, "zmq": serve_zmq, "ef-inline": serve_ef_inline}


# -- clients -------------------------------------------------------------------


class Server:
    """A server subprocess; ``port`` once it announced it."""

    def __init__(self, command, cwd=None):
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True, cwd=cwd, env=env)
        self.port = None
        deadline = time.monotonic() + 30
        for line in self.proc.stdout:
            if line.startswith("PORT "):
                self.port = int(line.split()[1])
                break
            if "ready:" in line:
                self.port = int(line.split(" on ")[1].split(" ")[0].rsplit(":", 1)[1])
                break
            if time.monotonic() > deadline:
                break
        if self.port is None:
            self.stop()
            raise RuntimeError(f"server {command} did not start: {self.proc.stderr.read()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


def raw_client(port):
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(i):
        body = json.dumps({"id": str(i), "method": "add", "args": [i, 1]}).encode()
        conn.sendall(struct.pack(">I", len(body)) + body)
        header = _recv_exact(conn, 4)
        reply = json.loads(_recv_exact(conn, struct.unpack(">I", header)[0]))
        assert reply["result"] == i + 1
    return call, conn.close


def xmlrpc_client(port):
    import xmlrpc.client

    proxy = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}")

    def call(i):
        assert proxy.add(i, 1) == i + 1
    return call, proxy("close")


def pyro5_client(port):
    import Pyro5.api

    proxy = Pyro5.api.Proxy(f"PYRO:calc@127.0.0.1:{port}")

    def call(i):
        assert proxy.add(i, 1) == i + 1
    return call, proxy._pyroRelease


def rpyc_client(port):
    import rpyc

    conn = rpyc.connect("127.0.0.1", port)

    def call(i):
        assert conn.root.add(i, 1) == i + 1
    return call, conn.close


def zmq_client(port):
    import zmq

    context = zmq.Context()
    req = context.socket(zmq.REQ)
    req.connect(f"tcp://127.0.0.1:{port}")

    def call(i):
        req.send(json.dumps({"id": str(i), "method": "add", "args": [i, 1]}).encode())
        assert json.loads(req.recv())["result"] == i + 1

    def close():
        req.close(0)
        context.term()
    return call, close


def _eventforge_queue(port):
    from eventforge.transports.tcp import TCPClientTransport

    transport = TCPClientTransport("127.0.0.1", port)
    transport.connect(timeout=10)
    return ef.MessageQueue(transport)


def eventforge_client(port):
    queue = _eventforge_queue(port)
    client = ef.RPCClient(queue, service_name="bench", timeout=10)

    def call(i):
        assert client.call("add", i, 1) == i + 1
    return call, queue.close


def eventforge_request_client(port):
    """MessageQueue.request to the ``math.add`` subscriber of the ef-inline server."""
    queue = _eventforge_queue(port)

    def call(i):
        reply = queue.request("math.add", [i, 1], timeout=10)
        assert reply is not None and reply.payload == i + 1
    return call, queue.close


def _p50_p99(rounds_of_samples):
    """Per-round p50 and p99, in microseconds."""
    return ([bench.percentile(samples, 50) * US for samples in rounds_of_samples],
            [bench.percentile(samples, 99) * US for samples in rounds_of_samples])


def _calls(call, count):
    """A contender for bench.interleave: one round times ``count`` calls."""
    return lambda: bench.time_calls(call, count)


def _latency_rows(label, latency, floor=None):
    p50, p99 = latency
    bench.row(f"{label} p50", p50, "us", floor and floor[0], "floor")
    bench.row(f"{label} p99", p99, "us", floor and floor[1], "floor")


def bench_memory(calls, rounds):
    print(f"\n1. RPC over MemoryTransport ({calls:,} calls per round)")
    with ef.MessageQueue() as queue:
        server = ef.RPCServer(queue, service_name="bench")
        server.add_method("add", lambda a, b: a + b)
        server.serve(blocking=False)
        client = ef.RPCClient(queue, service_name="bench")
        queue.subscribe("math.add", lambda m: queue.reply(m, m.payload[0] + m.payload[1]))

        def rpc(i):
            assert client.call("add", i, 1) == i + 1

        def request(i):
            queue.request("math.add", [i, 1], timeout=5)

        for warm in (rpc, request):
            bench.time_calls(warm, calls // 10)
        got = bench.interleave({"rpc": _calls(rpc, calls), "request": _calls(request, calls)},
                               rounds)
        server.stop()
    request_latency, rpc_latency = _p50_p99(got["request"]), _p50_p99(got["rpc"])
    _latency_rows("MessageQueue.request (baseline)", request_latency)
    bench.row("RPCClient.call p50", rpc_latency[0], "us", request_latency[0], "request")
    bench.row("RPCClient.call p99", rpc_latency[1], "us", request_latency[1], "request")
    bench.verdict("RPC p50 over MemoryTransport", rpc_latency[0], 10, unit=" us")
    return rpc_latency[0]


# The eventforge contenders of figure 2: a plain request to a subscriber, RPC
# to a server without an executor, RPC to a worker (its executor adds a hand-off).
EVENTFORGE = ("ef-request", "ef-inline", "ef-worker")

PEERS = [("raw JSON echo (floor)", "raw", raw_client),
         ("xmlrpc (stdlib, HTTP/1.1)", "xmlrpc", xmlrpc_client),
         ("Pyro5", "pyro5", pyro5_client),
         ("RPyC", "rpyc", rpyc_client),
         ("pyzmq REQ/REP + JSON", "zmq", zmq_client)]


def _worker_command(workers):
    return [sys.executable, "-m", "eventforge", "worker", "--import", "bench_handlers",
            "--service", "bench", "--port", "0", "--workers", str(workers),
            "--log-level", "WARNING"]


def bench_tcp(calls, rounds, workdir):
    print(f"\n2. RPC round trip over TCP loopback ({calls:,} calls per round, servers in "
          "subprocesses, all up at once)")
    servers, closers, contenders, labels = [], [], {}, {}
    try:
        for label, kind, make_client in PEERS:
            try:
                server = Server([sys.executable, os.path.abspath(__file__), "--serve", kind])
            except Exception as exc:
                print(f"  {label:<46} skipped: {str(exc).strip().splitlines()[-1][:60]}")
                continue
            servers.append(server)
            call, close = make_client(server.port)
            closers.append(close)
            contenders[kind], labels[kind] = call, label
        inline = Server([sys.executable, os.path.abspath(__file__), "--serve", "ef-inline"])
        servers.append(inline)
        worker = Server(_worker_command(1), cwd=workdir)
        servers.append(worker)
        for kind, label, make_client, port in (
                ("ef-request", "eventforge MessageQueue.request", eventforge_request_client,
                 inline.port),
                ("ef-inline", "eventforge RPCClient -> RPCServer, inline", eventforge_client,
                 inline.port),
                ("ef-worker", "eventforge RPCClient -> worker --workers 1", eventforge_client,
                 worker.port)):
            call, close = make_client(port)
            closers.append(close)
            contenders[kind], labels[kind] = call, label
        for call in contenders.values():
            bench.time_calls(call, calls // 10)  # warm-up
        got = bench.interleave({kind: _calls(call, calls) for kind, call in contenders.items()},
                               rounds)
    finally:
        for close in closers:
            close()
        for server in servers:
            server.stop()
    latency = {kind: _p50_p99(samples) for kind, samples in got.items()}
    floor = latency.get("raw")
    for kind, label in labels.items():
        _latency_rows(label, latency[kind], None if kind == "raw" else floor)
    for kind in EVENTFORGE:
        p50, p99 = latency[kind]
        if floor:
            bench.verdict(f"{kind} p50 / floor p50", bench.ratios(p50, floor[0]),
                          ROUND_TRIP_P50_TARGET)
            bench.verdict(f"{kind} p99 / floor p99", bench.ratios(p99, floor[1]),
                          ROUND_TRIP_P99_TARGET)
        if "rpyc" in latency and kind != "ef-request":
            bench.verdict(f"{kind} p50 / RPyC p50", bench.ratios(p50, latency["rpyc"][0]), 1.0)
    return latency


def bench_scaling(seconds, rounds, workdir):
    print(f"\n3. one worker, 4 concurrent callers, method sleeps 5 ms ({seconds:.1f} s per "
          "round)")
    from eventforge.transports.tcp import TCPClientTransport

    servers, queues, rate_of = [], [], {}
    try:
        for workers in (1, 4):
            server = Server(_worker_command(workers), cwd=workdir)
            servers.append(server)
            clients = []
            for _ in range(4):
                transport = TCPClientTransport("127.0.0.1", server.port)
                transport.connect(timeout=10)
                queue = ef.MessageQueue(transport)
                queues.append(queue)
                clients.append(ef.RPCClient(queue, service_name="bench", timeout=10))
            rate_of[workers] = lambda clients=clients: _calls_per_second(clients, seconds)
        got = bench.interleave(rate_of, rounds)
    finally:
        for queue in queues:
            queue.close()
        for server in servers:
            server.stop()
    bench.row("--workers 1", got[1], "call/s")
    bench.row("--workers 4", got[4], "call/s", got[1], "--workers 1 (ideal 4x)")
    return bench.ratios(got[4], got[1])


def _calls_per_second(clients, seconds):
    """Calls per second of ``clients`` each calling sleep5 in a loop for ``seconds``."""
    counts = [0] * len(clients)
    stop = time.monotonic() + seconds

    def caller(n):
        while time.monotonic() < stop:
            clients[n].call("sleep5")
            counts[n] += 1

    threads = [threading.Thread(target=caller, args=(n,), name=f"bench-caller-{n}")
               for n in range(len(clients))]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - started)


def main():
    parser = bench.parser(__doc__)
    parser.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve]()
        return
    rounds = bench.rounds_of(args)
    calls = 300 if args.quick else 2000
    bench.header("RPC benchmarks", ef.__version__, rounds)
    with tempfile.TemporaryDirectory() as workdir:
        with open(os.path.join(workdir, "bench_handlers.py"), "w") as f:
            f.write(HANDLERS)
        memory = bench_memory(calls * 4, rounds)
        tcp = bench_tcp(calls, rounds, workdir)
        scaling = bench_scaling(0.5 if args.quick else 2.0, rounds, workdir)
    print("\nsummary (median [min..max] over the rounds):")
    print(f"  RPC over MemoryTransport p50 {bench.describe(memory, ' us')} (target <= 10 us)")
    floor = tcp.get("raw")
    for kind in EVENTFORGE:
        p50, p99 = tcp[kind]
        if floor:
            print(f"  {kind} over TCP / raw JSON floor: p50 "
                  f"{bench.describe(bench.ratios(p50, floor[0]))}, p99 "
                  f"{bench.describe(bench.ratios(p99, floor[1]))} "
                  f"(targets <= {ROUND_TRIP_P50_TARGET}x, <= {ROUND_TRIP_P99_TARGET}x)")
        for peer in ("xmlrpc", "pyro5", "rpyc", "zmq"):
            if peer in tcp:
                print(f"    p50 / {peer}: {bench.describe(bench.ratios(p50, tcp[peer][0]))}")
    print(f"  --workers 4 vs 1 with 4 callers: {bench.describe(scaling)} (ideal 4x)")


if __name__ == "__main__":
    main()
