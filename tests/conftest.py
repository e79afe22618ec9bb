"""Shared fixtures.  (Created by the TCP work; only TCP/remote fixtures live here.)

``no_leaks`` fails a test that leaves threads or file descriptors behind;
``tcp`` builds servers and clients on free loopback ports and closes them.
``redis_url``/``nats_url`` (session) and ``redis_server``/``nats_server``
(per test, restartable) run real brokers; see ``tests/_servers.py``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, List

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from _servers import nats_server, nats_url, redis_server, redis_url  # noqa: E402,F401

import eventforge as ef  # noqa: E402


def _open_fds() -> set:
    try:
        return set(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: nothing to compare
        return set()


def _describe_fd(fd: str) -> str:
    try:
        return f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return fd


@pytest.fixture
def no_leaks():
    """Assert the test leaves no thread and no file descriptor behind (2 s grace)."""
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    yield
    deadline = time.monotonic() + 2.0
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        fds = _open_fds() - fds_before
        # An fd number can disappear and be reused; only count sockets/pipes.
        fds = {fd for fd in fds if "socket:" in _describe_fd(fd) or "pipe:" in _describe_fd(fd)}
        if (not threads and not fds) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not threads, f"threads left behind: {[t.name for t in threads]}"
    assert not fds, f"file descriptors left behind: {[_describe_fd(fd) for fd in fds]}"


# The core (non-TCP) test modules get the leak check on every test, for free:
# enumerating threads and /proc/self/fd costs microseconds when nothing leaked.
_LEAK_CHECKED_MODULES = frozenset({
    "test_async", "test_codec", "test_codec_fuzz", "test_executor", "test_failures_core",
    "test_mailbox_model", "test_memory_transport", "test_message_queue", "test_rpc",
    "test_topics", "test_vectors",
})


@pytest.fixture(autouse=True)
def _core_leak_check(request):
    module = getattr(request, "module", None)
    if module is not None and module.__name__.rpartition(".")[2] in _LEAK_CHECKED_MODULES:
        request.getfixturevalue("no_leaks")
    yield


class TCPFactory:
    """Creates servers/clients bound to 127.0.0.1 on free ports; closes them all."""

    def __init__(self) -> None:
        self.owned: List[Any] = []

    def server(self, **options: Any) -> ef.TCPServerTransport:
        options.setdefault("port", 0)
        server = ef.TCPServerTransport("127.0.0.1", **options)
        self.owned.append(server)
        return server.start()

    def client(self, port: int, connect: bool = True, **options: Any) -> ef.TCPClientTransport:
        client = ef.TCPClientTransport("127.0.0.1", port, **options)
        self.owned.append(client)
        return client.connect(5.0) if connect else client

    def own(self, thing: Any) -> Any:
        self.owned.append(thing)
        return thing

    def close(self) -> None:
        for thing in reversed(self.owned):
            try:
                thing.close()
            except Exception:  # pragma: no cover - report but keep closing
                logging.getLogger(__name__).exception("close failed")


@pytest.fixture
def tcp(no_leaks):
    """A :class:`TCPFactory`; everything it made is closed after the test."""
    factory = TCPFactory()
    yield factory
    factory.close()
