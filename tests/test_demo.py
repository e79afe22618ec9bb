"""`python -m eventforge demo`: the README's main command, run as a real subprocess.

The tests hold the demo to what it says: its opening sentence, its sections,
the counts it reports, a clean stop of every worker, and the commands it
suggests at the end (which must work when typed).
"""

from __future__ import annotations

import io
import json
import os
import re

import pytest
from _worker_helpers import Worker, assert_no_leaks, leak_snapshot, run_cli

import eventforge as ef


@pytest.fixture(autouse=True)
def no_leaks():
    before = leak_snapshot()
    yield
    assert_no_leaks(before)


def process_alive(pid: int) -> bool:
    """True if ``pid`` still exists (the demo reaps its workers, so no zombies)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (a reused pid)
        return True
    return True


NEXT_STEPS = [
    "",
    "Try it by hand next (the last two commands in two terminals):",
    "  python -m eventforge demo --print-handlers > demo_handlers.py",
    "  python -m eventforge worker --import demo_handlers.py   # serves 'demo' on 127.0.0.1:9090",
    "  python -m eventforge call --service demo compute 1000   "
    '# prints {"worker": "pid-...", "value": 332833500}',
    "README.md shows the same in Python code.",
]

IN_PROCESS = [
    "== 1. pub-sub in this process: a publish reaches every matching subscriber ==",
    "  subscribed to orders.created, orders.* (one more segment) and **.failed (any depth)",
    "  publish orders.created:",
    "    orders.created   got {'id': 1, 'item': 'book'}",
    "    orders.*         got orders.created",
    "  publish orders.payment.failed:",
    "    **.failed        got orders.payment.failed",
    "== 2. request-reply in this process: one question, one answer ==",
    "  math.add(10, 20) -> 30",
]


def assert_in_process_part(lines):
    start = lines.index(IN_PROCESS[0])
    assert lines[start:start + len(IN_PROCESS)] == IN_PROCESS
    after = lines[start + len(IN_PROCESS):]
    assert re.fullmatch(r"  2000 more requests, [\d.]+ us each", after[0])
    assert after[1] == ("  nothing left over: 0 unclaimed messages kept, "
                        "0 requests still waiting for a reply")


@pytest.mark.timeout(120)
def test_demo_runs_and_cleans_up():
    result = run_cli("demo", timeout=110)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    assert lines[0] == ("eventforge demo: pub-sub and request-reply inside this process, "
                        "then across 3 worker processes it starts here and stops at the end "
                        "(TCP on 127.0.0.1). Nothing to install.")
    assert [line for line in lines if line.startswith("==")] == [
        IN_PROCESS[0],
        "== 2. request-reply in this process: one question, one answer ==",
        "== 3. 3 worker processes on this machine, serving 'demo' over TCP on 127.0.0.1 ==",
        "== 4. 300 calls, each to the next worker in turn (round-robin) ==",
        "== 5. pub-sub across processes: each worker answers a job with an event ==",
        "== stopped 3 workers: exit codes [0, 0, 0] (clean) ==",
    ]
    assert_in_process_part(lines)
    out = result.stdout
    for n in (1, 2, 3):
        assert re.search(rf"^  worker-{n}: pid \d+ serving 'demo' on 127\.0\.0\.1:\d+$", out, re.M)
        # round-robin: exactly a third of the calls each
        assert re.search(rf"^  worker-{n}:  100 calls  #{{10}}$", out, re.M)
        # pub-sub across processes: one event back from each worker
        assert re.search(rf"^  demo\.events\.worker-{n}\s+got .*'done_by': 'worker-{n}'", out,
                         re.M)
    assert re.search(r"^  each started as `python -m eventforge worker --import "
                     r"demo_handlers.py --port 0`, all ready in [\d.]+ s$", out, re.M)
    assert [line for line in lines if "progress:" in line] == [
        f"  progress: {n}/300 calls ({p}%)" for n, p in ((75, 25), (150, 50), (225, 75),
                                                         (300, 100))]
    assert re.search(r"^  time per call: median [\d.]+ ms, 90% within [\d.]+ ms, "
                     r"99% within [\d.]+ ms, slowest [\d.]+ ms$", out, re.M)
    assert ("  an error in a worker comes back to the caller: compute('ten') raised "
            "RemoteError(TypeError: ") in out
    assert re.search(r"^  worker-1 monitor \(while the demo runs\): http://127\.0\.0\.1:\d+/$",
                     out, re.M)
    assert "\r" not in out  # not a TTY: progress as plain lines
    assert lines[-len(NEXT_STEPS):] == NEXT_STEPS
    # The workers it started (by the pids it printed) are gone: none left behind.
    # (Only these pids: other demos may run on the same machine at the same time.)
    pids = [int(pid) for pid in re.findall(r"^  worker-\d: pid (\d+) ", out, re.M)]
    assert len(pids) == 3
    assert [pid for pid in pids if process_alive(pid)] == []


def test_demo_in_process_only():
    result = run_cli("demo", "--in-process-only", timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("eventforge demo: pub-sub and request-reply inside this process. "
                        "Nothing to install.")
    assert_in_process_part(lines)
    assert "worker" not in "\n".join(lines[:-len(NEXT_STEPS)])
    assert lines[-len(NEXT_STEPS):] == NEXT_STEPS


def test_demo_options():
    result = run_cli("demo", "--servers", "2", "--calls", "20", timeout=100)
    assert result.returncode == 0, result.stderr
    assert "across 2 worker processes" in result.stdout.splitlines()[0]
    assert re.search(r"^  worker-1:   10 calls", result.stdout, re.M)
    assert re.search(r"^  worker-2:   10 calls", result.stdout, re.M)
    assert "worker-3" not in result.stdout
    assert "== stopped 2 workers: exit codes [0, 0] (clean) ==" in result.stdout


def test_the_suggested_commands_work(tmp_path):
    printed = run_cli("demo", "--print-handlers")
    assert printed.returncode == 0 and printed.stdout == ef._DEMO_HANDLERS_SOURCE
    (tmp_path / "demo_handlers.py").write_text(printed.stdout)
    worker = Worker("--import", "demo_handlers.py", cwd=str(tmp_path))  # a free port
    try:
        assert worker.service == "demo"
        called = run_cli("call", "--service", "demo", "compute", "1000",
                         "--port", str(worker.port))
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout) == {"worker": f"pid-{worker.popen.pid}",
                                             "value": 332833500}
        assert worker.stop() == 0
    finally:
        worker.close()


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
