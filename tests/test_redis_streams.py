"""The Redis Streams work store on a real redis-server (issue 12's Redis side).

The in-process WorkQueue tests (tests/test_work_queue.py) also run on this
store ("redis" kind).  Here: opening it (URL, version check, the missing
client), how it uses Redis (hash tags, trimming), and the failure tests:
kill -9 mid-job, processes racing on one stream, a restarting worker, a
stale ack, poison messages, and the broker restarting under a consumer.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Any, List

import pytest

import eventforge as ef

redis = pytest.importorskip("redis")

from _core_helpers import wait_until as wait_for  # noqa: E402
from _wq_helpers import (  # noqa: E402
    HOLDER,
    FakeClock,
    exiting_handler_ends_as_visibility_timeout_exceeded,
    finish,
    killed_worker_s_job_is_redelivered_and_done_once,
    racers_lease_each_job_once,
    read_line,
    spawn,
    stale_ack_is_refused_and_touch_prevents_redelivery,
)

from eventforge_ext.redis import RedisVersionError, RedisWorkQueue, RedisWorkStore  # noqa: E402
from eventforge_ext.redis_streams import (  # noqa: E402
    _Keys,
    check_redis_version,
    parse_redis_version,
)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=30)


@pytest.fixture
def url(redis_server):
    """A private redis-server (restartable) for one test."""
    return redis_server.url


# -- opening -------------------------------------------------------------------------


def test_a_redis_url_opens_the_streams_store_and_the_classes_import_both_ways(url, no_leaks):
    from eventforge_ext import redis_streams

    assert RedisWorkStore is redis_streams.RedisWorkStore
    assert RedisWorkQueue is redis_streams.RedisWorkQueue
    with ef.WorkQueue(store=url) as wq:
        assert isinstance(wq.store, RedisWorkStore)
        wq.enqueue("jobs", {"n": 1})
    with RedisWorkQueue(url, max_retries=1) as wq:  # another process's view: still there
        assert isinstance(wq, ef.WorkQueue) and wq.max_retries == 1
        job = wq.dequeue("jobs", timeout=2.0)
        assert job.payload == {"n": 1} and wq.ack(job)
        assert wq.pending_count() == 0 and wq.in_flight_count() == 0


def test_the_version_check_on_real_info_and_on_an_older_server():
    assert parse_redis_version("7.0.15") == (7, 0, 15)
    assert parse_redis_version("6.2") == (6, 2, 0)
    assert parse_redis_version(7.2) == (7, 2, 0)  # redis-py reads "7.2" as a float
    with pytest.raises(ValueError):
        parse_redis_version("unknown")
    with pytest.raises(RedisVersionError, match=r"Redis >= 6\.2 \(XAUTOCLAIM\).*6\.0\.16"):
        check_redis_version({"redis_version": "6.0.16"}, "old:6379")
    with pytest.raises(RedisVersionError, match="6.2"):
        check_redis_version({"redis_version": "5.0.7"})
    assert isinstance(RedisVersionError("x"), ef.StoreError)
    assert isinstance(RedisVersionError("x"), RuntimeError)


def test_the_version_check_passes_on_the_real_server(redis_url):
    client = redis.Redis.from_url(redis_url)
    try:
        info = client.info("server")
    finally:
        client.close()
    assert check_redis_version(info) >= (6, 2, 0)
    store = RedisWorkStore(redis_url, prefix="version-check")
    assert store.server_version == parse_redis_version(info["redis_version"])
    store.close()


def test_an_unreachable_server_is_a_connection_error():
    from _servers import free_port

    with pytest.raises(ef.ConnectionLostError, match="Redis at 127.0.0.1"):
        RedisWorkStore(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1.0)


def test_a_server_refusing_the_store_is_a_store_error_and_one_cli_line(url, tmp_path, no_leaks):
    from _worker_helpers import one_error_line, run_cli

    no_such_db = url.rsplit("/", 1)[0] + "/99"   # redis-server has 16 databases
    with pytest.raises(ef.StoreError, match="Redis at .* refused the store: DB index"):
        ef.WorkQueue(store=no_such_db)
    module = tmp_path / "jobs_module.py"
    module.write_text("JOBS = {'images.resize': print}\n")
    result = run_cli("worker", "--import", str(module), "--queue", no_such_db)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert line.startswith(f"eventforge worker: error: cannot open the work queue {no_such_db!r}")


def test_without_the_client_the_error_names_the_extra():
    code = """
    import sys
    sys.modules["redis"] = None  # as if redis-py were not installed
    import eventforge as ef
    try:
        ef.WorkQueue(store="redis://127.0.0.1:1/0")
    except ImportError as exc:
        print(exc)
    """
    out = finish(spawn(code))
    assert "eventforge[redis]" in out


# -- how it uses Redis -----------------------------------------------------------------


def test_every_key_of_a_topic_and_its_dead_letters_is_in_one_cluster_slot(url, no_leaks):
    from redis.crc import key_slot

    with ef.WorkQueue(store=RedisWorkStore(url, prefix="app"), max_retries=0) as wq:
        wq.consume("img.resize", lambda job: 1 / 0, consumer_group="g:{x}")
        logging.getLogger("eventforge").disabled = True
        try:
            wq.enqueue("img.resize", 1)
            letter = wq.dequeue("img.resize.dead_letter", timeout=10.0)
        finally:
            logging.getLogger("eventforge").disabled = False
        assert letter is not None and wq.ack(letter)
        client = redis.Redis.from_url(url)
        try:
            keys = [key for key in client.keys("app:*") if key != b"app:topics"]
        finally:
            client.close()
    assert len(keys) >= 5  # stream, counters, groups, ... of both topics
    assert {key_slot(key) for key in keys} == {key_slot(b"{img.resize}")}
    assert _Keys("app", "a{b}:c").stream == "app:{a%7Bb%7D%3Ac}:a%7Bb%7D%3Ac:s"


def test_trimming_never_drops_an_entry_still_needed(url):
    clock = FakeClock()
    store = RedisWorkStore(url, clock=clock, trim_interval=3600)
    client = redis.Redis.from_url(url)
    try:
        stream = _Keys(store.prefix, "jobs").stream
        store.ensure_group("jobs", "a")
        store.ensure_group("jobs", "b")
        for i in range(10):
            store.enqueue("jobs", ef.Message("jobs", i))
        a = store.claim("jobs", "a", 60.0, max_count=6)
        assert [lease.message.payload for lease in a] == [0, 1, 2, 3, 4, 5]
        assert store.trim("jobs") == 0  # b has read nothing yet
        assert all(store.ack_all(a[:3]))
        assert store.nack(a[3], delay=60.0)  # waits for its retry
        b = store.claim("jobs", "b", 60.0, max_count=10)
        assert all(store.ack_all(b))
        # needed: a's retry (3), a's leases (4, 5), what a has not read (6-9)
        assert store.trim("jobs") == 3
        assert client.xlen(stream) == 7
        assert store.trim("jobs") == 0
        assert all(store.ack_all(a[4:]))
        clock.advance(61)
        [retry] = store.claim("jobs", "a", 60.0)
        assert retry.message.payload == 3 and retry.attempt == 2
        rest = store.claim("jobs", "a", 60.0, max_count=10)
        assert [lease.message.payload for lease in rest] == [6, 7, 8, 9]
        assert store.ack(retry) and all(store.ack_all(rest))
        assert store.counts("jobs") == {"ready": 0, "delayed": 0, "in_flight": 0, "dead": 0}
        store.trim("jobs")
        assert client.xlen(stream) <= 1  # at most the last entry read, kept as a marker
    finally:
        client.close()
        store.close()


def test_the_attempt_is_the_delivery_count_and_extend_is_not_a_delivery(url):
    store = RedisWorkStore(url)
    client = redis.Redis.from_url(url)
    try:
        stream = _Keys(store.prefix, "jobs").stream
        store.enqueue("jobs", ef.Message("jobs", "x"))

        def pending():
            [entry] = client.xpending_range(stream, "default", "-", "+", 10)
            return entry["consumer"].decode(), entry["times_delivered"]

        [first] = store.claim("jobs", "default", 30.0)
        assert pending() == (store.consumer, 1) and first.attempt == 1
        assert store.extend(first, 30.0) and pending() == (store.consumer, 1)  # JUSTID
        assert store.nack(first)
        assert client.xpending(stream, "default")["pending"] == 0  # waits in the retry set
        [second] = store.claim("jobs", "default", 30.0)
        assert pending() == (store.consumer, 2) and second.attempt == 2
        assert store.nack(second, count_attempt=False)  # released unseen: not an attempt
        [third] = store.claim("jobs", "default", 30.0)
        assert pending() == (store.consumer, 2) and third.attempt == 2
        for settle in (store.ack, store.nack, lambda held: store.extend(held, 5.0)):
            assert settle(second) is False  # a settled lease stays settled
        assert store.ack(third) and client.xpending(stream, "default")["pending"] == 0
    finally:
        client.close()
        store.close()


def test_extend_is_fenced_and_keeps_the_attempt(url):
    store = RedisWorkStore(url)
    other = RedisWorkStore(url)  # another process
    try:
        store.enqueue("jobs", ef.Message("jobs", "x"))
        other.ensure_group("jobs", "default")  # it works on the topic too, so it sweeps it
        [lease] = store.claim("jobs", "default", 0.2)
        assert lease.handle[1] == store.consumer != other.consumer
        for _ in range(4):  # 0.4 s: twice the lease, kept alive
            time.sleep(0.1)
            assert store.extend(lease, 0.2)
            assert other.sweep(5.0) == []
        time.sleep(0.3)
        [taken] = other.sweep(5.0)  # not extended any more: the other process takes over
        assert taken.attempt == 1 and taken.token != lease.token
        assert not store.extend(lease, 5.0) and not store.ack(lease)
        assert other.nack(taken)
        [again] = other.claim("jobs", "default", 5.0)
        assert again.attempt == 2 and other.ack(again)
    finally:
        store.close()
        other.close()


# -- 1. kill -9 mid-job --------------------------------------------------------------------



def test_worker_killed_mid_job_the_job_is_redelivered_and_done_once(url, no_leaks):
    killed_worker_s_job_is_redelivered_and_done_once(url)



# -- 2. N processes racing on one stream ---------------------------------------------------



def test_processes_racing_on_one_stream_never_lease_a_job_twice(url, tmp_path):
    store = RedisWorkStore(url)
    store.ensure_group("jobs", "default")
    ids = [store.enqueue("jobs", ef.Message("jobs", i)) for i in range(400)]
    go = str(tmp_path / "go")
    racers_lease_each_job_once(
        store, ids,
        "from eventforge_ext.redis import RedisWorkStore; store = RedisWorkStore(sys.argv[1])",
        [url], go)
    store.close()


# -- 3. a restarting worker steals no live lease -------------------------------------------


RESTARTER = """
import sys, time, eventforge as ef
wq = ef.WorkQueue(store=sys.argv[1], reaper_interval=0.05)
got = []
wq.consume("jobs", lambda job: got.append(job.payload))
time.sleep(1.5)
wq.close()
print(got, wq.stats["work"]["expired"], flush=True)
"""


def test_restarting_worker_steals_no_live_lease(url, no_leaks):
    with ef.WorkQueue(store=url) as wq:
        wq.enqueue("jobs", "live")
        holder = spawn(HOLDER, url, stdin=subprocess.PIPE)
        try:
            assert read_line(holder) == "holding live"
            wq.enqueue("jobs", "fresh")
            # a worker started, stopped and started again: it takes the fresh job only
            assert finish(spawn(RESTARTER, url)).strip() == "['fresh'] 0"
            assert finish(spawn(RESTARTER, url)).strip() == "[] 0"
            assert wq.in_flight_count("jobs") == 1
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert read_line(holder) == "acked True"
        finally:
            stop(holder)
        assert wq.in_flight_count("jobs") == 0 and wq.pending_count("jobs") == 0


# -- 4. a job outliving its lease ----------------------------------------------------------


def test_stale_ack_is_refused_and_reported_and_touch_prevents_redelivery(url, no_leaks, caplog):
    stale_ack_is_refused_and_touch_prevents_redelivery(url, caplog)



def test_a_stale_ack_from_another_process_is_refused(url):
    late = RedisWorkStore(url)
    with ef.WorkQueue(store=url, reaper_interval=0.05) as wq:
        wq.enqueue("jobs", "x", visibility_timeout=0.2)
        [lease] = late.claim("jobs", "default", 0.2)  # a worker in another process
        job = wq.dequeue("jobs", timeout=5.0)  # expired, swept, redelivered here
        assert job.id == lease.job_id and job.headers["_wq_attempt"] == 2
        assert late.ack(lease) is False and late.nack(lease) is False
        assert late.dead_letter(lease, "jobs.dead_letter", ef.Message("jobs.dead_letter")) is False
        assert wq.in_flight_count("jobs") == 1 and wq.ack(job)
    late.close()


# -- 8. poison messages --------------------------------------------------------------------


def test_poison_that_always_raises_ends_as_max_retries_exceeded(url, no_leaks):
    attempts: List[int] = []
    with ef.WorkQueue(store=url, max_retries=2) as wq:
        def always_fails(job):
            attempts.append(job.headers["_wq_attempt"])
            raise RuntimeError("poison")

        wq.consume("jobs", always_fails)
        logging.getLogger("eventforge").disabled = True
        try:
            wq.enqueue("jobs", "poison")
            letter = wq.dequeue("jobs.dead_letter", timeout=10.0)
        finally:
            logging.getLogger("eventforge").disabled = False
        assert letter.headers["_wq_reason"] == "max_retries_exceeded"
        assert letter.headers["_wq_attempts"] == 3 and "poison" in letter.headers["_wq_error"]
        assert wq.ack(letter)
    assert attempts == [1, 2, 3]


def test_poison_that_exits_the_process_ends_as_visibility_timeout_exceeded(url, no_leaks):
    exiting_handler_ends_as_visibility_timeout_exceeded(url)



def test_poison_nacked_without_requeue_ends_as_nack_no_requeue(url, no_leaks):
    with ef.WorkQueue(store=url) as wq:
        wq.consume("jobs", lambda job: wq.nack(job, requeue=False))
        wq.enqueue("jobs", "poison")
        letter = wq.dequeue("jobs.dead_letter", timeout=10.0)
        assert letter.headers["_wq_reason"] == "nack_no_requeue"
        assert letter.headers["_wq_attempts"] == 1 and wq.ack(letter)
        assert wq.store.counts("jobs")["dead"] == 1


# -- the broker restarts under a consumer ----------------------------------------------------


def test_consume_loop_survives_a_broker_restart(redis_server, no_leaks):
    done: List[Any] = []
    with ef.WorkQueue(store=redis_server.url) as wq:
        wq.consume("jobs", lambda job: done.append(job.payload))
        wq.enqueue("jobs", "before")
        assert wait_for(lambda: done == ["before"])
        logging.getLogger("eventforge").disabled = True  # the outage is logged, loudly
        try:
            redis_server.restart(down_for=0.5)  # no persistence: the groups are gone too
            assert wait_for(lambda: _enqueue_when_up(wq, "after"), timeout=20)
            assert wait_for(lambda: "after" in done, timeout=20)
        finally:
            logging.getLogger("eventforge").disabled = False
        assert done == ["before", "after"]


def _enqueue_when_up(wq: ef.WorkQueue, payload: Any) -> bool:
    try:
        wq.enqueue("jobs", payload)
    except ef.ConnectionLostError:
        time.sleep(0.1)
        return False
    return True


# -- the worker command on Redis ---------------------------------------------------------------

JOBS_MODULE = """
import sys, threading

_lock = threading.Lock()  # jobs run 4 at a time: keep each line whole

def resize(job):
    with _lock:
        sys.stdout.write(f"resized {job.payload['name']} {job.headers['_wq_attempt']}\\n")
        sys.stdout.flush()

JOBS = {"images.resize": resize}
"""


def test_worker_command_consumes_a_redis_queue(url, tmp_path):
    import re

    from _worker_helpers import Proc

    module = tmp_path / "image_jobs.py"
    module.write_text(JOBS_MODULE)
    worker = Proc([sys.executable, "-m", "eventforge", "worker", "--import", str(module),
                   "--queue", url, "--log-level", "WARNING"])
    try:
        worker.wait_for(re.compile(r"ready: jobs of images\.resize from redis://"), timeout=60)
        with ef.WorkQueue(store=url) as wq:
            for name in ("a.png", "b.png"):
                wq.enqueue("images.resize", {"name": name})
            assert wait_for(lambda: wq.pending_count() == 0 and wq.in_flight_count() == 0, 60)
        worker.wait_for(re.compile(r"^resized b.png 1"), timeout=60)
        worker.signal()
        assert worker.wait(60) == 0, (worker.stdout, worker.stderr)
        assert "eventforge worker stopped: 2 jobs done" in worker.stdout, worker.stdout
    finally:
        worker.close()


def test_a_forked_child_is_another_consumer(url):
    named = RedisWorkStore(url, consumer="w1")
    default = RedisWorkStore(url)
    try:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report its consumer names and leave at once
            os.write(write_end, f"{named.consumer} {default.consumer}".encode())
            os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end) as reader:
            child_named, child_default = reader.read().split()
        assert named.consumer == "w1" and child_named == f"w1-{pid}"
        assert child_default != default.consumer and str(pid) in child_default
    finally:
        named.close()
        default.close()
