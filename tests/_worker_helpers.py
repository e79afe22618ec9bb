"""Helpers for tests that run eventforge workers and commands as real subprocesses."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from typing import List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY_RE = re.compile(
    r"ready: service '(?P<service>[^']*)' on \[?(?P<host>[^\]\s]+?)\]?:(?P<port>\d+) ")


def child_env(extra: Optional[dict] = None) -> dict:
    """Environment for a child python that imports this checkout's eventforge."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("EVENTFORGE_NODE", None)
    if extra:
        env.update(extra)
    return env


def run_cli(*args: str, cwd: Optional[str] = None, timeout: float = 60,
            module: str = "eventforge", env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run ``python -m eventforge ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=child_env(env),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single non-empty stderr line of a failed command (no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


class Proc:
    """A long-running child whose stdout/stderr lines are collected by reader threads."""

    def __init__(self, command: List[str], cwd: Optional[str] = None,
                 env: Optional[dict] = None) -> None:
        self.command = command
        self.popen = subprocess.Popen(command, cwd=cwd, env=child_env(env),
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        self.stdout: List[str] = []
        self.stderr: List[str] = []
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, self.stdout, True),
                             name="test-stdout-reader", daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, self.stderr, False),
                             name="test-stderr-reader", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream, sink, notify) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            if notify:
                self._lines.put(line)
        if notify:
            self._lines.put(None)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 30) -> re.Match[str]:
        """Wait for a stdout line matching ``pattern``."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            match = pattern.search(line)
            if match:
                return match
        self.kill()
        raise AssertionError(
            f"no line matching {pattern.pattern!r} from {self.command}\n"
            f"stdout: {self.stdout}\nstderr: {self.stderr}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        code = self.popen.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        try:
            self.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def close(self) -> None:
        self.kill()
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


class Worker(Proc):
    """``python -m eventforge worker ARGS`` on a free port; ``address`` once ready."""

    def __init__(self, *args: str, cwd: Optional[str] = None, env: Optional[dict] = None,
                 module: Tuple[str, ...] = ("eventforge", "worker"), port: str = "0") -> None:
        extra = [] if "--port" in args else ["--port", port]
        super().__init__([sys.executable, "-m", *module, *args, *extra], cwd=cwd, env=env)
        match = self.wait_for(READY_RE)
        self.service = match.group("service")
        self.address = (match.group("host"), int(match.group("port")))
        self.port = self.address[1]

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.signal(signum)
        return self.wait(timeout)


def _socket_and_pipe_fds() -> set:
    """Open sockets and pipes of this process (Linux /proc; empty elsewhere)."""
    found = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "pipe:")):
            found.add((fd, target))
    return found


def leak_snapshot():
    """What a test may leave behind: threads and socket/pipe descriptors."""
    return set(threading.enumerate()), _socket_and_pipe_fds()


def assert_no_leaks(before, grace: float = 5.0) -> None:
    """Fail if threads or sockets/pipes opened since ``before`` are still there."""
    import time

    threads_before, fds_before = before
    deadline = time.monotonic() + grace
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        fds = _socket_and_pipe_fds() - fds_before
        if (not threads and not fds) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not threads, f"threads left behind: {[t.name for t in threads]}"
    assert not fds, f"sockets/pipes left behind: {sorted(fds)}"
