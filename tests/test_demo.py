"""`python -m eventforge demo`: the README's main command, run as a real subprocess."""

from __future__ import annotations

import io
import os
import re
import sys
import time

import pytest
from _worker_helpers import assert_no_leaks, leak_snapshot, run_cli

import eventforge as ef


@pytest.fixture(autouse=True)
def no_leaks():
    before = leak_snapshot()
    yield
    assert_no_leaks(before)


def demo_workers_alive():
    """PIDs of processes still serving the demo's handler module (Linux /proc)."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if b"eventforge-demo-" in cmdline and b"demo_handlers.py" in cmdline:
                alive.append(int(entry))
    return alive


@pytest.mark.timeout(120)
def test_demo_runs_and_cleans_up():
    before = set(demo_workers_alive()) if os.path.isdir("/proc") else set()
    started = time.monotonic()
    result = run_cli("demo", timeout=110)
    elapsed = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 0, (out, result.stderr)
    # the in-process part
    assert "in-process pub-sub" in out and "orders.* " in out and "math.add(10, 20) -> 30" in out
    # three workers, calls spread round-robin, percentiles, progress (not a TTY here)
    for n in (1, 2, 3):
        assert re.search(rf"worker-{n}: pid \d+ serving 'demo' on 127\.0\.0\.1:\d+", out)
        assert re.search(rf"worker-{n}:\s+100 calls", out)
    assert re.search(r"p50 [\d.]+ ms, p90 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert "progress: 300/300 calls (100%)" in out
    assert re.search(r"worker-1 monitor \(while the demo runs\): http://127\.0\.0\.1:\d+/", out)
    assert "\r" not in out
    # pub-sub across processes: one event back from each worker
    for n in (1, 2, 3):
        assert re.search(rf"demo\.events\.worker-{n}\s+got .*'done_by': 'worker-{n}'", out)
    assert "exit codes [0, 0, 0] (clean)" in out
    assert elapsed < 100  # generous: "a few seconds" on an idle machine
    if os.path.isdir("/proc"):
        assert set(demo_workers_alive()) <= before


def test_demo_in_process_only():
    result = run_cli("demo", "--in-process-only", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "math.add(10, 20) -> 30" in result.stdout and "subprocesses" not in result.stdout


def test_demo_options():
    result = run_cli("demo", "--servers", "2", "--calls", "20", timeout=100)
    assert result.returncode == 0, result.stderr
    assert re.search(r"worker-1:\s+10 calls", result.stdout)
    assert re.search(r"worker-2:\s+10 calls", result.stdout)
    assert "worker-3" not in result.stdout


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_display():
    lines = []
    tty = FakeTTY()
    progress = ef._Progress(8, lines.append, tty)
    for i in range(1, 9):
        progress.update(i)
    assert tty.getvalue().count("\r") == 8 and tty.getvalue().endswith("] 8/8\n")
    many = FakeTTY()
    progress = ef._Progress(1000, lines.append, many)
    for i in range(1, 1001):
        progress.update(i)
    assert many.getvalue().count("\r") == 101  # once per percent, 0% to 100%
    assert not lines
    plain = ef._Progress(8, lines.append, io.StringIO())
    for i in range(1, 9):
        plain.update(i)
    assert lines == [f"  progress: {n}/8 calls ({p}%)" for n, p in
                     ((2, 25), (4, 50), (6, 75), (8, 100))]


@pytest.mark.skipif(sys.platform == "win32", reason="uses /proc")
def test_helper_sees_no_demo_workers_now():
    assert isinstance(demo_workers_alive(), list)
