"""WorkQueue: competing consumers, leases, retries, dead letters, and the WorkStore seam."""

from __future__ import annotations

import collections
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List

import pytest
from _core_helpers import wait_until as wait_for
from _wq_helpers import FakeClock
from hypothesis import given, settings
from hypothesis import strategies as st

import eventforge as ef

STORE_KINDS = ["memory", "sqlite", "redis"]
# Store-level tests also run SQLite's select-then-update claim (SQLite < 3.35).
STORE_LEVEL_KINDS = ["memory", "sqlite", "sqlite-select", "redis"]
_REDIS_URL: List[str] = []  # the real redis-server of a test on the "redis" kind


@pytest.fixture(autouse=True)
def _redis_server_for_redis_kind(request):
    """Tests parametrized on the "redis" store kind get the session's redis-server."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    if "redis" in (params.get("kind"), params.get("new_wq")):
        pytest.importorskip("redis")
        _REDIS_URL[:] = [request.getfixturevalue("redis_url")]
    yield


def open_store(kind: str, directory: str, **options: Any) -> ef.WorkStore:
    """A fresh store of ``kind``; the SQLite one in a new file under ``directory``,
    the Redis one under its own key prefix on the test redis-server."""
    if kind == "memory":
        return ef.MemoryWorkStore(**options)
    if kind == "redis":
        from _servers import unique_name

        from eventforge_ext.redis import RedisWorkStore

        for sqlite_only in ("sweep_interval", "synchronous"):
            options.pop(sqlite_only, None)
        return RedisWorkStore(_REDIS_URL[0], prefix=unique_name("wq"), **options)
    path = tempfile.mktemp(suffix=".db", dir=directory)
    if kind == "sqlite-select":  # the claim path of SQLite < 3.35
        options["use_returning"] = False
    return ef.SQLiteWorkStore(path, **options)


@pytest.fixture(params=STORE_KINDS)
def new_wq(request, tmp_path, no_leaks):
    """Makes WorkQueues on the parametrized store kind; closes them after the test."""
    made: List[ef.WorkQueue] = []

    def make(**kwargs: Any) -> ef.WorkQueue:
        kwargs.setdefault("store", open_store(request.param, str(tmp_path)))
        queue = ef.WorkQueue(**kwargs)
        made.append(queue)
        return queue

    make.kind = request.param  # type: ignore[attr-defined]
    yield make
    for queue in made:
        queue.close()


@pytest.fixture
def wq(new_wq):
    return new_wq(reaper_interval=0.05)


# -- the API ------------------------------------------------------------------


def test_enqueue_dequeue_ack_and_counts(wq):
    job_id = wq.enqueue("jobs", {"n": 1}, priority="high")
    assert wq.pending_count("jobs") == 1 and wq.in_flight_count("jobs") == 0
    message = wq.dequeue("jobs", timeout=1.0)
    assert message.id == job_id and message.payload == {"n": 1}
    assert message.headers["priority"] == "high"
    assert message.headers["_wq_attempt"] == 1
    assert isinstance(message.headers["_wq_delivery_id"], str)
    assert wq.pending_count("jobs") == 0 and wq.in_flight_count("jobs") == 1
    assert wq.ack(message) is True
    assert wq.in_flight_count("jobs") == 0
    assert wq.ack(message) is False  # already settled: refused, not a second ack
    assert wq.stats["work"]["acked"] == 1


def test_ack_by_delivery_id(wq):
    wq.enqueue("jobs", 1)
    message = wq.dequeue("jobs", timeout=1.0)
    assert wq.ack(message.headers["_wq_delivery_id"]) is True
    assert wq.ack("no-such-delivery") is False


def test_counts_sum_over_topics_and_groups(wq):
    wq.enqueue("a", 1)
    wq.enqueue("b", 2)
    wq.enqueue("b", 3)
    assert wq.pending_count() == 3
    assert wq.pending_count("b") == 2
    assert wq.pending_count("b", "default") == 2
    assert wq.pending_count("b", "other") == 0


def test_reserved_headers_cannot_be_overridden(wq):
    with pytest.raises(ValueError, match="_wq_delivery_id"):
        wq.enqueue("jobs", 1, _wq_delivery_id="forged")
    with pytest.raises(ValueError, match="reserved"):
        wq.enqueue("jobs", 1, _wq_attempt=7)
    assert wq.pending_count("jobs") == 0


def test_bound_raises_queue_full(new_wq):
    with new_wq(max_work_queue_size=2) as wq:
        wq.enqueue("jobs", 1)
        wq.enqueue("jobs", 2)
        with pytest.raises(ef.QueueFullError, match="max_work_queue_size=2"):
            wq.enqueue("jobs", 3)
        assert isinstance(ef.QueueFullError("x"), ef.EventforgeError)
        # in-flight jobs do not count: taking one makes room
        wq.dequeue("jobs", timeout=1.0)
        wq.enqueue("jobs", 3)
        assert wq.pending_count("jobs") == 2


def test_enqueue_after_close_raises(new_wq):
    wq = new_wq()
    wq.close()
    with pytest.raises(RuntimeError, match="closed"):
        wq.enqueue("jobs", 1)
    with pytest.raises(RuntimeError):
        wq.consume("jobs", print)
    wq.close()  # idempotent


@pytest.mark.parametrize("kwargs", [
    {"max_work_queue_size": -1}, {"default_visibility_timeout": 0},
    {"max_retries": -1}, {"max_retries": 1.5}, {"reaper_interval": 0},
    {"max_workers": 0}, {"retry_delay": -1}, {"store": 42},
])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises((ValueError, TypeError)):
        ef.WorkQueue(**kwargs)


def test_bad_topics_and_handlers_are_refused(wq):
    with pytest.raises(ef.TopicError):
        wq.enqueue("bad topic", 1)
    with pytest.raises(ef.TopicError):
        wq.consume("jobs.*", print)
    with pytest.raises(TypeError):
        wq.consume("jobs", "not callable")

    async def coroutine(message):
        pass

    with pytest.raises(TypeError, match="coroutine"):
        wq.consume("jobs", coroutine)
    with pytest.raises(ValueError):
        wq.consume("jobs", print, concurrency=0)


def test_dequeue_timeout_is_honoured(wq):
    start = time.monotonic()
    assert wq.dequeue("jobs", timeout=0.2) is None
    assert time.monotonic() - start >= 0.19
    assert wq.dequeue("jobs", timeout=0) is None


def test_close_unblocks_dequeue(new_wq):
    wq = new_wq()
    result: List[Any] = []
    waiter = threading.Thread(target=lambda: result.append(wq.dequeue("jobs")))
    waiter.start()
    time.sleep(0.1)
    wq.close()
    waiter.join(5.0)
    assert not waiter.is_alive() and result == [None]


def test_still_a_message_queue(wq):
    seen = []
    wq.subscribe("events", lambda m: seen.append(m.payload))
    wq.publish("events", "hello")
    assert seen == ["hello"]
    assert wq.pending_count() == 0  # pub-sub does not create jobs


def test_context_manager_and_import_alias(no_leaks):
    from eventforge.work_queue import QueueFullError, WorkQueue

    assert QueueFullError is ef.QueueFullError
    with WorkQueue() as wq:
        assert isinstance(wq, ef.WorkQueue) and isinstance(wq, ef.MessageQueue)
        wq.enqueue("jobs", 1)
    assert wq.closed


# -- push consumers ---------------------------------------------------------------


def test_exactly_once_with_4_producers_and_3_consumers(wq):
    total = 4 * 200
    handled: Dict[Any, int] = collections.Counter()
    by_consumer: Dict[str, int] = collections.Counter()
    lock = threading.Lock()
    done = threading.Event()

    def consumer(name):
        def handle(message):
            with lock:
                handled[message.payload] += 1
                by_consumer[name] += 1
                if sum(handled.values()) == total:
                    done.set()
        return handle

    for name in ("c1", "c2", "c3"):
        wq.consume("jobs", consumer(name))

    def produce(p):
        for i in range(200):
            wq.enqueue("jobs", f"{p}-{i}")

    producers = [threading.Thread(target=produce, args=(p,)) for p in range(4)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join()
    assert done.wait(30)
    assert wait_for(lambda: wq.in_flight_count("jobs") == 0)
    assert len(handled) == total and set(handled.values()) == {1}
    assert wq.pending_count("jobs") == 0
    # The store acknowledges before the queue counts: wait out that window.
    assert wait_for(lambda: wq.stats["work"]["acked"] == total), wq.stats["work"]
    assert sum(by_consumer.values()) == total


def test_half_failing_attempts_end_acked_or_dead_lettered(new_wq):
    total = 300
    rng = random.Random(12)
    lock = threading.Lock()
    acked: Dict[Any, int] = collections.Counter()
    dead: Dict[Any, int] = collections.Counter()
    reasons = collections.Counter()
    with new_wq(max_retries=2, reaper_interval=0.05) as wq:
        def flaky(message):
            with lock:
                fail = rng.random() < 0.5
            if fail:
                raise RuntimeError("transient")
            with lock:
                acked[message.payload] += 1

        def dead_letters(message):
            with lock:
                dead[message.payload] += 1
                reasons[message.headers["_wq_reason"]] += 1

        for _ in range(3):
            wq.consume("jobs", flaky)
        wq.consume("jobs.dead_letter", dead_letters)
        logging.getLogger("eventforge").disabled = True  # 150 expected tracebacks
        try:
            for i in range(total):
                wq.enqueue("jobs", i)
            assert wait_for(lambda: sum(acked.values()) + sum(dead.values()) >= total, 30)
            assert wait_for(lambda: wq.in_flight_count() == 0)
        finally:
            logging.getLogger("eventforge").disabled = False
        assert sum(acked.values()) + sum(dead.values()) == total
        assert set(acked.values()) <= {1} and set(dead.values()) <= {1}
        assert not set(acked) & set(dead)
        assert set(acked) | set(dead) == set(range(total))
        assert dead and set(reasons) == {"max_retries_exceeded"}
        assert wq.pending_count() == 0


def test_round_robin_within_a_group_and_a_copy_per_group(wq):
    lock = threading.Lock()
    got: Dict[str, List[Any]] = collections.defaultdict(list)

    def recorder(name):
        def handle(message):
            with lock:
                got[name].append(message.payload)
            time.sleep(0.001)  # a job takes a moment: both consumers are kept busy
        return handle

    wq.consume("jobs", recorder("a1"), consumer_group="a", prefetch=1)
    wq.consume("jobs", recorder("a2"), consumer_group="a", prefetch=1)
    wq.consume("jobs", recorder("b1"), consumer_group="b")
    for i in range(100):
        wq.enqueue("jobs", i)
    assert wait_for(lambda: sum(len(v) for v in got.values()) == 200)
    assert sorted(got["a1"] + got["a2"]) == list(range(100))
    assert sorted(got["b1"]) == list(range(100))
    assert len(got["a1"]) >= 25 and len(got["a2"]) >= 25


def test_consumers_free_at_once_share_jobs_in_rotation(wq):
    gate = threading.Event()
    lock = threading.Lock()
    got: Dict[str, List[Any]] = collections.defaultdict(list)

    def blocker(name):
        def handle(message):
            with lock:
                got[name].append(message.payload)
            gate.wait(10)
        return handle

    wq.consume("jobs", blocker("c1"))
    wq.consume("jobs", blocker("c2"))
    wq.enqueue("jobs", 1)
    wq.enqueue("jobs", 2)
    assert wait_for(lambda: sum(len(v) for v in got.values()) == 2)
    assert len(got["c1"]) == 1 and len(got["c2"]) == 1  # neither took both
    gate.set()


def test_groups_are_independent(wq):
    lock = threading.Lock()
    attempts = collections.Counter()

    def fails_once(message):
        with lock:
            attempts["a", message.payload] += 1
            if attempts["a", message.payload] == 1:
                raise RuntimeError("first attempt fails")

    def succeeds(message):
        with lock:
            attempts["b", message.payload] += 1

    wq.consume("jobs", fails_once, consumer_group="a")
    wq.consume("jobs", succeeds, consumer_group="b")
    logging.getLogger("eventforge").disabled = True
    try:
        for i in range(20):
            wq.enqueue("jobs", i)
        assert wait_for(lambda: sum(v for (g, _), v in attempts.items() if g == "a") == 40)
        assert wait_for(lambda: wq.in_flight_count() == 0)
    finally:
        logging.getLogger("eventforge").disabled = False
    assert all(attempts["b", i] == 1 for i in range(20))  # a's retries never reach b
    assert all(attempts["a", i] == 2 for i in range(20))


def test_raising_handler_is_nacked_logged_and_the_pool_survives(wq, caplog):
    lock = threading.Lock()
    calls = collections.Counter()
    done = threading.Event()
    errors: List[BaseException] = []

    def handler(message):
        with lock:
            calls[message.payload] += 1
            first = calls[message.payload] == 1
        if message.payload == "ok":
            done.set()
            return
        if first:
            raise {"exit": SystemExit(3), "interrupt": KeyboardInterrupt(),
                   "error": ValueError("bad")}[message.payload]

    wq.on_error = lambda exc, message: errors.append(exc)
    wq.consume("jobs", handler)
    for payload in ("exit", "interrupt", "error"):
        wq.enqueue("jobs", payload)
    assert wait_for(lambda: all(calls[p] == 2 for p in ("exit", "interrupt", "error")))
    wq.enqueue("jobs", "ok")
    assert done.wait(5)
    assert sorted(type(e).__name__ for e in errors) == [
        "KeyboardInterrupt", "SystemExit", "ValueError"]
    assert wq.stats["work"]["handler_errors"] == 3


def test_raising_handler_is_logged_without_on_error(wq, caplog):
    done = threading.Event()

    def handler(message):
        if message.headers["_wq_attempt"] == 1:
            raise ValueError("boom")
        done.set()

    wq.consume("jobs", handler)
    with caplog.at_level(logging.ERROR, logger="eventforge"):
        wq.enqueue("jobs", 1)
        assert done.wait(5)
    assert any("boom" in (r.exc_text or "") or (r.exc_info and "boom" in str(r.exc_info[1]))
               for r in caplog.records)


def test_handler_may_settle_its_own_job(wq, caplog):
    done = threading.Event()

    def handler(message):
        assert wq.ack(message) is True
        done.set()

    wq.consume("jobs", handler)
    with caplog.at_level(logging.WARNING, logger="eventforge"):
        wq.enqueue("jobs", 1)
        assert done.wait(5)
        assert wait_for(lambda: wq.in_flight_count() == 0)
        time.sleep(0.05)
    assert not [r for r in caplog.records if "refused" in r.getMessage()]
    assert wq.stats["work"]["acked"] == 1


def test_per_consumer_concurrency_and_bounded_pool(new_wq):
    lock = threading.Lock()
    running = collections.Counter()
    peak = collections.Counter()
    release = threading.Event()

    def handler_for(name):
        def handle(message):
            with lock:
                running[name] += 1
                running["all"] += 1
                peak[name] = max(peak[name], running[name])
                peak["all"] = max(peak["all"], running["all"])
            release.wait(10)
            with lock:
                running[name] -= 1
                running["all"] -= 1
        return handle

    with new_wq(max_workers=3) as wq:
        wq.consume("a", handler_for("a"), concurrency=2)
        wq.consume("b", handler_for("b"), concurrency=5)
        for i in range(10):
            wq.enqueue("a", i)
            wq.enqueue("b", i)
        assert wait_for(lambda: running["all"] == 3)
        time.sleep(0.2)  # room for a wrong extra delivery to show up
        assert peak["all"] == 3 and peak["a"] <= 2
        workers = [t for t in threading.enumerate() if "workqueue-worker" in t.name]
        assert len(workers) <= 3
        release.set()
        assert wait_for(lambda: wq.pending_count() == 0 and wq.in_flight_count() == 0)
    assert peak["all"] == 3


def test_a_consumer_runs_at_most_its_concurrency(new_wq):
    lock = threading.Lock()
    running = [0, 0]  # now, peak
    release = threading.Event()

    def handle(message):
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1

    with new_wq(max_workers=8) as wq:
        wq.consume("jobs", handle, concurrency=2)
        for i in range(6):
            wq.enqueue("jobs", i)
        assert wait_for(lambda: running[0] == 2)
        time.sleep(0.2)
        assert running[1] == 2 and wq.in_flight_count() == 2 and wq.pending_count() == 4
        release.set()
        assert wait_for(lambda: wq.pending_count() == 0 and wq.in_flight_count() == 0)


def test_remove_consumer(wq):
    got = []
    consumer_id = wq.consume("jobs", lambda m: got.append(m.payload))
    wq.enqueue("jobs", 1)
    assert wait_for(lambda: got == [1])
    assert wq.remove_consumer(consumer_id) is True
    assert wq.remove_consumer(consumer_id) is False
    wq.enqueue("jobs", 2)
    time.sleep(0.1)
    assert got == [1] and wq.pending_count("jobs") == 1
    assert wq.dequeue("jobs", timeout=1.0).payload == 2


def test_close_while_consumers_run_leaves_no_thread(new_wq):
    started = threading.Event()
    wq = new_wq(max_workers=4)

    def slow(message):
        started.set()
        time.sleep(0.05)

    for _ in range(3):
        wq.consume("jobs", slow)
    for i in range(50):
        wq.enqueue("jobs", i)
    assert started.wait(5)
    wq.close()  # no_leaks checks that pumps, workers and the reaper are gone


# -- leases, retries, dead letters ----------------------------------------------------


def test_expired_visibility_timeout_redelivers(wq):
    wq.enqueue("jobs", "x", visibility_timeout=0.1)
    first = wq.dequeue("jobs", timeout=1.0)
    second = wq.dequeue("jobs", timeout=5.0)  # redelivered by the reaper
    assert second is not None and second.id == first.id
    assert second.headers["_wq_attempt"] == 2
    assert wq.ack(first) is False  # the late worker's ack is refused (fencing)
    assert wq.ack(second) is True
    assert wq.stats["work"]["expired"] == 1


def test_touch_extends_the_lease(wq):
    wq.enqueue("jobs", "long", visibility_timeout=0.2)
    message = wq.dequeue("jobs", timeout=1.0)
    for _ in range(6):  # 0.6 s of work, three times the lease
        time.sleep(0.1)
        assert wq.touch(message) is True
    assert wq.dequeue("jobs", timeout=0.1) is None  # never redelivered
    assert wq.ack(message) is True
    assert wq.touch(message) is False


def test_push_handler_touches_while_working(wq):
    calls = []

    def slow(message):
        calls.append(message.headers["_wq_attempt"])
        for _ in range(5):
            time.sleep(0.1)
            wq.touch(message, 0.2)

    wq.consume("jobs", slow)
    wq.enqueue("jobs", 1, visibility_timeout=0.2)
    assert wait_for(lambda: wq.stats["work"].get("acked") == 1)
    assert calls == [1]


@pytest.mark.parametrize("max_retries", [0, 2])
def test_max_retries_means_deliveries_after_the_first(new_wq, max_retries):
    attempts = []
    letters: List[ef.Message] = []
    with new_wq(max_retries=max_retries) as wq:
        def always_fails(message):
            attempts.append(message.headers["_wq_attempt"])
            raise RuntimeError("poison")

        wq.consume("jobs", always_fails)
        wq.consume("jobs.dead_letter", letters.append)
        logging.getLogger("eventforge").disabled = True
        try:
            wq.enqueue("jobs", {"id": 9}, trace="t1")
            assert wait_for(lambda: letters)
        finally:
            logging.getLogger("eventforge").disabled = False
    assert attempts == list(range(1, max_retries + 2))
    letter = letters[0]
    assert letter.topic == "jobs.dead_letter" and letter.payload == {"id": 9}
    assert letter.headers["_wq_reason"] == "max_retries_exceeded"
    assert letter.headers["_wq_attempts"] == max_retries + 1
    assert letter.headers["_wq_original_topic"] == "jobs"
    assert letter.headers["trace"] == "t1"
    assert "poison" in letter.headers["_wq_error"]


def test_nack_requeue_and_no_requeue(wq):
    wq.enqueue("jobs", "a")
    message = wq.dequeue("jobs", timeout=1.0)
    assert wq.nack(message) is True
    again = wq.dequeue("jobs", timeout=1.0)
    assert again.id == message.id and again.headers["_wq_attempt"] == 2
    assert wq.nack(again, requeue=False) is True
    letter = wq.dequeue("jobs.dead_letter", timeout=1.0)
    assert letter.headers["_wq_reason"] == "nack_no_requeue"
    assert letter.headers["_wq_attempts"] == 2
    assert wq.nack(again) is False
    assert wq.store.counts("jobs")["dead"] == 1


def test_expired_lease_after_last_retry_is_dead_lettered(new_wq):
    with new_wq(max_retries=0, reaper_interval=0.05) as wq:
        wq.enqueue("jobs", "stuck", visibility_timeout=0.1)
        wq.dequeue("jobs", timeout=1.0)  # taken and never settled
        letter = wq.dequeue("jobs.dead_letter", timeout=5.0)
        assert letter.headers["_wq_reason"] == "visibility_timeout_exceeded"
        assert wq.in_flight_count("jobs") == 0


def test_retry_delay_with_backoff(new_wq):
    times: List[float] = []
    with new_wq(retry_delay=0.1, retry_backoff=2.0, max_retries=3) as wq:
        def fails_twice(message):
            times.append(time.monotonic())
            if len(times) < 3:
                raise RuntimeError("later")

        wq.consume("jobs", fails_twice)
        logging.getLogger("eventforge").disabled = True
        try:
            wq.enqueue("jobs", 1)
            assert wait_for(lambda: len(times) == 3)
        finally:
            logging.getLogger("eventforge").disabled = False
        assert wq.pending_count("jobs") == 0
    assert times[1] - times[0] >= 0.095
    assert times[2] - times[1] >= 0.195


def test_delayed_retry_counts_as_pending(new_wq):
    with new_wq(retry_delay=5.0) as wq:
        wq.enqueue("jobs", 1)
        wq.nack(wq.dequeue("jobs", timeout=1.0))
        assert wq.pending_count("jobs") == 1
        assert wq.store.counts("jobs")["delayed"] == 1
        assert wq.dequeue("jobs", timeout=0.1) is None


# -- the WorkStore seam ------------------------------------------------------------------


def make_job(payload: Any = None) -> ef.Message:
    return ef.Message("jobs", payload)


def clocked_store(kind: str, directory: Any, clock: Any = time.time) -> ef.WorkStore:
    """A store of ``kind`` on ``clock`` that sweeps whenever asked (no rate limit)."""
    if kind == "memory":
        return ef.MemoryWorkStore(clock=clock)
    return open_store(kind, str(directory), clock=clock, sweep_interval=0.0,
                      synchronous="NORMAL")


@pytest.mark.parametrize("kind", STORE_LEVEL_KINDS)
def test_store_fencing_refuses_stale_tokens(kind, tmp_path):
    clock = FakeClock()
    store = clocked_store(kind, tmp_path, clock)
    store.enqueue("jobs", make_job(1))
    [lease] = store.claim("jobs", "default", 10.0)
    assert lease.attempt == 1
    clock.advance(11)
    [taken_over] = store.sweep(5.0)
    assert taken_over.token != lease.token and taken_over.attempt == 1
    for settle in (store.ack, store.nack, lambda held: store.extend(held, 5),
                   lambda held: store.dead_letter(held, "jobs.dead_letter", make_job())):
        assert settle(lease) is False  # the stale holder changes nothing
    assert store.counts("jobs")["in_flight"] == 1
    assert store.nack(taken_over) is True
    [again] = store.claim("jobs", "default", 10.0)
    assert again.attempt == 2
    store.close()


@pytest.mark.parametrize("kind", STORE_LEVEL_KINDS)
def test_store_sweep_respects_extend_and_counts(kind, tmp_path):
    clock = FakeClock()
    store = clocked_store(kind, tmp_path, clock)
    for i in range(3):
        store.enqueue("jobs", make_job(i))
    leases = store.claim("jobs", "default", 10.0, max_count=5)
    assert [lease.message.payload for lease in leases] == [0, 1, 2]
    clock.advance(8)
    assert store.extend(leases[0], 10.0)
    clock.advance(3)
    expired = store.sweep(30.0)
    assert sorted(lease.job_id for lease in expired) == sorted(held.job_id for held in leases[1:])
    assert store.sweep(30.0) == []  # re-fenced leases are not swept twice
    assert store.dead_letter(expired[0], "jobs.dead_letter", make_job("dl"))
    assert store.counts("jobs") == {"ready": 0, "delayed": 0, "in_flight": 2, "dead": 1}
    assert store.counts("jobs.dead_letter")["ready"] == 1
    assert store.nack(expired[1], delay=5.0)
    assert store.counts("jobs")["delayed"] == 1
    assert store.claim("jobs", "default", 1.0) == []
    clock.advance(5)
    [retry] = store.claim("jobs", "default", 1.0)
    assert retry.attempt == 2
    store.close()


@pytest.mark.parametrize("kind", STORE_LEVEL_KINDS)
def test_store_groups_get_their_own_copy(kind, tmp_path):
    store = clocked_store(kind, tmp_path)
    store.ensure_group("jobs", "a")
    store.ensure_group("jobs", "b")
    store.enqueue("jobs", make_job("x"))
    [a] = store.claim("jobs", "a", 5.0)
    [b] = store.claim("jobs", "b", 5.0)
    assert a.job_id == b.job_id
    assert store.nack(a) and store.ack(b)
    assert store.counts("jobs", "a")["ready"] == 1
    assert store.counts("jobs", "b") == {"ready": 0, "delayed": 0, "in_flight": 0, "dead": 0}
    store.close()


@pytest.mark.parametrize("kind", STORE_LEVEL_KINDS)
def test_store_blocking_claim_wakes_on_enqueue_and_on_wake(kind, tmp_path):
    store = clocked_store(kind, tmp_path)
    got: List[Any] = []
    claimer = threading.Thread(
        target=lambda: got.append(store.claim("jobs", "default", 5.0, wait=10.0)))
    claimer.start()
    time.sleep(0.05)
    store.enqueue("jobs", make_job(1))
    claimer.join(5.0)
    assert [lease.message.payload for lease in got[0]] == [1]
    claimer = threading.Thread(
        target=lambda: got.append(store.claim("jobs", "default", 5.0, wait=None)))
    claimer.start()
    time.sleep(0.05)
    store.wake()
    claimer.join(5.0)
    assert not claimer.is_alive() and got[1] == []
    store.close()
    with pytest.raises(RuntimeError):
        store.enqueue("jobs", make_job())


@pytest.mark.parametrize("kind", STORE_LEVEL_KINDS)
def test_a_store_object_plugs_in(no_leaks, kind, tmp_path):
    clock = FakeClock()
    store = clocked_store(kind, tmp_path, clock)
    with ef.WorkQueue(store=store, reaper_interval=60.0, default_visibility_timeout=10.0) as wq:
        assert wq.store is store
        wq.enqueue("jobs", 1)
        first = wq.dequeue("jobs", timeout=1.0)
        assert wq.reap() == 0
        clock.advance(10.5)
        assert wq.reap() == 1  # deterministic expiry on the injected clock
        second = wq.dequeue("jobs", timeout=1.0)
        assert second.id == first.id and second.headers["_wq_attempt"] == 2
        assert wq.ack(first) is False and wq.ack(second) is True


@pytest.mark.parametrize("kind", STORE_LEVEL_KINDS)
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(
    ["enqueue", "claim", "ack", "nack", "nack_delay", "dead", "extend", "tick", "sweep"]),
    st.integers(0, 5)), max_size=50))
def test_store_never_leases_a_job_twice_and_loses_nothing(kind, ops):
    clock = FakeClock()
    directory = tempfile.mkdtemp()
    store = clocked_store(kind, directory, clock)
    held: List[ef.Lease] = []  # current and stale leases, as workers would keep them
    enqueued = finished = 0
    for op, n in ops:
        if op == "enqueue":
            store.enqueue("jobs", make_job(enqueued))
            enqueued += 1
        elif op == "claim":
            held.extend(store.claim("jobs", "default", 3.0, max_count=n + 1))
        elif op == "tick":
            clock.advance(n)
        elif op == "sweep":
            held.extend(store.sweep(2.0))
        elif held:
            lease = held[n % len(held)]
            if op == "ack":
                finished += store.ack(lease)
            elif op == "nack":
                store.nack(lease)
            elif op == "nack_delay":
                store.nack(lease, delay=float(n))
            elif op == "dead":
                finished += store.dead_letter(lease, "jobs.dead_letter", make_job())
            elif op == "extend":
                store.extend(lease, float(n))
        counts = store.counts("jobs")
        assert counts["ready"] + counts["delayed"] + counts["in_flight"] + finished == enqueued
        # at most one current (accepting) lease per job
        current = collections.Counter()
        for lease in held:
            if store.extend(lease, 3.0):  # extend only succeeds for the current token
                current[lease.job_id] += 1
        assert all(v == 1 for v in current.values())
        assert len(current) == counts["in_flight"]
    store.close()
    shutil.rmtree(directory)


def test_slow_handlers_claim_one_job_at_a_time(new_wq):
    # Prefetch only grows while handlers are quick: a slow consumer never sits
    # on jobs another idle consumer could take.
    peak_in_flight = [0]
    lock = threading.Lock()
    with new_wq() as wq:
        def slow(message):
            with lock:
                peak_in_flight[0] = max(peak_in_flight[0], wq.in_flight_count("jobs"))
            time.sleep(0.01)

        wq.consume("jobs", slow)
        wq.consume("jobs", slow)
        for i in range(20):
            wq.enqueue("jobs", i)
        assert wait_for(lambda: wq.pending_count() == 0 and wq.in_flight_count() == 0)
    assert peak_in_flight[0] <= 2


def test_quick_handlers_prefetch_and_every_job_is_done_once(new_wq):
    lock = threading.Lock()
    seen = collections.Counter()
    with new_wq() as wq:
        def quick(message):
            with lock:
                seen[message.payload] += 1

        wq.consume("jobs", quick, prefetch=64)
        for i in range(500):
            wq.enqueue("jobs", i)
        assert wait_for(lambda: sum(seen.values()) == 500)
        assert wait_for(lambda: wq.in_flight_count() == 0)
        assert wq.stats["work"]["acked"] == 500
    assert set(seen.values()) == {1}


DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "workqueue.md")


def _doc_examples() -> List[str]:
    with open(DOC, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@pytest.mark.parametrize("index", range(len(_doc_examples())))
def test_docs_examples_run_and_print_what_they_promise(index, request):
    code = _doc_examples()[index]
    if "redis://localhost:6379/0" in code:  # the Redis examples run on the test server
        pytest.importorskip("redis")
        code = code.replace("redis://localhost:6379/0", request.getfixturevalue("redis_url"))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(DOC) + "/..")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    # "# TEXT: why" or "# TEXT (why)" (the docs harness's form) promise TEXT
    promised = [re.sub(r"\s+\(.*\)$", "", line.split("# ", 1)[1].split(":")[0].strip())
                for line in code.splitlines() if "print(" in line and "# " in line]
    for text in promised:
        assert text in result.stdout, (text, result.stdout)
