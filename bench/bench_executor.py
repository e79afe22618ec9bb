"""Executor benchmarks, each printed beside its concurrent.futures baseline.

    python bench/bench_executor.py            # all figures
    python bench/bench_executor.py --quick    # fewer rounds (smoke run)

Figures (target from issue 4):
  1. THREAD submit + result, one task at a time, vs ThreadPoolExecutor
     submit().result()                              (target <= 1.15x)
  2. THREAD: submit a batch of 1,000 then collect them all, vs the same with
     ThreadPoolExecutor
  3. SEQUENTIAL submit + result vs calling the function directly
  4. PROCESS submit + result vs ProcessPoolExecutor submit().result()
  5. bookkeeping after a million submit/result pairs (SEQUENTIAL): tracked
     tasks and memory growth (stays flat)

Timings take the best of several repeats (the least disturbed run).  The
machine may be shared: read ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import eventforge as ef  # noqa: E402


def work(x):
    return x


def best_per_op_us(run, ops, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / ops * 1e6


def row(label, value, unit="us", baseline=0.0, base_label="", target=None):
    text = f"  {label:<50} {value:>9.2f} {unit}"
    if baseline:
        ratio = value / baseline
        text += f"   {ratio:5.2f}x {base_label}"
        if target is not None:
            text += f"  (target <= {target}x: {'meets' if ratio <= target else 'MISSES'})"
    print(text, flush=True)


def bench_thread_one_at_a_time(n, repeat):
    print(f"\n1. THREAD submit + result, one task at a time ({n} tasks, 4 workers)")
    with cf.ThreadPoolExecutor(4) as pool:
        def base():
            for i in range(n):
                pool.submit(work, i).result()
        base_us = best_per_op_us(base, n, repeat)
    with ef.Executor(ef.ExecutionMode.THREAD, max_workers=4) as ex:
        def ours():
            for i in range(n):
                ex.result(ex.submit(work, i))
        ours_us = best_per_op_us(ours, n, repeat)
    row("ThreadPoolExecutor submit().result()", base_us)
    row("Executor(THREAD) result(submit())", ours_us, baseline=base_us,
        base_label="ThreadPoolExecutor", target=1.15)
    return ours_us / base_us


def bench_thread_batch(n, repeat):
    print(f"\n2. THREAD batch: submit {n}, then collect all (4 workers)")
    with cf.ThreadPoolExecutor(4) as pool:
        def base():
            futures = [pool.submit(work, i) for i in range(n)]
            for f in futures:
                f.result()
        base_us = best_per_op_us(base, n, repeat)
    with ef.Executor(ef.ExecutionMode.THREAD, max_workers=4) as ex:
        def ours():
            ids = [ex.submit(work, i) for i in range(n)]
            for t in ids:
                ex.result(t)
        ours_us = best_per_op_us(ours, n, repeat)

        def mapped():
            ex.map(work, range(n))
        map_us = best_per_op_us(mapped, n, repeat)
    row("ThreadPoolExecutor, per task", base_us)
    row("Executor(THREAD) submit/result, per task", ours_us, baseline=base_us,
        base_label="ThreadPoolExecutor")
    row("Executor(THREAD).map, per item", map_us, baseline=base_us,
        base_label="ThreadPoolExecutor")


def bench_sequential(n, repeat):
    print(f"\n3. SEQUENTIAL submit + result ({n} tasks)")

    def base():
        for i in range(n):
            work(i)
    base_us = best_per_op_us(base, n, repeat)
    ex = ef.Executor()

    def ours():
        for i in range(n):
            ex.result(ex.submit(work, i))
    ours_us = best_per_op_us(ours, n, repeat)
    row("direct call", base_us)
    row("Executor(SEQUENTIAL) result(submit())", ours_us)
    print(f"  {'overhead per task':<50} {ours_us - base_us:>9.2f} us")


def bench_process(n, repeat):
    print(f"\n4. PROCESS submit + result, one task at a time ({n} tasks, 2 workers)")
    with cf.ProcessPoolExecutor(2) as pool:
        pool.submit(work, 0).result()  # start the workers outside the timing

        def base():
            for i in range(n):
                pool.submit(work, i).result()
        base_us = best_per_op_us(base, n, repeat)
    with ef.Executor(ef.ExecutionMode.PROCESS, max_workers=2) as ex:
        ex.result(ex.submit(work, 0))

        def ours():
            for i in range(n):
                ex.result(ex.submit(work, i))
        ours_us = best_per_op_us(ours, n, repeat)
    row("ProcessPoolExecutor submit().result()", base_us)
    row("Executor(PROCESS) result(submit())", ours_us, baseline=base_us,
        base_label="ProcessPoolExecutor")


def bench_bounded(n):
    print(f"\n5. bookkeeping over {n:,} submit/result pairs (SEQUENTIAL)")
    ex = ef.Executor()
    tracemalloc.start()
    for i in range(10_000):
        ex.result(ex.submit(work, i))
    warm, _ = tracemalloc.get_traced_memory()
    start = time.perf_counter()
    for i in range(n):
        ex.result(ex.submit(work, i))
    elapsed = time.perf_counter() - start
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"  tasks still tracked: {ex.stats['uncollected']}, memory growth "
          f"{(after - warm) / 1024:.1f} KiB, {elapsed:.1f} s")
    fire = ef.Executor(max_results=1000)
    for i in range(50_000):
        fire.submit(work, i)
    print(f"  fire-and-forget 50,000 submits with max_results=1000: "
          f"{fire.stats['uncollected']} tracked, {fire.stats['dropped']} dropped")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    import logging

    logging.getLogger("eventforge").setLevel(logging.ERROR)  # the cap's warnings
    n, repeat = (2_000, 3) if args.quick else (20_000, 5)
    print(f"eventforge {ef.__version__} executor benchmarks, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs")
    ratio = bench_thread_one_at_a_time(n, repeat)
    bench_thread_batch(1000, repeat * 2)
    bench_sequential(n * 5, repeat)
    bench_process(n // 10, repeat)
    bench_bounded(100_000 if args.quick else 1_000_000)
    print(f"\nsummary: THREAD submit+result = {ratio:.2f}x ThreadPoolExecutor (target <= 1.15x)")


if __name__ == "__main__":
    main()
