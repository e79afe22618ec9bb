"""pytest-benchmark suite of the in-process core (run: pytest bench/ --benchmark-only).

The same groups hold eventforge and its peer, so the table compares them
directly.  ``bench/bench_core.py`` prints the ratios with the issue targets.
"""

from __future__ import annotations

import inspect
import itertools

import pytest

import eventforge as ef

pyee = pytest.importorskip("pyee")
blinker = pytest.importorskip("blinker")


@pytest.fixture
def queue():
    q = ef.MessageQueue()
    yield q
    q.close()


@pytest.mark.benchmark(group="publish-to-delivery")
def test_eventforge_publish(benchmark, queue):
    seen = []
    queue.subscribe("orders.created", lambda message: seen.append(message.payload))
    benchmark(queue.publish, "orders.created", 1)
    assert seen


@pytest.mark.benchmark(group="publish-to-delivery")
def test_pyee_emit(benchmark):
    seen = []
    emitter = pyee.EventEmitter()
    emitter.on("orders.created", lambda payload: seen.append(payload))
    benchmark(emitter.emit, "orders.created", 1)
    assert seen


@pytest.mark.benchmark(group="publish-to-delivery")
def test_blinker_send(benchmark):
    seen = []
    signal = blinker.Signal()
    signal.connect(lambda sender, **kw: seen.append(sender), weak=False)
    benchmark(signal.send, 1)
    assert seen


@pytest.mark.parametrize("count", [10, 10_000])
@pytest.mark.benchmark(group="publish-vs-subscriptions")
def test_publish_with_many_subscriptions(benchmark, queue, count):
    noop = lambda message: None  # noqa: E731
    for i in range(count):
        queue.subscribe(("svc%d.orders.*", "svc%d.**", "svc%d.*.failed")[i % 3] % i, noop)
    queue.subscribe("app.orders.*", noop)
    # Cycle through 4x as many distinct topics as the match cache holds, in
    # order: the cache evicts its oldest topic first, so every publish misses
    # it and walks the trie (a single topic would time the cache alone).
    cache_size = inspect.signature(ef.SubscriptionTrie).parameters["cache_size"].default
    topics = itertools.cycle([f"app.orders.o{k}" for k in range(4 * cache_size)])
    publish = queue.publish
    benchmark(lambda: publish(next(topics), 1))
    assert queue.transport.stats["mailboxes"] == 0  # every topic had its subscriber


@pytest.mark.benchmark(group="request-reply")
def test_local_request_reply(benchmark, queue):
    @queue.on("math.add")
    def add(message):
        queue.reply(message, message.payload["a"] + message.payload["b"])

    reply = benchmark(queue.request, "math.add", {"a": 1, "b": 2}, 5.0)
    assert reply.payload == 3
    assert queue.transport.stats["inboxes"] == 0
