"""In-process benchmarks of the core, each printed beside a baseline from the same run.

    python bench/bench_core.py            # all figures
    python bench/bench_core.py --quick    # fewer rounds (smoke run)

Figures (targets from issue 2):
  1. publish-to-delivery per message vs pyee ``emit`` and blinker ``send``
     (target <= 1.2x pyee);
  2. publish cost with 10,000 vs 10 subscriptions on mixed patterns
     (target <= 1.5x), with the match cache warm and with it defeated;
  3. local request/reply latency p50 (target <= 10 us);
  4. ``import eventforge`` time over a bare interpreter (target <= 20 ms).

Timings take the best of several repeats (the least disturbed run), which is
what a ratio between two libraries should compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import timeit
from typing import Callable, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import eventforge as ef  # noqa: E402


def per_call_ns(func: Callable[[], object], number: int, repeat: int = 7) -> float:
    """Best-of-``repeat`` cost of one call, in nanoseconds."""
    return min(timeit.repeat(func, number=number, repeat=repeat)) / number * 1e9


def row(label: str, value: float, unit: str, baseline: float = 0.0, base_label: str = "") -> None:
    text = f"  {label:<46} {value:>10.1f} {unit}"
    if baseline:
        text += f"   {value / baseline:5.2f}x {base_label}"
    print(text)


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


# -- 1. publish-to-delivery -------------------------------------------------------


def bench_publish(number: int) -> None:
    print("\n1. publish-to-delivery, one subscriber, per message")
    from blinker import Signal
    from pyee import EventEmitter

    received: List[object] = []
    sink = received.append

    queue = ef.MessageQueue()
    queue.subscribe("orders.created", lambda message: sink(message.payload))
    emitter = EventEmitter()
    emitter.on("orders.created", lambda payload: sink(payload))
    signal = Signal()
    signal.connect(lambda sender, **kw: sink(sender), weak=False)

    ours = per_call_ns(lambda: queue.publish("orders.created", 1), number)
    received.clear()
    pyee = per_call_ns(lambda: emitter.emit("orders.created", 1), number)
    received.clear()
    blinker = per_call_ns(lambda: signal.send(1), number)
    received.clear()
    row("pyee EventEmitter.emit", pyee, "ns")
    row("blinker Signal.send", blinker, "ns")
    row("eventforge MessageQueue.publish", ours, "ns", pyee, "pyee")
    row("", ours, "ns", blinker, "blinker")
    print(f"  -> {ours / pyee:.2f}x pyee (target <= 1.2x): {verdict(ours / pyee <= 1.2)}")
    print("     (publish also builds a Message: id, timestamp, headers; emit passes args)")
    queue.close()


# -- 2. publish cost vs number of subscriptions ------------------------------------


def _mixed_patterns(count: int) -> List[str]:
    """``count`` patterns: literals, ``*`` and ``**`` at various depths."""
    shapes = [
        "svc{i}.orders.created",
        "svc{i}.orders.*",
        "svc{i}.**",
        "svc{i}.*.failed",
        "region{i}.**.audit",
    ]
    return [shapes[i % len(shapes)].format(i=i // len(shapes)) for i in range(count)]


def _queue_with(count: int, cache_size: int) -> ef.MessageQueue:
    transport = ef.MemoryTransport()
    transport._subscriptions = ef.SubscriptionTrie(cache_size=cache_size)
    queue = ef.MessageQueue(transport)
    noop = lambda message: None  # noqa: E731
    for pattern in _mixed_patterns(count):
        queue.subscribe(pattern, noop)
    # Every queue also has the same few subscriptions the topics below hit, so
    # both sizes deliver to the same number of handlers.
    for pattern in ("app.orders.created", "app.orders.*", "app.**", "**.audit"):
        queue.subscribe(pattern, noop)
    return queue


def _cycling_publisher(queue: ef.MessageQueue, topics: List[str]) -> Callable[[], None]:
    publish = queue.publish
    state = {"i": 0}

    def one() -> None:
        i = state["i"] = state["i"] + 1
        publish(topics[i & 3], i)

    return one


def bench_fanin(number: int) -> None:
    print("\n2. publish cost with 10,000 vs 10 subscriptions (mixed patterns)")
    topics = ["app.orders.created", "app.orders.paid", "app.eu.billing.audit", "app.x"]
    for label, cache_size in (("match cache warm", 2048), ("match cache defeated", 1)):
        costs = {}
        for count in (10, 10_000):
            queue = _queue_with(count, cache_size)
            costs[count] = per_call_ns(_cycling_publisher(queue, topics), number)
            queue.close()
        ratio = costs[10_000] / costs[10]
        row(f"{label}: 10 subscriptions", costs[10], "ns")
        row(f"{label}: 10,000 subscriptions", costs[10_000], "ns", costs[10], "10 subs")
        print(f"  -> {ratio:.2f}x (target <= 1.5x): {verdict(ratio <= 1.5)}")


# -- 3. request/reply latency ---------------------------------------------------------


def bench_request(rounds: int) -> None:
    print("\n3. local request/reply (MemoryTransport), latency per round trip")
    queue = ef.MessageQueue()

    @queue.on("math.add")
    def add(message: ef.Message) -> None:
        queue.reply(message, message.payload["a"] + message.payload["b"])

    request = queue.request
    clock = time.perf_counter_ns
    for i in range(2000):  # warm-up
        request("math.add", {"a": i, "b": 1}, timeout=5.0)
    samples = []
    for i in range(rounds):
        started = clock()
        request("math.add", {"a": i, "b": 1}, timeout=5.0)
        samples.append(clock() - started)
    samples.sort()
    p50 = samples[len(samples) // 2] / 1000
    p99 = samples[int(len(samples) * 0.99)] / 1000

    # Baseline: the same exchange done by hand with two plain function calls.
    def raw_exchange(payload: dict) -> int:
        return payload["a"] + payload["b"]

    raw = per_call_ns(lambda: raw_exchange({"a": 1, "b": 1}), rounds) / 1000
    row("plain function call (floor)", raw, "us")
    row("MessageQueue.request p50", p50, "us", raw, "floor")
    row("MessageQueue.request p99", p99, "us")
    print(f"  -> p50 {p50:.1f} us (target <= 10 us): {verdict(p50 <= 10)}")
    stats = queue.transport.stats
    print(f"     left behind: {stats['mailboxes']} mailboxes, {stats['inboxes']} inboxes")
    queue.close()


# -- 4. import time --------------------------------------------------------------------


def _import_env() -> dict:
    # Measure what users get: bytecode cached in __pycache__ (some sandboxes
    # set PYTHONDONTWRITEBYTECODE, which would time the compiler instead).
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _run_ms(code: str, runs: int) -> float:
    env = _import_env()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _self_import_us() -> int:
    env = _import_env()
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import eventforge"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    ).stderr
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == "eventforge":
            return int(parts[1])  # cumulative microseconds
    raise RuntimeError("eventforge not found in -X importtime output")


def bench_import(runs: int) -> None:
    print("\n4. import time (bytecode cached)")
    _run_ms("import eventforge", 1)  # writes __pycache__
    bare = _run_ms("pass", runs)
    loaded = _run_ms("import eventforge", runs)
    cumulative = statistics.median(_self_import_us() for _ in range(max(3, runs // 3))) / 1000
    row("bare interpreter start (median)", bare, "ms")
    row("interpreter + import eventforge (median)", loaded, "ms", bare, "bare")
    row("import eventforge, -X importtime cumulative", cumulative, "ms")
    added = loaded - bare
    ok = verdict(added <= 20)
    print(f"  -> adds {added:.1f} ms over a bare interpreter (target <= 20 ms): {ok}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    print(f"eventforge {ef.__version__}, Python {sys.version.split()[0]}, {sys.platform}")
    bench_publish(100_000 // scale)
    bench_fanin(50_000 // scale)
    bench_request(50_000 // scale)
    bench_import(30 // scale if not args.quick else 5)


if __name__ == "__main__":
    main()
