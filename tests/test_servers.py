"""The broker fixtures themselves: servers answer, restart on their port, stop."""

from __future__ import annotations

import socket

import pytest
from _servers import NatsServer, RedisServer


def _redis_ping(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def test_session_redis_answers(redis_url):
    assert _redis_ping("127.0.0.1", _port_of(redis_url)).startswith(b"+PONG")


def test_session_nats_answers(nats_url):
    with socket.create_connection(("127.0.0.1", _port_of(nats_url)), timeout=5) as sock:
        assert sock.recv(4096).startswith(b"INFO ")


@pytest.mark.parametrize("fixture", ["redis_server", "nats_server"])
def test_private_server_restarts_on_the_same_port(fixture, request):
    server = request.getfixturevalue(fixture)
    port = server.port
    server.stop()
    assert not server.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    server.restart()
    assert server.running and server.port == port
    socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_redis_server_keeps_nothing_across_restart(redis_server):
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as sock:
        sock.sendall(b"SET k v\r\n")
        assert sock.recv(64).startswith(b"+OK")
    redis_server.restart()
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as sock:
        sock.sendall(b"EXISTS k\r\n")
        assert sock.recv(64) == b":0\r\n"


def test_context_manager_stops_the_process():
    with NatsServer() as server:
        process = server.process
        assert server.running
    assert process is not None and process.poll() is not None
    server = RedisServer()
    server.start()
    server.stop(kill=True)
    assert not server.running


def test_a_missing_client_skips_outside_ci_and_fails_in_ci(monkeypatch):
    from _servers import require_module

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_module("eventforge_no_such_client")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception):
        require_module("eventforge_no_such_client")
    assert require_module("json").dumps(1) == "1"


def test_a_missing_server_binary_skips_outside_ci_and_fails_in_ci(monkeypatch):
    import _servers

    monkeypatch.setattr(_servers, "find_binary", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        RedisServer()
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="SERVICES block of .ci/run"):
        NatsServer()
