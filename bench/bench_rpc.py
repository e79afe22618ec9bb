"""RPC benchmarks, each printed beside baselines measured in the same run.

    python bench/bench_rpc.py            # all figures (peers: pip install pyro5 rpyc pyzmq)
    python bench/bench_rpc.py --quick    # fewer rounds (smoke run)

Figures (targets from issue 4):
  1. RPC over MemoryTransport, p50 of a call (target <= 10 us), beside
     MessageQueue.request on the same transport;
  2. RPC round trip over TCP loopback, p50 and p99, against a raw
     length-prefixed JSON echo over a socket (the floor), xmlrpc, Pyro5,
     RPyC and pyzmq REQ/REP (target: p50 <= 1.3x the floor, ahead of RPyC).
     Every server runs in its own process (this script with --serve KIND);
  3. throughput of one worker process with 4 concurrent callers on a method
     sleeping 5 ms, --workers 4 against --workers 1 (should scale near 4x).

A peer that is not installed is reported as skipped.  The machine may be
shared: read ratios, not absolute figures.
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
sys.path.insert(0, ROOT)

import eventforge as ef  # noqa: E402

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


SERVERS = {"raw": serve_raw, "xmlrpc": serve_xmlrpc, "pyro5": serve_pyro5,
           "rpyc": serve_rpyc, "zmq": serve_zmq}


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


def measure(call, rounds, warmup):
    for i in range(warmup):
        call(i)
    samples = []
    perf = time.perf_counter
    for i in range(rounds):
        t0 = perf()
        call(i)
        samples.append(perf() - t0)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


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


def eventforge_client(port):
    from eventforge.transports.tcp import TCPClientTransport

    transport = TCPClientTransport("127.0.0.1", port)
    transport.connect(timeout=10)
    queue = ef.MessageQueue(transport)
    client = ef.RPCClient(queue, service_name="bench", timeout=10)

    def call(i):
        assert client.call("add", i, 1) == i + 1
    return call, queue.close


def row(label, p50, p99, floor=None, note=""):
    text = f"  {label:<34} p50 {p50:8.1f} us   p99 {p99:8.1f} us"
    if floor:
        text += f"   p50 {p50 / floor:5.2f}x floor"
    print(text + note, flush=True)


def bench_memory(rounds):
    print(f"\n1. RPC over MemoryTransport ({rounds} calls)")
    with ef.MessageQueue() as queue:
        server = ef.RPCServer(queue, service_name="bench")
        server.add_method("add", lambda a, b: a + b)
        server.serve(blocking=False)
        client = ef.RPCClient(queue, service_name="bench")
        queue.subscribe("math.add", lambda m: queue.reply(m, m.payload[0] + m.payload[1]))
        p50_rpc, p99_rpc = measure(lambda i: client.call("add", i, 1), rounds, rounds // 10)
        p50_req, p99_req = measure(lambda i: queue.request("math.add", [i, 1], timeout=5),
                                   rounds, rounds // 10)
        server.stop()
    row("MessageQueue.request (baseline)", p50_req, p99_req)
    row("RPCClient.call", p50_rpc, p99_rpc,
        note=f"   {p50_rpc / p50_req:4.2f}x request  (target p50 <= 10 us: "
             f"{'meets' if p50_rpc <= 10 else 'MISSES'})")
    return p50_rpc


def bench_tcp(rounds, workdir):
    print(f"\n2. RPC round trip over TCP loopback ({rounds} calls, servers in subprocesses)")
    results = {}
    peers = [("raw JSON echo (floor)", "raw", raw_client),
             ("xmlrpc (stdlib, HTTP/1.1)", "xmlrpc", xmlrpc_client),
             ("Pyro5", "pyro5", pyro5_client),
             ("RPyC", "rpyc", rpyc_client),
             ("pyzmq REQ/REP + JSON", "zmq", zmq_client)]
    floor = None
    for label, kind, make_client in peers:
        try:
            server = Server([sys.executable, os.path.abspath(__file__), "--serve", kind])
        except Exception as exc:
            print(f"  {label:<34} skipped: {str(exc).strip().splitlines()[-1][:80]}")
            continue
        try:
            call, close = make_client(server.port)
            p50, p99 = measure(call, rounds, rounds // 10)
            close()
        finally:
            server.stop()
        results[kind] = p50
        if kind == "raw":
            floor = p50
        row(label, p50, p99, floor if kind != "raw" else None)
    server = Server([sys.executable, "-m", "eventforge", "worker", "--import", "bench_handlers",
                     "--service", "bench", "--port", "0", "--workers", "1",
                     "--log-level", "WARNING"], cwd=workdir)
    try:
        call, close = eventforge_client(server.port)
        p50, p99 = measure(call, rounds, rounds // 10)
        close()
    finally:
        server.stop()
    results["eventforge"] = p50
    verdict = []
    if floor:
        verdict.append(f"target <= 1.3x floor: {'meets' if p50 <= 1.3 * floor else 'MISSES'}")
    if "rpyc" in results:
        verdict.append(f"{'ahead of' if p50 < results['rpyc'] else 'BEHIND'} RPyC")
    row("eventforge RPCClient -> worker", p50, p99, floor, note="   (" + "; ".join(verdict) + ")")
    return results


def bench_scaling(seconds, workdir):
    print(f"\n3. one worker, 4 concurrent callers, method sleeps 5 ms ({seconds:.0f} s each)")
    from eventforge.transports.tcp import TCPClientTransport

    rates = {}
    for workers in (1, 4):
        server = Server([sys.executable, "-m", "eventforge", "worker", "--import",
                         "bench_handlers", "--service", "bench", "--port", "0", "--workers",
                         str(workers), "--log-level", "WARNING"], cwd=workdir)
        queues = []
        try:
            counts = [0] * 4
            stop = time.monotonic() + seconds

            def caller(n, client, counts=counts, stop=stop):
                while time.monotonic() < stop:
                    client.call("sleep5")
                    counts[n] += 1

            threads = []
            for n in range(4):
                transport = TCPClientTransport("127.0.0.1", server.port)
                transport.connect(timeout=10)
                queue = ef.MessageQueue(transport)
                queues.append(queue)
                client = ef.RPCClient(queue, service_name="bench", timeout=10)
                threads.append(threading.Thread(target=caller, args=(n, client)))
            started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rates[workers] = sum(counts) / (time.monotonic() - started)
        finally:
            for q in queues:
                q.close()
            server.stop()
        print(f"  --workers {workers}: {rates[workers]:8.1f} calls/s")
    ratio = rates[4] / rates[1]
    print(f"  scaling --workers 4 / --workers 1: {ratio:.2f}x (ideal 4x)")
    return ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve]()
        return
    rounds = 1000 if args.quick else 5000
    print(f"eventforge {ef.__version__} RPC benchmarks, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as workdir:
        with open(os.path.join(workdir, "bench_handlers.py"), "w") as f:
            f.write(HANDLERS)
        memory = bench_memory(rounds * 4)
        tcp = bench_tcp(rounds, workdir)
        scaling = bench_scaling(1.0 if args.quick else 3.0, workdir)
    print("\nsummary:")
    print(f"  RPC over MemoryTransport p50 {memory:.1f} us (target <= 10 us)")
    if "raw" in tcp:
        print(f"  RPC over TCP p50 {tcp['eventforge']:.1f} us = "
              f"{tcp['eventforge'] / tcp['raw']:.2f}x the raw JSON floor (target <= 1.3x)")
    for kind in ("xmlrpc", "pyro5", "rpyc", "zmq"):
        if kind in tcp:
            print(f"  eventforge / {kind}: {tcp['eventforge'] / tcp[kind]:.2f}x")
    print(f"  --workers 4 vs 1 with 4 callers: {scaling:.2f}x (ideal 4x)")


if __name__ == "__main__":
    main()
