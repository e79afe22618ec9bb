"""In-process benchmarks of the core, each printed beside a baseline from the same run.

    python bench/bench_core.py              # all figures
    python bench/bench_core.py --quick      # less work per round, 3 rounds (smoke run)
    python bench/bench_core.py --rounds 15  # more rounds for a steadier median

Figures (targets from issue 2):
  1. publish-to-delivery per message vs pyee ``emit`` and blinker ``send``
     (target <= 1.2x pyee);
  2. publish cost with 10,000 vs 10 subscriptions on mixed patterns
     (target <= 1.5x), on topics that miss the match cache and on topics
     that hit it;
  3. local request/reply latency p50 (target <= 10 us);
  4. ``import eventforge`` time over a bare interpreter (target <= 20 ms).

eventforge and its baselines run in the same rounds, in random order; each
figure is the median over the rounds with its min-max range, ratios are taken
per round, and every verdict is computed from the measured median (see
``bench/_common.py``).  The machine may be shared: read ratios from one run.
"""

from __future__ import annotations

import collections
import inspect
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import _common as bench  # noqa: E402

import eventforge as ef  # noqa: E402

NS = 1e9  # seconds -> nanoseconds
US = 1e6  # seconds -> microseconds


# -- 1. publish-to-delivery -------------------------------------------------------


def bench_publish(number: int, rounds: int) -> None:
    print(f"\n1. publish-to-delivery, one subscriber, per message ({number:,} per round)")
    from blinker import Signal
    from pyee import EventEmitter

    sink = collections.deque(maxlen=16).append  # the same cheap handler body for all

    queue = ef.MessageQueue()
    queue.subscribe("orders.created", lambda message: sink(message.payload))
    emitter = EventEmitter()
    emitter.on("orders.created", lambda payload: sink(payload))
    signal = Signal()
    signal.connect(lambda sender, **kw: sink(sender), weak=False)

    got = bench.interleave({
        "eventforge": bench.per_call_round(lambda: queue.publish("orders.created", 1), number, NS),
        "pyee": bench.per_call_round(lambda: emitter.emit("orders.created", 1), number, NS),
        "blinker": bench.per_call_round(lambda: signal.send(1), number, NS),
    }, rounds)
    bench.row("pyee EventEmitter.emit", got["pyee"], "ns")
    bench.row("blinker Signal.send", got["blinker"], "ns")
    bench.row("eventforge MessageQueue.publish", got["eventforge"], "ns", got["pyee"], "pyee")
    bench.row("", got["eventforge"], "ns", got["blinker"], "blinker")
    bench.verdict("eventforge / pyee", bench.ratios(got["eventforge"], got["pyee"]), 1.2)
    print("     (publish also builds a Message: id, timestamp, headers; emit passes args)")
    queue.close()


# -- 2. publish cost vs number of subscriptions ------------------------------------

# The match cache of the default SubscriptionTrie (read from its signature, not
# from private state).  A publisher cycling through more distinct topics than
# this, in the same order every time, misses the cache on every publish: the
# cache evicts its oldest topic first, which is always the next one asked for.
CACHE_SIZE = inspect.signature(ef.SubscriptionTrie).parameters["cache_size"].default
MISSING_TOPICS = 4 * CACHE_SIZE


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


def _queue_with(count: int) -> ef.MessageQueue:
    queue = ef.MessageQueue()
    noop = lambda message: None  # noqa: E731
    for pattern in _mixed_patterns(count):
        queue.subscribe(pattern, noop)
    # Every queue also has the same few subscriptions the topics below hit, so
    # both sizes deliver to the same number of handlers.
    for pattern in ("app.orders.created", "app.orders.*", "app.**", "**.audit"):
        queue.subscribe(pattern, noop)
    return queue


def _topics(distinct: int) -> List[str]:
    """``distinct`` topics (a multiple of 4) in four shapes, each matching 1 to 3 patterns."""
    shapes = ("app.orders.o{k}", "app.eu.b{k}.audit", "app.x{k}", "app.orders.created.v{k}")
    return [shapes[i % 4].format(k=i // 4) for i in range(distinct)]


def _cycling_publisher(queue: ef.MessageQueue, topics: List[str]) -> Callable[[], None]:
    publish = queue.publish
    size = len(topics)
    state = {"i": 0}

    def one() -> None:
        i = state["i"] = (state["i"] + 1) % size
        publish(topics[i], i)

    return one


def bench_fanin(number: int, rounds: int) -> None:
    print(f"\n2. publish cost with 10,000 vs 10 subscriptions (mixed patterns, {number:,} "
          "per round)")
    print(f"   cache missed: {MISSING_TOPICS:,} distinct topics cycled in order, 4x the "
          f"SubscriptionTrie cache ({CACHE_SIZE:,}); cache hit: 4 topics")
    cases = {(count, label): (_queue_with(count), _topics(size))
             for count in (10, 10_000) for label, size in (("missed", MISSING_TOPICS),
                                                           ("hit", 4))}
    for queue, topics in cases.values():  # one pass over the topics: trie and cache warm
        for i, topic in enumerate(topics):
            queue.publish(topic, i)
    got = bench.interleave({key: bench.per_call_round(_cycling_publisher(q, t), number, NS)
                            for key, (q, t) in cases.items()}, rounds)
    for label in ("missed", "hit"):
        few, many = got[(10, label)], got[(10_000, label)]
        bench.row(f"cache {label}: 10 subscriptions", few, "ns")
        bench.row(f"cache {label}: 10,000 subscriptions", many, "ns", few, "10 subs")
        bench.verdict(f"cache {label}, 10,000 / 10 subscriptions", bench.ratios(many, few), 1.5)
    for queue, _ in cases.values():
        assert queue.transport.stats["mailboxes"] == 0, "every topic must have a subscriber"
        queue.close()


# -- 3. request/reply latency ---------------------------------------------------------


def bench_request(number: int, rounds: int) -> None:
    print(f"\n3. local request/reply (MemoryTransport), latency per round trip "
          f"({number:,} per round)")
    queue = ef.MessageQueue()

    @queue.on("math.add")
    def add(message: ef.Message) -> None:
        queue.reply(message, message.payload["a"] + message.payload["b"])

    request = queue.request
    for i in range(2000):  # warm-up
        request("math.add", {"a": i, "b": 1}, timeout=5.0)

    # Baseline: the same exchange done by hand with a plain function call.
    def raw_exchange(payload: dict) -> int:
        return payload["a"] + payload["b"]

    got = bench.interleave({
        "request": lambda: bench.time_calls(
            lambda i: request("math.add", {"a": i, "b": 1}, timeout=5.0), number),
        "floor": bench.per_call_round(lambda: raw_exchange({"a": 1, "b": 1}), number, US),
    }, rounds)
    p50 = [bench.percentile(samples, 50) * US for samples in got["request"]]
    p99 = [bench.percentile(samples, 99) * US for samples in got["request"]]
    bench.row("plain function call (floor)", got["floor"], "us")
    bench.row("MessageQueue.request p50", p50, "us", got["floor"], "floor")
    bench.row("MessageQueue.request p99", p99, "us")
    bench.verdict("request p50", p50, 10, unit=" us")
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


def _start_ms(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=_import_env())
    return (time.perf_counter() - started) * 1000


def _self_import_us() -> int:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import eventforge"],
        check=True,
        env=_import_env(),
        capture_output=True,
        text=True,
    ).stderr
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == "eventforge":
            return int(parts[1])  # cumulative microseconds
    raise RuntimeError("eventforge not found in -X importtime output")


def bench_import(rounds: int) -> None:
    print(f"\n4. import time (bytecode cached), {rounds} interpreter starts each")
    _start_ms("import eventforge")  # writes __pycache__
    got = bench.interleave({
        "bare": lambda: _start_ms("pass"),
        "import": lambda: _start_ms("import eventforge"),
    }, rounds)
    added = [loaded - bare for loaded, bare in zip(got["import"], got["bare"])]
    cumulative = statistics.median(_self_import_us() for _ in range(max(3, rounds // 3))) / 1000
    bench.row("bare interpreter start", got["bare"], "ms")
    bench.row("interpreter + import eventforge", got["import"], "ms", got["bare"], "bare")
    bench.row("added by import eventforge (per round)", added, "ms")
    print(f"  {'import eventforge, -X importtime cumulative':<46} {cumulative:>9.2f} ms "
          "(median)")
    bench.verdict("time added by import eventforge", added, 20, unit=" ms")


def main() -> None:
    args = bench.parser(__doc__).parse_args()
    rounds = bench.rounds_of(args)
    scale = 10 if args.quick else 1
    bench.header("core benchmarks", ef.__version__, rounds)
    bench_publish(100_000 // scale, rounds)
    bench_fanin(50_000 // scale, rounds)
    bench_request(20_000 // scale, rounds)
    bench_import(5 * rounds)


if __name__ == "__main__":
    main()
