"""Executor benchmarks, each printed beside its concurrent.futures baseline.

    python bench/bench_executor.py              # all figures
    python bench/bench_executor.py --quick      # less work per round, 3 rounds (smoke run)
    python bench/bench_executor.py --rounds 15  # more rounds for a steadier median

Figures (targets from issues 4 and 9):
  1. THREAD submit + result, one task at a time, vs ThreadPoolExecutor
     submit().result()                              (target <= 1.15x)
  2. THREAD: submit 5,000 tasks, then collect each by its id, vs the same
     with ThreadPoolExecutor futures                (target <= 1.15x);
     ``Executor.map`` over the same items beside it
  3. SEQUENTIAL submit + result vs calling the function directly
  4. PROCESS submit + result vs ProcessPoolExecutor submit().result()
  5. bookkeeping after a million submit/result pairs (SEQUENTIAL): tracked
     tasks and memory growth (stays flat)

eventforge and its baseline run in the same rounds, in random order; each
figure is the median over the rounds with its min-max range, ratios are taken
per round, and every verdict is computed from the measured median (see
``bench/_common.py``).  The machine may be shared: read ratios from one run.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import sys
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import _common as bench  # noqa: E402

import eventforge as ef  # noqa: E402

US = 1e6  # seconds -> microseconds


def work(x):
    return x


def per_task_us(run, ops):
    """A contender for bench.interleave: one round is ``run()``, in us per task."""
    return lambda: bench.time_batch(run, ops) * US


def _one_at_a_time(pool, ex, n, rounds):
    """Interleaved rounds of ``n`` submit-then-wait tasks on ``pool`` and on ``ex``."""
    def base():
        for i in range(n):
            pool.submit(work, i).result()

    def ours():
        for i in range(n):
            ex.result(ex.submit(work, i))

    return bench.interleave({"base": per_task_us(base, n), "ours": per_task_us(ours, n)}, rounds)


def bench_thread_one_at_a_time(n, rounds):
    print(f"\n1. THREAD submit + result, one task at a time ({n:,} tasks per round, 4 workers)")
    with cf.ThreadPoolExecutor(4) as pool, \
            ef.Executor(ef.ExecutionMode.THREAD, max_workers=4) as ex:
        got = _one_at_a_time(pool, ex, n, rounds)
    bench.row("ThreadPoolExecutor submit().result()", got["base"], "us")
    bench.row("Executor(THREAD) result(submit())", got["ours"], "us", got["base"], "TPE")
    ratio = bench.ratios(got["ours"], got["base"])
    bench.verdict("Executor(THREAD) / ThreadPoolExecutor, one at a time", ratio, 1.15)
    return ratio


def bench_thread_batch(n, rounds):
    print(f"\n2. THREAD batch: submit {n:,} tasks, then collect each by id (4 workers)")
    with cf.ThreadPoolExecutor(4) as pool, \
            ef.Executor(ef.ExecutionMode.THREAD, max_workers=4) as ex:
        def base():
            futures = [pool.submit(work, i) for i in range(n)]
            for f in futures:
                f.result()

        def ours():
            ids = [ex.submit(work, i) for i in range(n)]
            for task_id in ids:
                ex.result(task_id)

        def mapped():
            ex.map(work, range(n))

        got = bench.interleave({"base": per_task_us(base, n), "ours": per_task_us(ours, n),
                                "map": per_task_us(mapped, n)}, rounds)
    bench.row("ThreadPoolExecutor, per task", got["base"], "us")
    bench.row("Executor(THREAD) submit/result, per task", got["ours"], "us", got["base"], "TPE")
    bench.row("Executor(THREAD).map, per item", got["map"], "us", got["base"], "TPE")
    ratio = bench.ratios(got["ours"], got["base"])
    bench.verdict("Executor(THREAD) / ThreadPoolExecutor, submit all then collect", ratio,
                  1.15)
    return ratio


def bench_sequential(n, rounds):
    print(f"\n3. SEQUENTIAL submit + result ({n:,} tasks per round)")
    ex = ef.Executor()

    def base():
        for i in range(n):
            work(i)

    def ours():
        for i in range(n):
            ex.result(ex.submit(work, i))

    got = bench.interleave({"base": per_task_us(base, n), "ours": per_task_us(ours, n)}, rounds)
    overhead = [o - b for o, b in zip(got["ours"], got["base"])]
    bench.row("direct call", got["base"], "us")
    bench.row("Executor(SEQUENTIAL) result(submit())", got["ours"], "us")
    bench.row("overhead per task (per round)", overhead, "us")


def bench_process(n, rounds):
    print(f"\n4. PROCESS submit + result, one task at a time ({n:,} tasks per round, "
          "2 workers)")
    with cf.ProcessPoolExecutor(2) as pool, \
            ef.Executor(ef.ExecutionMode.PROCESS, max_workers=2) as ex:
        pool.submit(work, 0).result()  # start the workers outside the timing
        ex.result(ex.submit(work, 0))

        got = _one_at_a_time(pool, ex, n, rounds)
    bench.row("ProcessPoolExecutor submit().result()", got["base"], "us")
    bench.row("Executor(PROCESS) result(submit())", got["ours"], "us", got["base"], "PPE")


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
    args = bench.parser(__doc__).parse_args()
    rounds = bench.rounds_of(args)
    import logging

    logging.getLogger("eventforge").setLevel(logging.ERROR)  # the cap's warnings
    n = 2_000 if args.quick else 20_000
    bench.header("executor benchmarks", ef.__version__, rounds)
    one = bench_thread_one_at_a_time(n, rounds)
    batch = bench_thread_batch(5_000, rounds)
    bench_sequential(n * 5, rounds)
    bench_process(n // 10, rounds)
    bench_bounded(100_000 if args.quick else 1_000_000)
    print("\nsummary (median [min..max] of the per-round ratios):")
    for label, ratio in (("one at a time", one), ("submit 5,000 then collect", batch)):
        print(f"  Executor(THREAD) / ThreadPoolExecutor, {label}: {bench.describe(ratio)} "
              "(target <= 1.15x)")


if __name__ == "__main__":
    main()
