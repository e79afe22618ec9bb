"""Helpers shared by the work queue test files (plain imports, not a conftest)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Iterator, List


class FakeClock:
    """A clock the test moves by hand (lease deadlines without sleeping)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- child processes (the durable store failure tests, SQLite and Redis) -----------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn(code: str, *args: str, stdin: Any = None) -> subprocess.Popen:
    """Start ``python -c code args...`` with this checkout importable."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def read_line(process: subprocess.Popen, timeout: float = 30.0) -> str:
    """The next stdout line of ``process`` (fails the test on timeout or exit)."""
    result: List[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()))
    reader.start()
    reader.join(timeout)
    assert result and result[0], f"no line from the child; stderr: {stderr_of(process)}"
    return result[0].strip()


def stderr_of(process: subprocess.Popen) -> str:
    if process.poll() is None:
        return "(still running)"
    return process.stderr.read()[-2000:]


@contextlib.contextmanager
def child(code: str, *args: str, expect: Any = ()) -> Iterator[subprocess.Popen]:
    """Run a child process, read the ``expect`` lines, and always reap it."""
    process = spawn(code, *args)
    try:
        for line in expect:
            assert read_line(process) == line
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def finish(process: subprocess.Popen, timeout: float = 60.0) -> str:
    """Wait for ``process``; its stdout (fails the test on a non-zero exit)."""
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-2000:]
    return out


# Both scripts take as argv[1] whatever ``WorkQueue(store=...)`` takes: a file
# path or a redis:// URL.  WORKER's argv: store, topic, mode ("hang": the
# handler never returns; "exit": it calls os._exit(3)).
WORKER = """
import sys, time, eventforge as ef
db, topic, mode = sys.argv[1], sys.argv[2], sys.argv[3]
wq = ef.WorkQueue(store=db, default_visibility_timeout=1.0, reaper_interval=0.2)
def handler(job):
    print("started", job.payload, job.headers["_wq_attempt"], flush=True)
    if mode == "hang":
        time.sleep(3600)
    if mode == "exit":
        import os
        os._exit(3)
wq.consume(topic, handler)
print("ready", flush=True)
time.sleep(3600)
"""

# Holds one job of "jobs" until a line arrives on stdin, then acks it.
HOLDER = """
import sys, time, eventforge as ef
db = sys.argv[1]
wq = ef.WorkQueue(store=db, default_visibility_timeout=30.0)
job = wq.dequeue("jobs", timeout=10)
print("holding", job.payload, flush=True)
sys.stdin.readline()
print("acked", wq.ack(job), flush=True)
wq.close()
"""


# -- failure scenarios both durable stores must pass -------------------------------------
# ``store`` is what ``WorkQueue(store=...)`` takes: a path, a redis:// URL or a
# store object (the stale-ack scenario wants one that sweeps on every call).


def killed_worker_s_job_is_redelivered_and_done_once(store: Any) -> None:
    """Issue 12 #1: kill -9 mid-job; the job comes back after its lease, done once."""
    import signal

    from _core_helpers import wait_until

    import eventforge as ef

    with ef.WorkQueue(store=store, default_visibility_timeout=1.0, reaper_interval=0.2) as wq:
        wq.enqueue("jobs", "resize cat.png")
        with child(WORKER, store, "jobs", "hang",
                   expect=["ready", "started resize cat.png 1"]) as victim:
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
        done: List[Any] = []
        wq.consume("jobs", lambda job: done.append((job.payload, job.headers["_wq_attempt"])))
        assert wait_until(lambda: done)  # after the lease (1 s) and a sweep
        assert wait_until(lambda: wq.in_flight_count() == 0 and wq.pending_count() == 0)
        time.sleep(0.3)
        assert done == [("resize cat.png", 2)]
        assert wq.store.counts()["dead"] == 0


def stale_ack_is_refused_and_touch_prevents_redelivery(store: Any, caplog: Any) -> None:
    """Issue 12 #4: the late ack is refused and reported; touching keeps the lease."""
    import logging

    import eventforge as ef

    with ef.WorkQueue(store=store, reaper_interval=0.05) as wq:
        wq.enqueue("jobs", "slow", visibility_timeout=0.3)
        first = wq.dequeue("jobs", timeout=1.0)
        second = wq.dequeue("jobs", timeout=5.0)  # the lease ran out: someone else has it
        assert second.id == first.id and second.headers["_wq_attempt"] == 2
        with caplog.at_level(logging.WARNING, logger="eventforge"):
            assert wq.ack(first) is False
        assert any("refused" in r.getMessage() for r in caplog.records)
        assert wq.stats["work"]["stale"] == 1
        assert wq.in_flight_count("jobs") == 1  # the late ack did not delete the job
        for _ in range(8):  # 0.8 s, more than twice the lease, kept alive
            time.sleep(0.1)
            assert wq.touch(second)
        assert wq.stats["work"]["expired"] == 1
        assert wq.ack(second) is True


def exiting_handler_ends_as_visibility_timeout_exceeded(store: Any) -> None:
    """Issue 12 #8: a handler calling os._exit() is dead-lettered when its lease runs out."""
    import eventforge as ef

    with ef.WorkQueue(store=store, max_retries=0, default_visibility_timeout=1.0,
                      reaper_interval=0.2) as wq:
        wq.enqueue("jobs", "poison")
        with child(WORKER, store, "jobs", "exit", expect=["ready", "started poison 1"]) as worker:
            assert worker.wait(10) == 3
        letter = wq.dequeue("jobs.dead_letter", timeout=10.0)
        assert letter is not None and letter.payload == "poison"
        assert letter.headers["_wq_reason"] == "visibility_timeout_exceeded"
        assert wq.ack(letter)


# -- 2. processes racing on one store --------------------------------------------------------

_RACER = """
import json, os, random, sys, time
import eventforge as ef
{open_store}
print("ready", flush=True)
while not os.path.exists(sys.argv[-1]):  # all racers start together
    time.sleep(0.001)
claimed = []
idle_since = time.monotonic()
while time.monotonic() - idle_since < 1.0:
    leases = store.claim("jobs", "default", 60.0, max_count=random.randint(1, 3))
    if not leases:
        time.sleep(0.005)
        continue
    idle_since = time.monotonic()
    for lease in leases:
        claimed.append([lease.job_id, lease.token, lease.attempt])
    assert all(store.ack_all(leases))
    time.sleep(0.002)  # the work: without it one racer can hold the lock throughout
store.close()
print(json.dumps(claimed))
"""


def racers_lease_each_job_once(store: Any, ids: List[str], open_store: str, args: List[str],
                               go: str, racers: int = 4) -> None:
    """``racers`` processes claim and ack the jobs ``ids`` of ``store`` at the same time.

    ``open_store`` is the line of code with which each child sets ``store``
    (it may read ``sys.argv``); ``go`` is a path created to start them together.
    Every job must be leased exactly once, at its first attempt.
    """
    import json

    processes = [spawn(_RACER.format(open_store=open_store), *args, go) for _ in range(racers)]
    for process in processes:
        assert read_line(process) == "ready"
    open(go, "w").close()
    results = [json.loads(finish(process)) for process in processes]
    claimed = [job_id for result in results for job_id, _, _ in result]
    assert sorted(claimed) == sorted(ids)  # every job once: never two leases at a time
    assert all(attempt == 1 for result in results for _, _, attempt in result)
    assert sum(1 for result in results if result) >= 2  # they really raced
    assert store.counts() == {"ready": 0, "delayed": 0, "in_flight": 0, "dead": 0}
