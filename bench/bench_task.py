"""@task call overhead over a bare function call, measured in the same run.

    python bench/bench_task.py            # all figures
    python bench/bench_task.py --quick    # fewer rounds (smoke run)
    python bench/bench_task.py --wall     # wall-clock instead of CPU time

Each round times N calls of the bare function and N calls of each decorated
variant, one after the other, so every variant sees the same machine load;
rounds alternate the order.  The overhead of a variant is its per-call time
minus the bare call's in the same round, both in CPU time of the calling
thread (so that time the scheduler gives other processes is not counted).
Printed: the median overhead over the rounds with its min-max spread, and a
verdict against the issue-10 target computed from the median (eventforge 0.1
measured 5.2 us).  The machine may be shared: compare figures from one run
only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import eventforge as ef  # noqa: E402


def body(x):
    return x


# CPU time of this thread by default: time the scheduler gives other
# processes on a shared machine is not counted (wall-clock figures there
# mostly measure the neighbours).  --wall switches to time.perf_counter.
clock = time.thread_time


def per_call_us(fn, n):
    start = clock()
    for i in range(n):
        fn(i)
    return (clock() - start) / n * 1e6


def variants():
    queue = ef.MessageQueue()
    out = [
        ("@task()", ef.task()(body), 1.5),
        ("@task(on_execute=[TimingMeter()])", ef.task(on_execute=[ef.TimingMeter()])(body), 3.0),
        ("@task(on_execute=[TimingMeter(), MetricsMeter()])",
         ef.task(on_execute=[ef.TimingMeter(), ef.MetricsMeter()])(body), None),
        ("@task(queue=..., topic=...) publishing each result",
         ef.task(queue=queue, topic="bench.task")(body), None),
    ]
    # Keep published results from piling up in the mailbox.
    queue.subscribe("bench.task.*", lambda message: None)
    return out, queue


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--wall", action="store_true",
                        help="wall-clock time instead of the thread's CPU time")
    args = parser.parse_args(argv)
    global clock
    clock = time.perf_counter if args.wall else time.thread_time
    rounds, n = (5, 20_000) if args.quick else (15, 100_000)
    subjects, queue = variants()
    bare_times = []
    overheads = {label: [] for label, _, _ in subjects}
    for round_no in range(rounds):
        order = subjects if round_no % 2 == 0 else list(reversed(subjects))
        bare_first = per_call_us(body, n)
        measured = {label: per_call_us(fn, n) for label, fn, _ in order}
        bare = min(bare_first, per_call_us(body, n))  # bare timed before and after
        bare_times.append(bare)
        for label, value in measured.items():
            overheads[label].append(value - bare)
    queue.close()

    print(f"@task call overhead over a bare call ({rounds} rounds x {n} calls, "
          f"alternating order; {'wall-clock' if args.wall else 'thread CPU'} time; "
          "median [min-max] over rounds)")
    print(f"  {'bare call':<52} {statistics.median(bare_times):6.3f} us per call "
          f"[{min(bare_times):.3f}-{max(bare_times):.3f}]")
    for label, _, target in subjects:
        values = overheads[label]
        median = statistics.median(values)
        text = (f"  {label:<52} +{median:6.3f} us overhead "
                f"[{min(values):.3f}-{max(values):.3f}]")
        if target is not None:
            ok = median <= target
            text += f"   target <= {target} us: {'meets' if ok else 'MISSES'}"
        print(text)
    print("  (eventforge 0.1: 5.2 us per @task call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
