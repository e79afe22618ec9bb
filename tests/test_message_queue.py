"""MessageQueue over the default MemoryTransport (issue 2, DESIGN section 5)."""

from __future__ import annotations

import logging
import random
import threading
import time

import pytest
from _core_helpers import PATIENCE, SLACK, run_threads, wait_until

import eventforge as ef


@pytest.fixture
def queue():
    q = ef.MessageQueue()
    yield q
    q.close()


def _leftovers(queue):
    stats = queue.transport.stats
    return {k: stats[k] for k in ("mailboxes", "buffered", "receivers", "inboxes")}


NOTHING_LEFT = {"mailboxes": 0, "buffered": 0, "receivers": 0, "inboxes": 0}


# ---------------------------------------------------------------------------
# Pub-sub basics
# ---------------------------------------------------------------------------


def test_default_transport_is_memory_and_custom_is_used():
    assert isinstance(ef.MessageQueue().transport, ef.MemoryTransport)
    transport = ef.MemoryTransport(max_queue_size=2)
    assert ef.MessageQueue(transport).transport is transport
    assert ef.MessageQueue(transport=transport).transport is transport


def test_publish_returns_the_id_of_the_delivered_message(queue):
    seen = []
    queue.subscribe("orders.*", seen.append)
    message_id = queue.publish("orders.created", {"id": 1}, source="shop", attempt=2)
    assert len(seen) == 1
    message = seen[0]
    assert message.id == message_id
    assert message.topic == "orders.created" and message.payload == {"id": 1}
    assert message.headers == {"source": "shop", "attempt": 2}
    assert message.reply_to is None


def test_send_a_prepared_message(queue):
    seen = []
    queue.subscribe("t", seen.append)
    prepared = ef.Message("t", 5, reply_to="somewhere")
    assert queue.send(prepared) == prepared.id
    assert seen == [prepared]


def test_on_as_decorator_and_direct(queue):
    calls = []

    @queue.on("a")
    def decorated(message):
        calls.append(("decorated", message.payload))
        return "still callable"

    def direct(message):
        calls.append(("direct", message.payload))

    assert queue.on("a", direct) is direct
    assert decorated(ef.Message("x", 0)) == "still callable"
    queue.publish("a", 1)
    assert calls == [("decorated", 0), ("decorated", 1), ("direct", 1)]


def test_unsubscribe_by_id_and_by_function(queue):
    calls = []

    def handler(message):
        calls.append(message.topic)

    first = queue.subscribe("a", handler)
    queue.subscribe("b", handler)
    other = queue.subscribe("c", lambda m: calls.append("other"))
    assert queue.unsubscribe(first) is True
    assert queue.unsubscribe(first) is False
    queue.publish("a")
    queue.publish("b")
    assert calls == ["b"]
    assert queue.unsubscribe(handler) is True  # every subscription of the function
    assert queue.unsubscribe(handler) is False
    queue.publish("b")
    queue.publish("c")
    assert calls == ["b", "other"]
    assert queue.unsubscribe(other) is True
    assert queue.transport.stats["subscriptions"] == 0
    assert queue.unsubscribe("no-such-id") is False


def test_subscribe_refuses_non_callables_and_coroutine_functions(queue):
    with pytest.raises(TypeError, match="callable"):
        queue.subscribe("a", 42)

    async def handler(message):
        pass

    class Service:
        async def on_message(self, message):
            pass

    for bad in (handler, Service().on_message):
        with pytest.raises(TypeError, match="coroutine function"):
            queue.subscribe("a", bad)
        with pytest.raises(TypeError, match="coroutine function"):
            queue.on("a")(bad)
    assert queue.transport.stats["subscriptions"] == 0


def test_invalid_patterns_and_topics(queue):
    with pytest.raises(ef.TopicError, match="partial wildcard"):
        queue.subscribe("a.b*", lambda m: None)
    with pytest.raises(ef.TopicError, match="wildcard"):
        queue.publish("a.*")
    with pytest.raises(ef.TopicError, match="reserved"):
        queue.publish("$sys.x")


# ---------------------------------------------------------------------------
# Handler errors
# ---------------------------------------------------------------------------


def test_handler_errors_are_isolated_logged_and_counted(queue, caplog):
    calls = []

    def failing_handler(message):
        raise ValueError("boom")

    queue.subscribe("t", failing_handler)
    queue.subscribe("t", lambda m: calls.append(m.payload))
    with caplog.at_level(logging.ERROR, logger="eventforge"):
        queue.publish("t", 1)  # does not raise
        queue.publish("t", 2)
    assert calls == [1, 2]
    assert queue.stats["handler_errors"] == 2
    records = [r for r in caplog.records if "failing_handler" in r.getMessage()]
    assert len(records) == 2
    assert records[0].levelno == logging.ERROR
    assert isinstance(records[0].exc_info[1], ValueError)


def test_on_error_receives_the_exception_and_the_message(caplog):
    errors = []
    queue = ef.MessageQueue(on_error=lambda exc, message: errors.append((exc, message)))
    problem = KeyError("missing")

    def handler(message):
        raise problem

    queue.subscribe("t", handler)
    with caplog.at_level(logging.ERROR, logger="eventforge"):
        message_id = queue.publish("t", "payload")
    assert len(errors) == 1
    assert errors[0][0] is problem
    assert errors[0][1].id == message_id and errors[0][1].payload == "payload"
    assert queue.stats["handler_errors"] == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # handled by the hook
    queue.close()


def test_a_failing_on_error_hook_is_logged_too(caplog):
    def hook(exc, message):
        raise RuntimeError("hook broke")

    queue = ef.MessageQueue(on_error=hook)
    queue.subscribe("t", lambda m: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="eventforge"):
        queue.publish("t")
    text = caplog.text
    assert "on_error hook failed" in text and "hook broke" in text
    assert "ZeroDivisionError" in text  # the original failure is still reported
    queue.close()


# ---------------------------------------------------------------------------
# Point-to-point and request-reply
# ---------------------------------------------------------------------------


def test_send_then_receive_fifo(queue):
    ids = [queue.publish("jobs", i) for i in range(20)]
    got = [queue.receive("jobs", timeout=0) for _ in range(20)]
    assert [m.payload for m in got] == list(range(20))
    assert [m.id for m in got] == ids
    assert queue.receive("jobs", timeout=0) is None
    assert _leftovers(queue) == NOTHING_LEFT


def test_receive_with_a_pattern_raises_a_clear_error(queue):
    with pytest.raises(ef.TopicError, match="exact topic"):
        queue.receive("jobs.*", timeout=0)


def test_request_reply(queue):
    @queue.on("math.add")
    def add(message):
        queue.reply(message, message.payload["a"] + message.payload["b"], unit="none")

    reply = queue.request("math.add", {"a": 2, "b": 3}, timeout=PATIENCE, trace="t1")
    assert isinstance(reply, ef.Message)
    assert reply.payload == 5
    assert reply.headers == {"unit": "none"}
    assert reply.topic.startswith("_reply.")
    assert _leftovers(queue) == NOTHING_LEFT


def test_reply_correlates_with_the_request(queue):
    requests = []

    @queue.on("svc")
    def responder(message):
        requests.append(message)
        queue.reply(message, "ok")

    reply = queue.request("svc", timeout=PATIENCE)
    request = requests[0]
    assert request.reply_to == reply.topic
    assert reply.correlation_id == request.id
    # An explicit correlation id on the request is kept.
    seen = []
    queue.subscribe(request.reply_to + "x", seen.append)
    custom = ef.Message("q", reply_to=request.reply_to + "x", correlation_id="corr-7")
    queue.reply(custom, 1)
    assert seen[0].correlation_id == "corr-7"


def test_reply_without_reply_to_is_a_value_error(queue):
    message = ef.Message("plain.event", 1)
    with pytest.raises(ValueError, match="no reply_to"):
        queue.reply(message, "answer")


def test_request_times_out_with_none(queue):
    asked = 0.2
    started = time.monotonic()
    assert queue.request("nobody.listens", 1, timeout=asked) is None
    elapsed = time.monotonic() - started
    assert asked - 0.005 <= elapsed <= asked + SLACK
    # The unanswered request itself waits in a mailbox (nobody consumed it), but
    # no inbox or receiver is left behind.
    assert queue.transport.stats["inboxes"] == 0
    assert queue.transport.stats["receivers"] == 0


def test_receive_times_out_with_none(queue):
    asked = 0.2
    started = time.monotonic()
    assert queue.receive("quiet", timeout=asked) is None
    elapsed = time.monotonic() - started
    assert asked - 0.005 <= elapsed <= asked + SLACK


def test_late_replies_are_dropped_and_counted(queue):
    pending = []
    queue.subscribe("slow", pending.append)  # answers only later
    assert queue.request("slow", timeout=0.05) is None
    assert queue.request("slow", timeout=0.05) is None
    for message in pending:
        queue.reply(message, "too late")  # no error for the responder
    stats = queue.transport.stats
    assert stats["dropped"] == 2
    assert _leftovers(queue) == NOTHING_LEFT


def test_ten_thousand_round_trips_leave_nothing_behind(queue):
    @queue.on("echo")
    def echo(message):
        queue.reply(message, message.payload)

    for i in range(10_000):
        reply = queue.request("echo", i, timeout=PATIENCE)
        assert reply is not None and reply.payload == i
    stats = queue.transport.stats
    assert stats["subscriptions"] == 1  # only the responder
    assert stats["dropped"] == 0
    assert _leftovers(queue) == NOTHING_LEFT
    assert stats["sent"] == 20_000


# ---------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------


def test_close_semantics():
    queue = ef.MessageQueue()
    waiter = {}
    thread = threading.Thread(
        target=lambda: waiter.setdefault("m", queue.receive("w", PATIENCE)), daemon=True
    )
    thread.start()
    requester = threading.Thread(
        target=lambda: waiter.setdefault("r", queue.request("svc", timeout=PATIENCE)),
        daemon=True,
    )
    requester.start()
    assert wait_until(lambda: queue.transport.stats["receivers"] == 1)
    assert wait_until(lambda: queue.transport.stats["inboxes"] == 1)
    queue.close()
    thread.join(PATIENCE)
    requester.join(PATIENCE)
    assert waiter == {"m": None, "r": None}  # blocked callers woke with None
    with pytest.raises(ef.TransportClosedError) as caught:
        queue.publish("t")
    assert isinstance(caught.value, RuntimeError)
    assert queue.receive("w") is None
    with pytest.raises(RuntimeError):
        queue.request("svc", timeout=1)
    with pytest.raises(RuntimeError):
        queue.subscribe("t", lambda m: None)
    queue.close()  # idempotent


def test_context_manager():
    with ef.MessageQueue() as queue:
        queue.publish("t")
    assert queue.transport.closed
    with pytest.raises(ef.TransportClosedError):
        queue.publish("t")


# ---------------------------------------------------------------------------
# Re-entrancy: handlers use the queue during delivery
# ---------------------------------------------------------------------------


def test_handler_publishes_during_delivery(queue):
    calls = []

    @queue.on("outer")
    def outer(message):
        calls.append("outer start")
        queue.publish("inner", message.payload + 1)
        calls.append("outer end")

    @queue.on("inner")
    def inner(message):
        calls.append(f"inner {message.payload}")

    queue.publish("outer", 1)
    assert calls == ["outer start", "inner 2", "outer end"]


def test_handler_recursion_on_its_own_topic(queue):
    depths = []

    @queue.on("countdown")
    def countdown(message):
        depths.append(message.payload)
        if message.payload:
            queue.publish("countdown", message.payload - 1)

    queue.publish("countdown", 50)
    assert depths == list(range(50, -1, -1))


def test_handler_subscribes_during_delivery(queue):
    calls = []

    @queue.on("t")
    def first(message):
        calls.append(("first", message.payload))
        if message.payload == 1:
            queue.on("t", lambda m: calls.append(("added", m.payload)))

    queue.publish("t", 1)
    assert calls == [("first", 1)]  # not called for the message in flight
    queue.publish("t", 2)
    assert calls == [("first", 1), ("first", 2), ("added", 2)]


def test_handler_unsubscribes_itself_and_others(queue):
    calls = []
    ids = {}

    def once(message):
        calls.append("once")
        queue.unsubscribe(ids["once"])

    def remover(message):
        calls.append("remover")
        queue.unsubscribe(ids["victim"])

    ids["once"] = queue.subscribe("t", once)
    ids["remover"] = queue.subscribe("t", remover)
    ids["victim"] = queue.subscribe("t", lambda m: calls.append("victim"))
    queue.publish("t")
    queue.publish("t")
    assert calls == ["once", "remover", "remover"]  # the victim was skipped in flight
    assert queue.transport.stats["subscriptions"] == 1


def test_handler_makes_a_request_on_the_same_queue(queue):
    @queue.on("inner.svc")
    def inner(message):
        queue.reply(message, message.payload * 2)

    @queue.on("outer.svc")
    def outer(message):
        reply = queue.request("inner.svc", message.payload, timeout=PATIENCE)
        queue.reply(message, reply.payload + 1)

    assert queue.request("outer.svc", 20, timeout=PATIENCE).payload == 41
    assert _leftovers(queue) == NOTHING_LEFT


# ---------------------------------------------------------------------------
# The deadlock of the original: a handler waits for another thread that
# publishes to the same queue.
# ---------------------------------------------------------------------------


def _run_with_deadline(target, seconds=PATIENCE):
    done = threading.Event()
    errors = []

    def run():
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(seconds), "deadlock: delivery did not finish"
    if errors:
        raise errors[0]


@pytest.mark.timeout(60)
def test_handler_waiting_for_a_thread_that_publishes_does_not_deadlock(queue):
    finished = threading.Event()
    outcome = {}

    @queue.on("step.done")
    def step_done(message):
        finished.set()

    @queue.on("job")
    def job(message):
        worker = threading.Thread(target=lambda: queue.publish("step.done", message.payload))
        worker.start()
        outcome["signalled"] = finished.wait(PATIENCE)
        worker.join(PATIENCE)
        outcome["worker_alive"] = worker.is_alive()

    _run_with_deadline(lambda: queue.publish("job", 1))
    assert outcome == {"signalled": True, "worker_alive": False}


@pytest.mark.timeout(60)
def test_handler_waiting_for_a_thread_that_requests_does_not_deadlock(queue):
    outcome = {}

    @queue.on("svc")
    def svc(message):
        queue.reply(message, "pong")

    @queue.on("job")
    def job(message):
        result = {}
        worker = threading.Thread(
            target=lambda: result.setdefault("r", queue.request("svc", timeout=PATIENCE))
        )
        worker.start()
        worker.join(PATIENCE)
        outcome["reply"] = result.get("r") and result["r"].payload

    _run_with_deadline(lambda: queue.publish("job"))
    assert outcome == {"reply": "pong"}


@pytest.mark.timeout(60)
def test_handler_blocked_in_receive_is_fed_by_another_thread(queue):
    outcome = {}

    @queue.on("job")
    def job(message):
        feeder = threading.Timer(0.02, lambda: queue.publish("job.input", "data"))
        feeder.start()
        got = queue.receive("job.input", timeout=PATIENCE)
        outcome["got"] = got and got.payload

    _run_with_deadline(lambda: queue.publish("job"))
    assert outcome == {"got": "data"}


# ---------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_publishers_with_concurrent_subscribe_and_unsubscribe(queue):
    per_thread, publishers = 400, 8
    stable_counts = {"exact": 0, "pattern": 0}
    lock = threading.Lock()

    def count(key):
        def handler(message):
            with lock:
                stable_counts[key] += 1

        return handler

    queue.subscribe("load.item", count("exact"))
    queue.subscribe("load.*", count("pattern"))
    churn_calls = []

    def publisher(index):
        def run():
            for i in range(per_thread):
                queue.publish("load.item", (index, i))

        return run

    def churner(seed):
        def run():
            rnd = random.Random(seed)
            mine = []
            for _ in range(300):
                if mine and rnd.random() < 0.5:
                    assert queue.unsubscribe(mine.pop(rnd.randrange(len(mine))))
                else:
                    pattern = rnd.choice(["load.item", "load.*", "**", "other.*"])
                    mine.append(queue.subscribe(pattern, churn_calls.append))
            for sub_id in mine:
                assert queue.unsubscribe(sub_id)

        return run

    run_threads([publisher(i) for i in range(publishers)] + [churner(s) for s in range(3)])
    total = per_thread * publishers
    assert stable_counts == {"exact": total, "pattern": total}
    stats = queue.transport.stats
    assert stats["subscriptions"] == 2
    assert stats["sent"] == total
    assert stats["handler_errors"] == 0 and queue.stats["handler_errors"] == 0
    assert _leftovers(queue) == NOTHING_LEFT


@pytest.mark.timeout(120)
def test_concurrent_requesters(queue):
    @queue.on("double")
    def double(message):
        queue.reply(message, message.payload * 2)

    def requester(base):
        def run():
            for i in range(300):
                reply = queue.request("double", base + i, timeout=PATIENCE)
                assert reply is not None and reply.payload == 2 * (base + i)

        return run

    run_threads([requester(k * 1000) for k in range(8)])
    assert _leftovers(queue) == NOTHING_LEFT
    assert queue.transport.stats["dropped"] == 0
