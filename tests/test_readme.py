"""The README's Python samples run as written (fixed ports mapped to free ones).

A sample that continues the previous one (it uses a name defined there) is
run together with it, the way a reader would type them into one session.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from typing import List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _blocks() -> List[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(code: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c", code],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _sample(*needles: str) -> str:
    for block in _blocks():
        if all(n in block for n in needles):
            return block
    raise AssertionError(f"README has no python sample containing {needles}")


def test_every_sample_is_covered_by_a_test():
    # The samples below are picked by content; a new sample needs a new test.
    assert len(_blocks()) == 12


def test_in_process_pub_sub_and_request_reply():
    code = _sample('@queue.on("orders.created")') + _sample('@queue.on("math.add")')
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["orders.created {'id': 7}", "5"]


def test_executor_sample():
    result = _run(_sample("Executor(mode=ExecutionMode.THREAD"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["499999500000", "[45, 190]"]


def test_work_queue_sample():
    result = _run(_sample("WorkQueue(max_retries=3)"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0 0"


def test_rpc_sample():
    result = _run(_sample('RPCServer(queue, service_name="calculator")'))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "30 3"


def test_tcp_server_and_client_samples_across_processes():
    port = _free_port()
    server_code = _sample("# server.py").replace("9090", str(port))
    client_code = _sample("# client.py").replace("9090", str(port))
    server = subprocess.Popen(
        [sys.executable, "-c", server_code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().startswith("serving")  # input() prompt
        client = _run(client_code)
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == "30"
        out, err = server.communicate("\n", timeout=30)
        assert server.returncode == 0, err
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=10)


@pytest.mark.parametrize("needle", ["RemoteQueue(\"coordinator\")"])
def test_remote_queue_sample(needle):
    code = _sample(needle).replace("9001", str(_free_port()))
    result = _run(code + "\ncoord.close(); worker.close()\n")
    assert result.returncode == 0, result.stderr
    assert "worker got: {'task': 42}" in result.stdout
    assert "worker got: {'task': 99}" in result.stdout
