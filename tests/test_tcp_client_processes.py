"""A TCP client whose server process dies and comes back: callers and ``eventforge sub``."""

from __future__ import annotations

import signal
import sys
import textwrap
import threading
import time
from typing import Any, List

import pytest
from _worker_helpers import Proc, Worker, assert_no_leaks, leak_snapshot

import eventforge as ef

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

HANDLERS = textwrap.dedent('''
    import time

    SERVICE_NAME = "procs"


    def slow(seconds):
        time.sleep(seconds)
        return "slept"


    HANDLERS = {"slow": slow}
''')


@pytest.fixture
def workers(tmp_path):
    (tmp_path / "procs_handlers.py").write_text(HANDLERS)
    before = leak_snapshot()
    started: List[Worker] = []

    def start(*args: str) -> Worker:
        worker = Worker("--import", "procs_handlers", *args, cwd=str(tmp_path))
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()
    assert_no_leaks(before)


def _stderr_lines(proc: Proc, text: str) -> List[str]:
    return [line for line in proc.stderr if text in line]


def _wait(predicate: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_call_in_flight_fails_at_once_when_the_server_process_dies(workers):
    worker = workers()
    client = ef.TCPClientTransport("127.0.0.1", worker.port).connect(10)
    try:
        rpc = ef.RPCClient(ef.MessageQueue(client), "procs", timeout=120.0)
        outcome: List[Any] = []

        def call() -> None:
            try:
                outcome.append(rpc.slow(60))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        assert _wait(lambda: client.stats["pending"] == 0 and client.stats["messages_out"])
        time.sleep(0.3)  # the worker is running slow(60) now
        started = time.monotonic()
        worker.stop(signal.SIGKILL)
        thread.join(60)
        assert not thread.is_alive()
        assert time.monotonic() - started < 30.0  # not the 120 s timeout
        assert len(outcome) == 1 and isinstance(outcome[0], ef.ConnectionLostError), outcome
    finally:
        client.close(timeout=0.5)


def test_sub_says_once_that_its_server_went_away_and_once_that_it_is_back(workers):
    worker = workers()
    port = worker.port
    sub = Proc([sys.executable, "-m", "eventforge", "sub", "news.*", "--port", str(port)])
    try:
        assert _wait(lambda: _stderr_lines(sub, "listening to"))
        worker.stop(signal.SIGKILL)
        assert _wait(lambda: _stderr_lines(sub, "lost the connection"))
        time.sleep(1.0)  # many reconnect attempts fail meanwhile: still one line
        workers("--port", str(port))
        assert _wait(lambda: _stderr_lines(sub, "again"))
        time.sleep(0.3)
        lost = _stderr_lines(sub, "lost the connection")
        back = _stderr_lines(sub, "again")
        assert len(lost) == 1 and len(back) == 1, sub.stderr
        assert f"127.0.0.1:{port}" in lost[0] and "reconnecting" in lost[0]
        assert "Traceback" not in "\n".join(sub.stderr)
        sub.signal(signal.SIGINT)
        assert sub.wait(20) == 0
    finally:
        sub.close()
