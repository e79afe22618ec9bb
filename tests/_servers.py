"""Real broker servers for the tests: redis-server and nats-server.

Fixtures (imported by ``tests/conftest.py``):

``redis_url`` / ``nats_url`` (session scope)
    The URL of a running server shared by the whole session.  When
    ``EVENTFORGE_REDIS_URL`` / ``EVENTFORGE_NATS_URL`` is set (``.ci/run`` sets
    both) that server is used as is; otherwise the fixture starts
    ``redis-server`` / ``nats-server`` on a free 127.0.0.1 port (no persistence,
    no log output), waits until it answers, and stops it when the session ends.
    Tests sharing it must use their own keys/topics (``unique_name()``).

``redis_server`` / ``nats_server`` (function scope)
    A private :class:`BrokerServer` for this test only, so a test may
    ``stop()``, ``start()`` or ``restart()`` it (same port, so clients can
    reconnect) without disturbing anyone else.  Stopped after the test.

A missing binary skips the test on a developer machine; when the ``CI``
environment variable is set it fails the test instead, loudly, because a CI
run that silently skipped every broker test would prove nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from typing import Iterator, List, Optional

import pytest

__all__ = [
    "BrokerServer",
    "RedisServer",
    "NatsServer",
    "find_binary",
    "free_port",
    "unique_name",
    "require_module",
    "redis_url",
    "nats_url",
    "redis_server",
    "nats_server",
]

# Debian puts nats-server in /usr/sbin, which is not on every user's PATH.
_EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_READY_TIMEOUT = 15.0


def find_binary(name: str) -> Optional[str]:
    """The full path of server binary *name*, also looking in the sbin dirs."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _EXTRA_BIN_DIRS:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def unique_name(prefix: str = "t") -> str:
    """A topic/key segment no other test uses (for tests sharing one server)."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def _missing(binary: str) -> None:
    message = f"{binary} is not installed (looked on PATH and in {', '.join(_EXTRA_BIN_DIRS)})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must provide it (see the SERVICES block of .ci/run)")
    pytest.skip(message)


def require_module(name: str) -> object:
    """Import a client package the broker tests need: skip without it, fail in CI."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed ({exc}); CI installs it with '.[test]'")
        pytest.skip(f"{name} is not installed", allow_module_level=True)
        raise  # pragma: no cover - skip() raises


class BrokerServer:
    """One server process on a fixed loopback port; restartable on that port."""

    binary = ""
    scheme = ""

    def __init__(self, port: Optional[int] = None) -> None:
        path = find_binary(self.binary)
        if path is None:
            _missing(self.binary)
        self.path: str = path  # type: ignore[assignment]
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.process: Optional[subprocess.Popen] = None

    # -- what differs per server -------------------------------------------
    def command(self) -> List[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _answers(self, sock: socket.socket) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    # -- lifecycle ------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = _READY_TIMEOUT) -> BrokerServer:
        """Start the server and return once it answers a client."""
        if self.running:
            return self
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_ready(timeout)
        return self

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill=True``) and reap it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def restart(self, down_for: float = 0.0, kill: bool = False) -> BrokerServer:
        """Stop, stay down *down_for* seconds, start again on the same port."""
        self.stop(kill=kill)
        if down_for:
            time.sleep(down_for)
        return self.start()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                self.process = None
                raise RuntimeError(
                    f"{self.binary} exited with code {code} while starting on port {self.port}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                    sock.settimeout(2.0)
                    if self._answers(sock):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(f"{self.binary} did not answer on port {self.port}")
            time.sleep(0.05)

    def __enter__(self) -> BrokerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer(BrokerServer):
    """``redis-server`` without persistence, answering PING."""

    binary = "redis-server"
    scheme = "redis"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> List[str]:
        return [
            self.path,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", "",
        ]

    def _answers(self, sock: socket.socket) -> bool:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


class NatsServer(BrokerServer):
    """``nats-server`` (core NATS, no JetStream), answering with INFO."""

    binary = "nats-server"
    scheme = "nats"

    def command(self) -> List[str]:
        return [self.path, "-a", self.host, "-p", str(self.port)]

    def _answers(self, sock: socket.socket) -> bool:
        return sock.recv(4096).startswith(b"INFO ")


def _start_fresh(kind: type) -> BrokerServer:
    """Start a *kind* server, retrying if another process grabbed the free port."""
    for attempt in range(3):
        server = kind()
        try:
            return server.start()
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _session_url(env_var: str, kind: type) -> Iterator[str]:
    url = os.environ.get(env_var)
    if url:
        yield url
        return
    server = _start_fresh(kind)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis server shared by the session (``EVENTFORGE_REDIS_URL`` or started)."""
    yield from _session_url("EVENTFORGE_REDIS_URL", RedisServer)


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """URL of a NATS server shared by the session (``EVENTFORGE_NATS_URL`` or started)."""
    yield from _session_url("EVENTFORGE_NATS_URL", NatsServer)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private, restartable redis-server for one test."""
    server = _start_fresh(RedisServer)
    try:
        yield server  # type: ignore[misc]
    finally:
        server.stop()


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A private, restartable nats-server for one test."""
    server = _start_fresh(NatsServer)
    try:
        yield server  # type: ignore[misc]
    finally:
        server.stop()
