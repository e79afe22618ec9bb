"""The Redis Streams work store against a bare redis-py XREADGROUP/XACK loop.

    python bench/bench_redis_queue.py                      # starts its own redis-server
    python bench/bench_redis_queue.py --url redis://127.0.0.1:6379/0
    python bench/bench_redis_queue.py --quick              # fewer, smaller rounds

Figures (target from issue 12: >= 1,000 jobs/s per worker):
  1. consume throughput of ONE worker: a backlog of N jobs, from the moment
     the worker starts to the last ack.  eventforge: a RedisWorkQueue with one
     push consumer (leases, fencing, retries, its default prefetch of 16).
     Baseline: a bare loop of XREADGROUP COUNT 16 + XACK of the same batch,
     doing nothing else (no lease bookkeeping, no fencing, no retries).
  2. enqueue throughput, one producer: WorkQueue.enqueue (one Lua script per
     job) against a bare XADD per job.  For reference, not a target.

Rounds alternate baseline and eventforge so both see the same machine load;
each figure is the median over rounds with the min-max spread, and the
verdicts are computed from the medians.  The machine may be shared: read the
ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import redis  # noqa: E402

import eventforge as ef  # noqa: E402
from eventforge_ext.redis import RedisWorkQueue  # noqa: E402

BATCH = 16  # the WorkQueue's default prefetch; the baseline reads as many at once
TARGET = 1_000.0


def start_server() -> Tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--logfile", ""],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    return process, url


def _payload(i: int) -> dict:
    return {"n": i, "path": f"images/{i}.png"}


def baseline_consume(url: str, n: int) -> float:
    """Bare redis-py: XREADGROUP COUNT 16, handle, XACK the batch."""
    client = redis.Redis.from_url(url)
    stream = f"bench:{uuid.uuid4().hex}"
    client.xgroup_create(stream, "g", id="$", mkstream=True)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        body = ef.encode(ef.Message("jobs", _payload(i)))[4:]  # the same bytes on the wire
        pipe.xadd(stream, {"m": body})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    handled = 0
    start = time.perf_counter()
    while handled < n:
        got = client.xreadgroup("g", "c", {stream: ">"}, count=BATCH, block=1000)
        if not got:
            continue
        ids = []
        for entry_id, fields in got[0][1]:
            ef.decode(fields[b"m"])  # the worker reads the job
            handled += 1
            ids.append(entry_id)
        client.xack(stream, "g", *ids)
    elapsed = time.perf_counter() - start
    client.delete(stream)
    client.close()
    return n / elapsed


def eventforge_consume(url: str, n: int) -> float:
    """One RedisWorkQueue push consumer working off a backlog of n jobs."""
    prefix = f"bench:{uuid.uuid4().hex}"
    with RedisWorkQueue(url, prefix=prefix, max_workers=1) as producer:
        for i in range(n):
            producer.enqueue("jobs", _payload(i))
    done = threading.Event()
    count = [0]

    def handle(_job: ef.Message) -> None:
        count[0] += 1
        if count[0] == n:
            done.set()

    with RedisWorkQueue(url, prefix=prefix, max_workers=1) as worker:
        start = time.perf_counter()
        worker.consume("jobs", handle)
        if not done.wait(300):
            raise RuntimeError(f"only {count[0]} of {n} jobs were handled")
        while worker.stats["work"]["acked"] < n:
            time.sleep(0.001)
        elapsed = time.perf_counter() - start
    _drop(url, prefix)
    return n / elapsed


def baseline_enqueue(url: str, n: int) -> float:
    client = redis.Redis.from_url(url)
    stream = f"bench:{uuid.uuid4().hex}"
    client.xgroup_create(stream, "g", id="$", mkstream=True)
    start = time.perf_counter()
    for i in range(n):
        client.xadd(stream, {"m": ef.encode(ef.Message("jobs", _payload(i)))[4:]})
    elapsed = time.perf_counter() - start
    client.delete(stream)
    client.close()
    return n / elapsed


def eventforge_enqueue(url: str, n: int) -> float:
    prefix = f"bench:{uuid.uuid4().hex}"
    with RedisWorkQueue(url, prefix=prefix) as wq:
        start = time.perf_counter()
        for i in range(n):
            wq.enqueue("jobs", _payload(i))
        elapsed = time.perf_counter() - start
    _drop(url, prefix)
    return n / elapsed


def _drop(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def spread(values: List[float]) -> str:
    return (f"{statistics.median(values):>9,.0f}/s  "
            f"(min {min(values):,.0f} - max {max(values):,.0f})")


def alternate(rounds: int, base: Callable[[], float],
              ours: Callable[[], float]) -> Tuple[List[float], List[float]]:
    bases, own = [], []
    for index in range(rounds):
        if index % 2:
            own.append(ours())
            bases.append(base())
        else:
            bases.append(base())
            own.append(ours())
    return bases, own


def report(title: str, bases: List[float], own: List[float], base_name: str) -> float:
    ratios = [o / b for o, b in zip(own, bases)]
    print(title)
    print(f"  {base_name:<34} {spread(bases)}")
    print(f"  {'eventforge RedisWorkQueue':<34} {spread(own)}")
    print(f"  ratio eventforge/baseline: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f} - max {max(ratios):.2f})")
    return statistics.median(own)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="an existing Redis server (default: start one)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller rounds")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 7
    n = 2_000 if args.quick else 10_000
    server = None
    url = args.url
    if url is None:
        server, url = start_server()
    try:
        info = redis.Redis.from_url(url).info("server")
        print(f"Redis {info['redis_version']} at {url}; {rounds} rounds of {n:,} jobs; "
              f"Python {sys.version.split()[0]}; {os.cpu_count()} CPUs (possibly shared)\n")
        bases, own = alternate(rounds, lambda: baseline_consume(url, n),
                               lambda: eventforge_consume(url, n))
        median = report("1. consume, one worker (backlog -> handler -> ack)", bases, own,
                        f"bare XREADGROUP COUNT {BATCH} + XACK")
        verdict = median >= TARGET
        print(f"  verdict: {median:,.0f} jobs/s per worker "
              f"{'meets' if verdict else 'MISSES'} the target of >= {TARGET:,.0f}/s\n")
        bases, own = alternate(rounds, lambda: baseline_enqueue(url, n // 2),
                               lambda: eventforge_enqueue(url, n // 2))
        report("2. enqueue, one producer (reference)", bases, own, "bare XADD per job")
        return 0 if verdict else 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    sys.exit(main())
