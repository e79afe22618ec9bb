"""WorkQueue benchmarks, each measured beside a queue.Queue + threads baseline.

    python bench/bench_workqueue.py            # all figures
    python bench/bench_workqueue.py --quick    # fewer rounds (smoke run)

Figures (targets from issue 10):
  1. push throughput, 4 consumers: jobs/s from the first enqueue to the last
     ack, against queue.Queue with 4 threads doing get() + handler + task_done()
     on the same jobs                                  (target >= 0.7x)
  2. latency of one job at a time, enqueue -> handler -> ack (p50, p99),
     against queue.Queue put -> get -> handler -> task_done

Rounds alternate baseline and eventforge so both see the same machine load;
every figure is the median over rounds with the min-max spread, and the
verdict is computed from the median of the per-round ratios.  The machine may
be shared: read ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import threading
import time
from typing import Callable, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import eventforge as ef  # noqa: E402

CONSUMERS = 4


class _Counter:
    """The shared handler: count jobs, signal when all arrived."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.lock = threading.Lock()
        self.done = threading.Event()

    def handle(self, _item: object) -> None:
        with self.lock:
            self.count += 1
            if self.count == self.total:
                self.done.set()


def baseline_throughput(n: int) -> Tuple[float, float]:
    """queue.Queue + 4 threads: get, handle, task_done."""
    jobs: queue.Queue = queue.Queue()
    counter = _Counter(n)

    def worker() -> None:
        while True:
            item = jobs.get()
            if item is None:
                jobs.task_done()
                return
            counter.handle(item)
            jobs.task_done()

    threads = [threading.Thread(target=worker) for _ in range(CONSUMERS)]
    for thread in threads:
        thread.start()
    cpu = time.process_time()
    start = time.perf_counter()
    for i in range(n):
        jobs.put(i)
    counter.done.wait(120)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        thread.join()
    return n / elapsed, cpu / n * 1e6


class _AckClock(ef.MemoryWorkStore):
    """The in-memory store, noting when the last ack landed (through the seam)."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = total
        self.acked = 0
        self.done = threading.Event()
        self.last_ack = 0.0
        self._count_lock = threading.Lock()

    def ack_all(self, leases: List[ef.Lease]) -> List[bool]:
        settled = super().ack_all(leases)
        with self._count_lock:
            self.acked += len(leases)
            if self.acked == self.total:
                self.last_ack = time.perf_counter()
                self.done.set()
        return settled


def eventforge_throughput(n: int) -> Tuple[float, float]:
    """WorkQueue push delivery to 4 consumers, first enqueue to last ack."""
    store = _AckClock(n)
    counter = _Counter(n)
    with ef.WorkQueue(store=store, max_workers=CONSUMERS) as wq:
        for _ in range(CONSUMERS):
            wq.consume("jobs", counter.handle)
        cpu = time.process_time()
        start = time.perf_counter()
        for i in range(n):
            wq.enqueue("jobs", i)
        if not store.done.wait(120):
            raise RuntimeError(f"only {store.acked} of {n} jobs acknowledged within 120 s")
        elapsed = store.last_ack - start
        cpu = time.process_time() - cpu
        assert counter.count == n
    return n / elapsed, cpu / n * 1e6


def baseline_latency(n: int) -> List[float]:
    """queue.Queue put -> worker get -> handler -> task_done, one job at a time."""
    jobs: queue.Queue = queue.Queue()
    finished = threading.Event()
    samples: List[float] = []

    def worker() -> None:
        while True:
            item = jobs.get()
            if item is None:
                return
            jobs.task_done()
            samples.append(time.perf_counter() - item)
            finished.set()

    thread = threading.Thread(target=worker)
    thread.start()
    for _ in range(n):
        finished.clear()
        jobs.put(time.perf_counter())
        finished.wait(10)
    jobs.put(None)
    thread.join()
    return samples


class _AckSignal(ef.MemoryWorkStore):
    def __init__(self) -> None:
        super().__init__()
        self.acked = threading.Event()
        self.at = 0.0

    def ack_all(self, leases: List[ef.Lease]) -> List[bool]:
        settled = super().ack_all(leases)
        self.at = time.perf_counter()
        self.acked.set()
        return settled


def eventforge_latency(n: int) -> List[float]:
    """WorkQueue enqueue -> pushed handler -> ack, one job at a time."""
    store = _AckSignal()
    samples: List[float] = []
    with ef.WorkQueue(store=store) as wq:
        wq.consume("jobs", lambda message: None)
        for _ in range(n):
            store.acked.clear()
            start = time.perf_counter()
            wq.enqueue("jobs", None)
            if not store.acked.wait(10):
                raise RuntimeError("a job was not acknowledged within 10 s")
            samples.append(store.at - start)
    return samples


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spread(values: List[float], fmt: str = "{:,.0f}") -> str:
    return (f"{fmt.format(statistics.median(values))} "
            f"(min {fmt.format(min(values))}, max {fmt.format(max(values))})")


def alternate(rounds: int, base: Callable[[], Tuple[float, float]],
              ours: Callable[[], Tuple[float, float]]
              ) -> Tuple[List[Tuple[float, float]], List[Tuple[float, float]]]:
    base_values: List[Tuple[float, float]] = []
    our_values: List[Tuple[float, float]] = []
    for _ in range(rounds):
        base_values.append(base())
        our_values.append(ours())
    return base_values, our_values


def bench_throughput(n: int, rounds: int) -> bool:
    print(f"\n1. push throughput, {CONSUMERS} consumers, {n:,} jobs per round, {rounds} rounds")
    eventforge_throughput(n // 10)  # warm-up
    base, ours = alternate(rounds, lambda: baseline_throughput(n),
                           lambda: eventforge_throughput(n))
    ratios = [o[0] / b[0] for o, b in zip(ours, base)]
    ratio = statistics.median(ratios)
    print(f"  queue.Queue + {CONSUMERS} threads   {spread([b[0] for b in base])} jobs/s, "
          f"CPU {spread([b[1] for b in base], '{:.2f}')} us/job")
    print(f"  WorkQueue.consume x{CONSUMERS}      {spread([o[0] for o in ours])} jobs/s, "
          f"CPU {spread([o[1] for o in ours], '{:.2f}')} us/job")
    verdict = ratio >= 0.7
    print(f"  throughput ratio WorkQueue / baseline: median {ratio:.2f}x "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x); target >= 0.7x: "
          f"{'meets' if verdict else 'MISSES'}")
    cpu_ratios = [b[1] / o[1] for o, b in zip(ours, base)]
    print(f"  CPU-time ratio (baseline CPU per job / ours; less sensitive to other load): "
          f"median {statistics.median(cpu_ratios):.2f}x "
          f"(min {min(cpu_ratios):.2f}x, max {max(cpu_ratios):.2f}x)")
    return verdict


def bench_latency(n: int, rounds: int) -> None:
    print(f"\n2. latency, one job at a time ({n} jobs per round, {rounds} rounds)")
    base_p50: List[float] = []
    our_p50: List[float] = []
    base_p99: List[float] = []
    our_p99: List[float] = []
    for _ in range(rounds):
        base = baseline_latency(n)
        ours = eventforge_latency(n)
        base_p50.append(percentile(base, 0.5) * 1e6)
        base_p99.append(percentile(base, 0.99) * 1e6)
        our_p50.append(percentile(ours, 0.5) * 1e6)
        our_p99.append(percentile(ours, 0.99) * 1e6)
    print(f"  queue.Queue put -> get -> handler      p50 {spread(base_p50, '{:.0f}')} us, "
          f"p99 {spread(base_p99, '{:.0f}')} us")
    print(f"  WorkQueue enqueue -> handler -> ack    p50 {spread(our_p50, '{:.0f}')} us, "
          f"p99 {spread(our_p99, '{:.0f}')} us")
    ratios = [o / b for o, b in zip(our_p50, base_p50)]
    print(f"  p50 ratio WorkQueue / baseline: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else 7
    print(f"eventforge {ef.__version__} WorkQueue benchmarks (Python "
          f"{sys.version.split()[0]}, {os.cpu_count()} CPUs; a shared machine is noisy)")
    bench_throughput(5_000 if args.quick else 20_000, rounds)
    bench_latency(300 if args.quick else 2_000, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
