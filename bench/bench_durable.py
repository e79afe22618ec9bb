"""Durable work queue benchmarks: SQLiteWorkStore beside huey and persist-queue.

    python bench/bench_durable.py            # all figures
    python bench/bench_durable.py --quick    # fewer, smaller rounds

Figures (targets from issue 12), each on a fresh file per round:
  1. claim + ack throughput of one worker draining a backlog, with
     synchronous=FULL (target >= 1,000 jobs/s) and NORMAL (>= 5,000 jobs/s):
     eventforge one job at a time, eventforge in batches of 16 (what push
     consumers do), huey's SqliteStorage.dequeue() (which deletes at once: no
     lease, no ack), and persist-queue's SQLiteAckQueue get() + ack();
  2. claim latency p50 / p99 (synchronous=FULL; target p99 < 5 ms);
  3. idle pickup latency across processes: an idle consumer process sees a
     job enqueued by another process within (target) 100 ms.

Rounds alternate the contenders so they see the same machine load; figures
are medians with the min-max spread, verdicts are computed.  The machine may
be shared: read ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import eventforge as ef  # noqa: E402

PAYLOAD = {"image": "cat.png", "size": [640, 480]}


def _fresh_dir() -> str:
    return tempfile.mkdtemp(prefix="ef-durable-")


def eventforge_drain(n: int, synchronous: str, batch: int) -> Tuple[float, List[float]]:
    """Fill ``n`` jobs, then claim + ack them; returns (jobs/s, claim latencies)."""
    directory = _fresh_dir()
    store = ef.SQLiteWorkStore(os.path.join(directory, "jobs.db"), synchronous=synchronous)
    try:
        for _ in range(n):
            store.enqueue("jobs", ef.Message("jobs", PAYLOAD))
        latencies: List[float] = []
        done = 0
        start = time.perf_counter()
        while done < n:
            claim_start = time.perf_counter()
            leases = store.claim("jobs", "default", 30.0, max_count=batch)
            latencies.append(time.perf_counter() - claim_start)
            if batch == 1:
                store.ack(leases[0])
            else:
                store.ack_all(leases)
            done += len(leases)
        return n / (time.perf_counter() - start), latencies
    finally:
        store.close()
        shutil.rmtree(directory)


def huey_drain(n: int, synchronous: str) -> Optional[float]:
    try:
        from huey.storage import SqliteStorage
    except ImportError:
        return None
    directory = _fresh_dir()
    storage = SqliteStorage("jobs", os.path.join(directory, "huey.db"))
    storage.conn.execute(f"PRAGMA synchronous={synchronous}")
    try:
        import json

        for _ in range(n):
            storage.enqueue(json.dumps(PAYLOAD).encode())
        start = time.perf_counter()
        for _ in range(n):
            json.loads(bytes(storage.dequeue()))
        return n / (time.perf_counter() - start)
    finally:
        storage.close()
        shutil.rmtree(directory)


def persist_queue_drain(n: int, synchronous: str) -> Optional[float]:
    try:
        import persistqueue
    except ImportError:
        return None
    directory = _fresh_dir()
    queue = persistqueue.SQLiteAckQueue(directory, multithreading=True)
    for conn in (queue._getter, queue._putter):
        conn.execute(f"PRAGMA synchronous={synchronous}")
    try:
        for _ in range(n):
            queue.put(PAYLOAD)
        start = time.perf_counter()
        for _ in range(n):
            item = queue.get(block=False)
            queue.ack(item)
        return n / (time.perf_counter() - start)
    finally:
        queue.close()
        shutil.rmtree(directory)


def spread(values: List[float], fmt: str = "{:,.0f}") -> str:
    return (f"{fmt.format(statistics.median(values))} "
            f"(min {fmt.format(min(values))}, max {fmt.format(max(values))})")


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_throughput(n: int, rounds: int) -> Dict[str, List[float]]:
    latencies: Dict[str, List[float]] = {}
    for synchronous, target in (("FULL", 1_000), ("NORMAL", 5_000)):
        print(f"\n1. claim + ack throughput, synchronous={synchronous}, {n:,} jobs per round, "
              f"{rounds} rounds (target >= {target:,} jobs/s)")
        contenders: List[Tuple[str, Callable[[], Optional[float]]]] = [
            ("eventforge, one job per claim", lambda s=synchronous: _note(
                latencies, s, eventforge_drain(n, s, 1))),
            ("eventforge, batches of 16", lambda s=synchronous: eventforge_drain(n, s, 16)[0]),
            ("huey SqliteStorage.dequeue", lambda s=synchronous: huey_drain(n, s)),
            ("persist-queue SQLiteAckQueue", lambda s=synchronous: persist_queue_drain(n, s)),
        ]
        figures: Dict[str, List[float]] = {name: [] for name, _ in contenders}
        for round_index in range(rounds):
            shift = round_index % len(contenders)  # nobody always runs first
            for name, run in contenders[shift:] + contenders[:shift]:
                value = run()
                if value is not None:
                    figures[name].append(value)
        ours = figures["eventforge, one job per claim"]
        for name, values in figures.items():
            if not values:
                print(f"  {name:<32} (not installed)")
                continue
            ratio = ""
            if name != "eventforge, one job per claim":
                ratios = [o / v for o, v in zip(ours, values)]
                ratio = (f"   eventforge one-by-one / this: {statistics.median(ratios):.2f}x "
                         f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
            print(f"  {name:<32} {spread(values)} jobs/s{ratio}")
        for name in ("eventforge, one job per claim", "eventforge, batches of 16"):
            median = statistics.median(figures[name])
            print(f"  {name}: target >= {target:,}/s: {'meets' if median >= target else 'MISSES'}")
    return latencies


def _note(latencies: Dict[str, List[float]], synchronous: str,
          result: Tuple[float, List[float]]) -> float:
    latencies.setdefault(synchronous, []).extend(result[1])
    return result[0]


def bench_claim_latency(latencies: Dict[str, List[float]]) -> None:
    print("\n2. claim latency (one job per claim, all rounds above)")
    for synchronous, values in latencies.items():
        p50 = percentile(values, 0.5) * 1e3
        p99 = percentile(values, 0.99) * 1e3
        verdict = "meets" if p99 < 5.0 else "MISSES"
        print(f"  synchronous={synchronous:<6} p50 {p50:.3f} ms, p99 {p99:.3f} ms, "
              f"max {max(values) * 1e3:.1f} ms over {len(values):,} claims "
              f"(target p99 < 5 ms: {verdict})")


IDLE_CONSUMER = """
import sys, time, eventforge as ef
wq = ef.WorkQueue(store=sys.argv[1])
def handler(job):
    print(time.time() - job.payload, flush=True)
wq.consume("jobs", handler)
print("ready", flush=True)
sys.stdin.readline()
wq.close()
"""


def bench_pickup(samples: int) -> None:
    import random

    print(f"\n3. idle pickup latency across processes ({samples} jobs, each after an idle "
          "pause of 0.2-0.5 s)")
    directory = _fresh_dir()
    path = os.path.join(directory, "jobs.db")
    ef.SQLiteWorkStore(path).close()
    env = dict(os.environ, PYTHONPATH=ROOT)
    consumer = subprocess.Popen([sys.executable, "-c", IDLE_CONSUMER, path], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    store = ef.SQLiteWorkStore(path)
    try:
        assert consumer.stdout.readline().strip() == "ready"
        delays = []
        for _ in range(samples):
            time.sleep(random.uniform(0.2, 0.5))  # the consumer's polling backs off fully
            store.enqueue("jobs", ef.Message("jobs", time.time()))
            delays.append(float(consumer.stdout.readline()) * 1e3)
        p50, p99 = percentile(delays, 0.5), percentile(delays, 0.99)
        verdict = "meets" if max(delays) < 100 else "MISSES"
        print(f"  enqueue in one process -> handler in another: p50 {p50:.1f} ms, "
              f"p99 {p99:.1f} ms, max {max(delays):.1f} ms (target < 100 ms: {verdict})")
    finally:
        store.close()
        consumer.stdin.write("\n")
        consumer.stdin.flush()
        consumer.wait(30)
        shutil.rmtree(directory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller rounds")
    args = parser.parse_args()
    import sqlite3

    print(f"eventforge {ef.__version__} durable queue benchmarks (Python "
          f"{sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs; "
          "a shared machine is noisy)")
    latencies = bench_throughput(500 if args.quick else 2_000, 3 if args.quick else 5)
    bench_claim_latency(latencies)
    bench_pickup(10 if args.quick else 30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
