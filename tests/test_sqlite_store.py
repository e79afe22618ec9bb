"""The SQLite work store under failure: real files, real processes (issue 12's failure tests).

The in-process WorkQueue tests (tests/test_work_queue.py) also run on this
store; here are the crashes, races, locks, full disks and clock jumps.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any, List

import pytest
from _core_helpers import wait_until as wait_for
from _wq_helpers import (
    HOLDER,
    ROOT,
    FakeClock,
    child,
    exiting_handler_ends_as_visibility_timeout_exceeded,
    finish,
    killed_worker_s_job_is_redelivered_and_done_once,
    racers_lease_each_job_once,
    read_line,
    spawn,
    stale_ack_is_refused_and_touch_prevents_redelivery,
)

import eventforge as ef


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "jobs.db")


# -- opening -------------------------------------------------------------------------


def test_import_does_not_import_sqlite3():
    code = "import sys, eventforge; print('sqlite3' in sys.modules)"
    assert finish(spawn(code)).strip() == "False"


def test_a_path_opens_sqlite_and_a_redis_url_names_the_missing_adapter(db, no_leaks):
    with ef.WorkQueue(store=db) as wq:
        assert isinstance(wq.store, ef.SQLiteWorkStore)
        wq.enqueue("jobs", {"n": 1})
    with ef.WorkQueue(store=db) as wq:  # reopened: the job is still there
        job = wq.dequeue("jobs", timeout=1.0)
        assert job.payload == {"n": 1}
        assert wq.ack(job)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    try:
        import eventforge_ext.redis as adapter
        has_adapter = hasattr(adapter, "RedisWorkStore")
    except ImportError:
        has_adapter = False
    if not has_adapter:
        with pytest.raises(ImportError, match="RedisWorkStore"):
            ef.WorkQueue(store="redis://127.0.0.1:6379/0")


def test_options_are_checked_and_synchronous_is_applied(db):
    with pytest.raises(ValueError, match="synchronous"):
        ef.SQLiteWorkStore(db, synchronous="OFF")
    for mode, level in (("FULL", 2), ("normal", 1)):
        store = ef.SQLiteWorkStore(db, synchronous=mode)
        assert store.debug_execute("PRAGMA synchronous")[0][0] == level
        store.close()


def test_unserializable_payload_is_refused_before_any_write(db):
    store = ef.SQLiteWorkStore(db)
    with pytest.raises(ef.SerializationError):
        store.enqueue("jobs", ef.Message("jobs", object()))
    assert store.counts("jobs")["ready"] == 0
    store.close()


# -- 1. kill -9 mid-job ------------------------------------------------------------------------



def test_worker_killed_mid_job_the_job_is_redelivered_and_done_once(db, no_leaks):
    killed_worker_s_job_is_redelivered_and_done_once(db)



# -- 2. N processes racing on one file ---------------------------------------------------------



@pytest.mark.parametrize("use_returning", [True, False], ids=["returning", "select-update"])
def test_processes_racing_never_lease_a_job_twice(db, use_returning):
    if use_returning and sqlite3.sqlite_version_info < (3, 35, 0):
        pytest.skip("this SQLite has no RETURNING")
    store = ef.SQLiteWorkStore(db, synchronous="NORMAL", use_returning=use_returning)
    ids = [store.enqueue("jobs", ef.Message("jobs", i)) for i in range(400)]
    racers_lease_each_job_once(
        store, ids,
        'store = ef.SQLiteWorkStore(sys.argv[1], use_returning=sys.argv[2] == "1", '
        'synchronous="NORMAL")',
        [db, "1" if use_returning else "0"], db + ".go")
    store.close()


# -- 3. a restarting worker steals no live lease -----------------------------------------------



def test_restarted_worker_steals_no_live_lease(db, no_leaks):
    store = ef.SQLiteWorkStore(db)
    store.enqueue("jobs", ef.Message("jobs", "live"))
    store.close()
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, db], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        assert read_line(holder) == "holding live"
        # A worker (re)starting on the same file, sweeping eagerly, gets nothing.
        with ef.WorkQueue(store=ef.SQLiteWorkStore(db, sweep_interval=0.0),
                          reaper_interval=0.05) as restarted:
            assert restarted.dequeue("jobs", timeout=1.5) is None
            assert restarted.in_flight_count("jobs") == 1
            assert restarted.stats["work"]["expired"] == 0
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert read_line(holder) == "acked True"
    finally:
        holder.communicate(timeout=30)


# -- 4. a job outliving its lease --------------------------------------------------------------


def test_stale_ack_is_refused_and_reported_and_touch_prevents_redelivery(db, no_leaks, caplog):
    stale_ack_is_refused_and_touch_prevents_redelivery(
        ef.SQLiteWorkStore(db, sweep_interval=0.0), caplog)



# -- 5. the clock jumps ------------------------------------------------------------------------


def test_clock_jumping_back_strands_nothing(db):
    clock = FakeClock()
    store = ef.SQLiteWorkStore(db, clock=clock, sweep_interval=0.0)
    for i in range(3):
        store.enqueue("jobs", ef.Message("jobs", i))
    leased = store.claim("jobs", "default", 10.0, max_count=2)
    [delayed] = store.claim("jobs", "default", 10.0)
    assert store.nack(delayed, delay=5.0)
    clock.advance(-3600)  # leases now look an hour longer, the delay an hour later
    assert store.sweep(30.0) == []  # clamps the deadlines back to their lengths
    clock.advance(11)
    expired = store.sweep(30.0)
    assert sorted(lease.job_id for lease in expired) == sorted(held.job_id for held in leased)
    assert [lease.message.payload for lease in store.claim("jobs", "default", 10.0)] == [2]
    store.close()


def test_clock_jumping_forward_makes_at_most_one_duplicate_per_lease(db):
    clock = FakeClock()
    store = ef.SQLiteWorkStore(db, clock=clock, sweep_interval=0.0)
    for i in range(5):
        store.enqueue("jobs", ef.Message("jobs", i))
    leases = store.claim("jobs", "default", 30.0, max_count=5)
    clock.advance(3600)
    taken_over = store.sweep(30.0)
    assert len(taken_over) == 5 and store.sweep(30.0) == []  # each lease once
    assert not any(store.ack(lease) for lease in leases)  # the late worker is fenced off
    for lease in taken_over:
        assert store.nack(lease)
    again = store.claim("jobs", "default", 30.0, max_count=10)
    assert len(again) == 5 and {lease.attempt for lease in again} == {2}
    assert all(store.ack_all(again))
    store.close()


# -- 6. locked past the busy timeout -----------------------------------------------------------


def lock_database(db: str, seconds: float) -> threading.Thread:
    """Hold the write lock from another connection for ``seconds``."""
    locked = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(5)
    return thread


def test_locked_database_raises_a_typed_error_and_the_consumer_survives(db, no_leaks):
    store = ef.SQLiteWorkStore(db, busy_timeout=0.05)
    done = threading.Event()
    with ef.WorkQueue(store=store) as wq:
        wq.consume("jobs", lambda job: done.set())
        time.sleep(0.1)
        holder = lock_database(db, 1.5)
        start = time.monotonic()
        logging.getLogger("eventforge").disabled = True  # the consumer logs its retries
        try:
            with pytest.raises(ef.StoreBusyError, match="locked") as caught:
                wq.enqueue("jobs", 1)
            assert isinstance(caught.value, TimeoutError)
            assert time.monotonic() - start < 1.4  # gave up: no endless retry
            holder.join()
            wq.enqueue("jobs", 2)  # the lock is gone: the consume loop picks it up
            assert done.wait(10)
        finally:
            logging.getLogger("eventforge").disabled = False


# -- 7. disk full ------------------------------------------------------------------------------


def test_full_database_raises_a_clear_error_without_retries_or_open_transaction(db):
    store = ef.SQLiteWorkStore(db)
    store.enqueue("jobs", ef.Message("jobs", "before"))
    pages = store.debug_execute("PRAGMA page_count")[0][0]
    store.debug_execute(f"PRAGMA max_page_count = {pages + 2}")
    start = time.monotonic()
    with pytest.raises(ef.StoreFullError, match="full"):
        for _ in range(50):
            store.enqueue("jobs", ef.Message("jobs", "x" * 20_000))
    assert time.monotonic() - start < 5.0
    store.debug_execute("BEGIN")  # fails inside a transaction: none was left open
    store.debug_execute("ROLLBACK")
    # What was committed is intact and the store keeps working within its room.
    [lease] = store.claim("jobs", "default", 30.0)
    assert lease.message.payload == "before"
    assert store.ack(lease)
    store.close()


# -- 8. poison messages ------------------------------------------------------------------------


def test_handler_that_exits_the_process_ends_as_visibility_timeout_exceeded(db, no_leaks):
    exiting_handler_ends_as_visibility_timeout_exceeded(db)



# -- 9. a committed enqueue survives SIGKILL ---------------------------------------------------

ENQUEUER = """
import sys, time, eventforge as ef
wq = ef.WorkQueue(store=sys.argv[1])
for i in range(20):
    wq.enqueue("jobs", i)
print("committed", flush=True)
time.sleep(3600)
"""


def test_committed_enqueue_survives_sigkill(db):
    with child(ENQUEUER, db, expect=["committed"]) as producer:
        producer.send_signal(signal.SIGKILL)
        producer.wait(10)
    store = ef.SQLiteWorkStore(db)
    assert store.counts("jobs")["ready"] == 20
    leases = store.claim("jobs", "default", 30.0, max_count=50)
    assert [lease.message.payload for lease in leases] == list(range(20))
    store.close()


# -- 10. fork after opening, constant readers, a bounded WAL -----------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_after_opening_with_constant_readers(db):
    limit = 256 * 1024
    store = ef.SQLiteWorkStore(db, synchronous="NORMAL", wal_size_limit=limit,
                               sweep_interval=0.0)
    store.enqueue("jobs", ef.Message("jobs", "from the parent"))
    pid = os.fork()
    if pid == 0:  # the child: same store object, so its connection must be reopened
        code = 1
        try:
            for _ in range(300):
                store.enqueue("jobs", ef.Message("jobs", "x" * 2000))
                for lease in store.claim("jobs", "default", 30.0, max_count=2):
                    store.ack(lease)
            code = 0
        finally:
            os._exit(code)
    stop = threading.Event()
    problems: List[BaseException] = []
    wal_sizes: List[int] = []

    def read_constantly() -> None:
        reader = ef.SQLiteWorkStore(db)
        try:
            while not stop.is_set():
                reader.counts()
                try:
                    wal_sizes.append(os.path.getsize(db + "-wal"))
                except OSError:
                    pass
        except BaseException as exc:  # pragma: no cover - reported below
            problems.append(exc)
        finally:
            reader.close()

    readers = [threading.Thread(target=read_constantly) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        while True:  # the parent keeps using its own connection meanwhile
            store.counts()
            store.sweep(30.0)  # truncates the WAL if it grew past the limit
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        assert os.WEXITSTATUS(status) == 0
        # With the readers still going, a sweep gets the WAL back under the limit.
        assert wait_for(lambda: store.sweep(30.0) == [] and os.path.getsize(db + "-wal") <= limit)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert not problems
    # Checkpoints run all along (SQLite's at the limit, ours at each sweep); readers
    # can delay them, so the peak is some multiple of the limit, never the whole log.
    assert max(wal_sizes) < 64 * limit
    counts = store.counts("jobs")
    assert counts["ready"] + counts["in_flight"] <= 301
    assert store.debug_execute("PRAGMA integrity_check")[0][0] == "ok"
    store.close()


# -- pickup across connections ------------------------------------------------------------------


def test_idle_claims_see_another_connection_s_job_promptly(db, no_leaks):
    # Several idle claimers in this process (one of them polls PRAGMA
    # data_version for all); another connection, as another process would,
    # enqueues two jobs.  Design: within ~50 ms; asserted with generous slack.
    waiting = ef.SQLiteWorkStore(db)
    other = ef.SQLiteWorkStore(db)
    got: List[Any] = []
    lock = threading.Lock()

    def claim() -> None:
        leases = waiting.claim("jobs", "default", 30.0, wait=10.0)
        with lock:
            got.append((time.monotonic(), leases))

    claimers = [threading.Thread(target=claim) for _ in range(3)]
    for claimer in claimers:
        claimer.start()
    time.sleep(0.5)  # long enough for the polling to back off fully
    sent = time.monotonic()
    other.enqueue("jobs", ef.Message("jobs", 1))
    other.enqueue("jobs", ef.Message("jobs", 2))
    assert wait_for(lambda: sum(len(leases) for _, leases in got) == 2, 5.0)
    first = min(at for at, leases in got if leases)
    assert first - sent < 1.0
    waiting.wake()  # the claimer left without a job returns at once
    for claimer in claimers:
        claimer.join(5.0)
    assert not any(claimer.is_alive() for claimer in claimers)
    waiting.close()
    other.close()


def test_a_path_sqlite_cannot_open_raises_store_error_naming_it(tmp_path, no_leaks):
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("these are notes, not an SQLite database\n" * 20)
    for path in (str(tmp_path),                          # a directory
                 str(tmp_path / "no" / "such" / "jobs.db"),  # a missing parent directory
                 str(not_a_db)):                         # a file of another kind
        with pytest.raises(ef.StoreError) as caught:
            ef.WorkQueue(store=path)
        assert repr(path) in str(caught.value)
        assert not isinstance(caught.value, sqlite3.Error)
    assert not_a_db.read_text().startswith("these are notes")   # left as it was
