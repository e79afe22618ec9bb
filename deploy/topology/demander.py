"""The demander: spread calls round-robin over a pool of eventforge workers.

    python demander.py --servers server1:9090,server2:9090,server3:9090 --calls 300

(or set EVENTFORGE_SERVERS).  It waits for every server to accept a
connection, makes the calls through ``with_retry(RoundRobinRPCClient(...))``,
prints how many calls each node answered and the latency percentiles, and
exits 0 when every server answered.  Client-side load balancing: the
demander needs every server address; there is no broker.
"""

import argparse
import os
import sys
import time

from eventforge import (
    MessageQueue,
    RoundRobinRPCClient,
    RPCClient,
    with_retry,
)
from eventforge.transports.tcp import TCPClientTransport


def parse_servers(text):
    servers = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SystemExit(f"demander: bad server address {item!r} (expected HOST:PORT)")
        servers.append((host.strip("[]"), int(port)))
    if not servers:
        raise SystemExit("demander: no servers given (--servers or EVENTFORGE_SERVERS)")
    return servers


def connect(host, port, secret, deadline):
    """Connect to one server, retrying until ``deadline`` (servers may start later)."""
    while True:
        transport = TCPClientTransport(host, port, secret=secret)
        try:
            transport.connect(timeout=2.0)
            return MessageQueue(transport)
        except (OSError, ConnectionError) as exc:
            transport.close()
            if time.monotonic() > deadline:
                raise SystemExit(f"demander: cannot reach {host}:{port}: {exc}") from None
            time.sleep(0.2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default=os.environ.get("EVENTFORGE_SERVERS", ""),
                        help="comma-separated HOST:PORT list")
    parser.add_argument("--service", default=os.environ.get("EVENTFORGE_SERVICE", "math"))
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--secret-file", default=os.environ.get("EVENTFORGE_SECRET_FILE"))
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for the servers to come up")
    args = parser.parse_args(argv)

    secret = None
    if args.secret_file:
        with open(args.secret_file, "rb") as f:
            secret = f.read().strip()
    servers = parse_servers(args.servers)
    deadline = time.monotonic() + args.wait
    queues = [connect(host, port, secret, deadline) for host, port in servers]
    try:
        pool = RoundRobinRPCClient(
            [RPCClient(q, service_name=args.service, timeout=10.0) for q in queues])
        client = with_retry(pool, max_retries=3, backoff_initial=0.1)
        per_node = {}
        latencies = []
        for i in range(args.calls):
            started = time.perf_counter()
            answer = client.compute(1000 + i % 100)
            latencies.append(time.perf_counter() - started)
            per_node[answer["node"]] = per_node.get(answer["node"], 0) + 1
        latencies.sort()

        def pct(q):
            return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] * 1e3

        for node, count in sorted(per_node.items()):
            print(f"demander: {node}: {count} calls", flush=True)
        if latencies:
            print(f"demander: latency p50 {pct(50):.2f} ms, p99 {pct(99):.2f} ms", flush=True)
        ok = len(per_node) == len(servers)
        print(f"demander: {args.calls} calls over {len(servers)} servers, "
              f"{len(per_node)} answered: {'ok' if ok else 'FAILED'}", flush=True)
        return 0 if ok else 1
    finally:
        for q in queues:
            q.close()


if __name__ == "__main__":
    sys.exit(main())
