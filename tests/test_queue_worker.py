"""`eventforge worker --queue`: a module's JOBS consumed from a durable work queue."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest
from _core_helpers import wait_until
from _worker_helpers import Proc, one_error_line, run_cli

import eventforge as ef

JOBS_MODULE = """
import sys, threading, time

_lock = threading.Lock()  # two jobs may run at once: keep their lines whole

def say(*words):
    with _lock:
        sys.stdout.write(" ".join(str(w) for w in words) + "\\n")
        sys.stdout.flush()

def resize(job):
    say("resizing", job.payload, job.headers["_wq_attempt"])
    time.sleep(job.payload.get("seconds", 0))
    say("resized", job.payload["name"])

JOBS = {"images.resize": resize}
"""


@pytest.fixture
def jobs_module(tmp_path):
    path = tmp_path / "image_jobs.py"
    path.write_text(textwrap.dedent(JOBS_MODULE))
    return str(path)


def queue_worker(jobs_module: str, db: str, *options: str) -> Proc:
    return Proc([sys.executable, "-m", "eventforge", "worker", "--import", jobs_module,
                 "--queue", db, "--log-level", "WARNING", *options])


def test_worker_consumes_jobs_and_stops_gracefully(tmp_path, jobs_module):
    db = str(tmp_path / "jobs.db")
    worker = queue_worker(jobs_module, db, "--workers", "2")
    try:
        worker.wait_for(re.compile(r"ready: jobs of images\.resize from "))
        with ef.WorkQueue(store=db) as wq:
            for name in ("a.png", "b.png", "c.png"):
                wq.enqueue("images.resize", {"name": name})
            assert wait_until(lambda: wq.pending_count() == 0 and wq.in_flight_count() == 0)
        for _ in range(3):
            worker.wait_for(re.compile(r"^resized "))
        worker.signal()
        assert worker.wait() == 0
        assert "eventforge worker stopped: 3 jobs done" in worker.stdout
    finally:
        worker.close()


def test_stopping_finishes_the_job_in_hand(tmp_path, jobs_module):
    db = str(tmp_path / "jobs.db")
    worker = queue_worker(jobs_module, db)
    try:
        worker.wait_for(re.compile(r"ready: "))
        with ef.WorkQueue(store=db) as wq:
            wq.enqueue("images.resize", {"name": "big.png", "seconds": 0.5})
            worker.wait_for(re.compile(r"^resizing "))
            worker.signal()  # SIGTERM while the job runs
            assert worker.wait() == 0
            assert "resized big.png" in worker.stdout  # finished, not abandoned
            assert wq.pending_count() == 0 and wq.in_flight_count() == 0  # and acked
    finally:
        worker.close()


def test_a_module_without_jobs_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "no_jobs.py"
    bad.write_text("HANDLERS = {'f': print}\n")
    result = run_cli("worker", "--import", str(bad), "--queue", str(tmp_path / "jobs.db"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "defines no JOBS dict" in result.stderr
    bad.write_text("JOBS = {'bad topic': print}\n")
    result = run_cli("worker", "--import", str(bad), "--queue", str(tmp_path / "jobs.db"))
    assert result.returncode == 2 and "JOBS in" in result.stderr


def test_demo_queue_shows_a_killed_worker_s_job_finished_by_another():
    result = run_cli("demo-queue", timeout=90)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "worker-1: rendering report.pdf (attempt 1)" in out
    assert re.search(r"killed worker-1 \(pid \d+\) mid-job", out)
    assert "worker-2: rendering report.pdf (attempt 2)" in out
    assert "worker-2: finished report.pdf" in out
    assert "queue: 0 waiting, 0 in flight, 0 dead letters" in out
    assert "worker-2 stopped (exit code 0)" in out


def test_a_queue_file_that_cannot_be_opened_is_refused_in_one_line(tmp_path, jobs_module):
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("not an SQLite database\n" * 20)
    for db in (str(tmp_path), str(tmp_path / "missing" / "jobs.db"), str(not_a_db)):
        result = run_cli("worker", "--import", jobs_module, "--queue", db)
        assert result.returncode == 2, result.stderr
        line = one_error_line(result)
        assert line.startswith("eventforge worker: error: cannot open the work queue "), line
        assert repr(db) in line
