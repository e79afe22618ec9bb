"""The worker and the call/pub/sub commands, as real subprocesses over real sockets."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from _worker_helpers import (
    READY_RE,
    Proc,
    Worker,
    assert_no_leaks,
    leak_snapshot,
    one_error_line,
    run_cli,
)

import eventforge as ef


@pytest.fixture(autouse=True)
def no_leaks():
    before = leak_snapshot()
    yield
    assert_no_leaks(before)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

HANDLERS_SOURCE = textwrap.dedent('''
    import os
    import threading
    import time

    SERVICE_NAME = "testsvc"
    _together = threading.Barrier(4, timeout=20)
    _queue = None


    def add(a, b):
        return a + b


    def boom(message):
        raise ValueError(message)


    def pid():
        return os.getpid()


    def slow(seconds):
        time.sleep(seconds)
        return "slept"


    def together():
        _together.wait()
        return True


    def unjsonable():
        return object()


    def setup(queue):
        global _queue
        _queue = queue
        queue.subscribe("jobs.*", _on_job)


    def _on_job(message):
        _queue.publish("done." + message.topic.split(".", 1)[1], message.payload)


    HANDLERS = {"add": add, "boom": boom, "pid": pid, "slow": slow,
                "together": together, "unjsonable": unjsonable}
''')


@pytest.fixture
def modules(tmp_path):
    (tmp_path / "handlers.py").write_text(HANDLERS_SOURCE)
    return tmp_path


@pytest.fixture
def workers(modules):
    started = []

    def start(*args, **kwargs):
        kwargs.setdefault("cwd", str(modules))
        worker = Worker(*args, **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


@pytest.fixture
def connect():
    queues = []

    def make(port, **kwargs):
        from eventforge.transports.tcp import TCPClientTransport

        transport = TCPClientTransport("127.0.0.1", port, **kwargs)
        transport.connect(timeout=10)
        queue = ef.MessageQueue(transport)
        queues.append(queue)
        return queue

    yield make
    for queue in queues:
        queue.close()


class TestServing:
    def test_serves_the_module_over_tcp(self, workers, connect):
        worker = workers("--import", "handlers")
        assert worker.service == "testsvc"  # from SERVICE_NAME
        assert worker.address[0] == "127.0.0.1"  # loopback by default
        client = ef.RPCClient(connect(worker.port), service_name="testsvc", timeout=10)
        assert client.add(2, 3) == 5
        assert client.call("add", "a", b="b") == "ab"
        with pytest.raises(ef.RemoteError) as info:
            client.boom("kaput")
        assert str(info.value) == "ValueError: kaput"
        assert "in boom" in info.value.remote_traceback
        with pytest.raises(ef.MethodNotFoundError, match="Method not found: nope"):
            client.nope()
        with pytest.raises(ef.RemoteError, match="SerializationError"):
            client.unjsonable()
        assert worker.stop() == 0
        assert any("stopped" in line for line in worker.stdout)

    def test_service_name_precedence(self, workers, modules):
        (modules / "plain.py").write_text("HANDLERS = {'one': lambda: 1}\n")
        assert workers("--import", "handlers", "--service", "flag").service == "flag"
        assert workers("--import", "plain").service == "rpc"
        assert workers("--import", str(modules / "plain.py")).service == "rpc"

    def test_workers_run_calls_concurrently(self, workers, connect):
        worker = workers("--import", "handlers", "--workers", "4")
        client = ef.RPCClient(connect(worker.port), service_name="testsvc", timeout=30)
        results = []
        threads = [threading.Thread(target=lambda: results.append(client.together()))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        assert results == [True] * 4  # the barrier needs all four calls at once

    def test_process_mode(self, workers, connect):
        worker = workers("--import", "handlers", "--mode", "process", "--workers", "2")
        client = ef.RPCClient(connect(worker.port), service_name="testsvc", timeout=30)
        assert client.pid() != worker.popen.pid
        assert client.add(1, 1) == 2
        assert worker.stop() == 0

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
    def test_stop_signal_finishes_calls_in_flight(self, workers, connect, signum):
        worker = workers("--import", "handlers")
        client = ef.RPCClient(connect(worker.port), service_name="testsvc", timeout=30)
        results = []
        caller = threading.Thread(target=lambda: results.append(client.slow(1.0)))
        caller.start()
        time.sleep(0.3)  # the call is running on the worker
        worker.signal(signum)
        caller.join(30)
        assert results == ["slept"]
        assert worker.wait(30) == 0
        assert any("stopped" in line for line in worker.stdout)

    @pytest.mark.skipif(not hasattr(ef, "_ALIASES") or "eventforge.worker" not in ef._ALIASES,
                        reason="the eventforge.worker alias is added with the import-alias table")
    def test_python_m_eventforge_worker(self, workers, connect):
        worker = workers("--import", "handlers", module=("eventforge.worker",))
        client = ef.RPCClient(connect(worker.port), service_name="testsvc", timeout=10)
        assert client.add(1, 2) == 3
        assert worker.stop() == 0


BAD_MODULES = {
    "missing": (None, "cannot import module 'missing'"),
    "raising": ("raise RuntimeError('bad import')\n", "RuntimeError: bad import"),
    "nohandlers": ("X = 1\n", "defines no HANDLERS"),
    "empty": ("HANDLERS = {}\n", "HANDLERS in 'empty' is empty"),
    "notdict": ("HANDLERS = [print]\n", "must be a dict"),
    "notcallable": ("HANDLERS = {'x': 3}\n", "HANDLERS['x'] in 'notcallable' is not callable"),
    "badkey": ("HANDLERS = {1: print}\n", "not a non-empty string"),
    "coroutine": ("async def f():\n    pass\nHANDLERS = {'f': f}\n", "coroutine function"),
    "badservice": ("SERVICE_NAME = 3\nHANDLERS = {'f': print}\n", "SERVICE_NAME"),
    "wildservice": ("SERVICE_NAME = 'a.*'\nHANDLERS = {'f': print}\n", "invalid service_name"),
    "badsetup": ("HANDLERS = {'f': print}\ndef setup(queue):\n    raise KeyError('cfg')\n",
                 "setup(queue) of 'badsetup' failed: KeyError"),
}


class TestBadInput:
    @pytest.mark.parametrize("name", sorted(BAD_MODULES))
    def test_bad_module_exits_with_one_clear_line(self, tmp_path, name):
        source, expected = BAD_MODULES[name]
        if source is not None:
            (tmp_path / f"{name}.py").write_text(source)
        result = run_cli("worker", "--import", name, "--port", "0", cwd=str(tmp_path))
        assert result.returncode == 2
        line = one_error_line(result)
        assert line.startswith("eventforge worker: error: ") and expected in line
        assert result.stdout == ""

    def test_port_in_use(self, modules):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            result = run_cli("worker", "--import", "handlers", "--port", str(port),
                             cwd=str(modules))
        assert result.returncode == 1
        line = one_error_line(result)
        assert "cannot listen on 127.0.0.1:" in line
        assert line.count("cannot listen on") == 1  # the cause is not repeated

    def test_bad_flags(self, modules):
        result = run_cli("worker", "--import", "handlers", "--log-level", "LOUD",
                         cwd=str(modules))
        assert result.returncode == 2 and "--log-level" in one_error_line(result)
        result = run_cli("worker", "--import", "handlers", "--workers", "0", cwd=str(modules))
        assert result.returncode == 2 and "--workers" in one_error_line(result)
        result = run_cli("worker", "--import", "handlers", "--tls-cert", "x.pem",
                         cwd=str(modules))
        assert result.returncode == 2 and "--tls-key" in one_error_line(result)
        result = run_cli("worker", "--import", "handlers", "--secret-file", "nope",
                         cwd=str(modules))
        assert result.returncode == 2 and "--secret-file" in one_error_line(result)
        assert run_cli("worker", cwd=str(modules)).returncode == 2  # --import is required

    def test_call_with_nobody_listening(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = run_cli("call", "add", "1", "2", "--port", str(port), "--connect-timeout", "2")
        assert result.returncode == 1
        assert "cannot connect to 127.0.0.1:" in one_error_line(result)


class TestCommands:
    def test_call(self, workers):
        worker = workers("--import", "handlers")
        port = str(worker.port)
        result = run_cli("call", "add", "1", "2", "--service", "testsvc", "--port", port)
        assert (result.returncode, result.stdout.strip()) == (0, "3"), result.stderr
        result = run_cli("call", "add", "--kwargs", '{"a": [1], "b": [2]}', "--service",
                         "testsvc", "--port", port)
        assert json.loads(result.stdout) == [1, 2]
        result = run_cli("call", "add", "plain", "text", "--service", "testsvc", "--port", port)
        assert json.loads(result.stdout) == "plaintext"  # non-JSON arguments are strings
        result = run_cli("call", "boom", "oops", "--service", "testsvc", "--port", port)
        assert result.returncode == 1
        assert one_error_line(result).endswith("remote error: ValueError: oops")
        result = run_cli("call", "nope", "--service", "testsvc", "--port", port)
        assert result.returncode == 1 and "Method not found: nope" in one_error_line(result)
        result = run_cli("call", "add", "1", "2", "--service", "other", "--port", port,
                         "--timeout", "0.5")
        assert result.returncode == 1
        assert "service 'other' is not served" in one_error_line(result)

    def test_pub_and_sub_across_processes(self, workers):
        worker = workers("--import", "handlers")
        port = str(worker.port)
        sub = Proc([sys.executable, "-m", "eventforge", "sub", "done.*", "--port", port,
                    "--count", "1", "--timeout", "60"])
        try:
            deadline = time.monotonic() + 30
            while not any("listening" in line for line in sub.stderr):
                assert time.monotonic() < deadline, sub.stderr
                time.sleep(0.05)
            # The worker's setup() subscriber turns jobs.X into done.X.  Interest
            # reaches the server asynchronously, so publish until it arrives.
            while sub.popen.poll() is None and time.monotonic() < deadline:
                result = run_cli("pub", "jobs.build", '{"n": 7}', "--header", "trace=abc",
                                 "--port", port)
                assert result.returncode == 0, result.stderr
                assert result.stdout.strip()  # the message id
                try:
                    sub.popen.wait(1.0)
                except subprocess.TimeoutExpired:
                    pass
            assert sub.wait(30) == 0
            received = json.loads(sub.stdout[0])
            assert received["topic"] == "done.build" and received["payload"] == {"n": 7}
        finally:
            sub.close()

    def test_sub_timeout_exits_zero(self, workers):
        worker = workers("--import", "handlers")
        result = run_cli("sub", "quiet.*", "--port", str(worker.port), "--timeout", "0.3")
        assert result.returncode == 0 and result.stdout == ""

    def test_bad_pub_input(self):
        result = run_cli("pub", "bad topic", "--port", "1")
        assert result.returncode == 2 and "topic" in one_error_line(result)
        result = run_cli("pub", "ok.topic", "--header", "novalue", "--port", "1")
        assert result.returncode == 2 and "KEY=VALUE" in one_error_line(result)


class TestSecurity:
    def test_secret_file(self, workers, tmp_path):
        secret = tmp_path / "secret"
        secret.write_text("s3cret\n")
        wrong = tmp_path / "wrong"
        wrong.write_text("guess\n")
        worker = workers("--import", "handlers", "--secret-file", str(secret))
        port = str(worker.port)
        ok = run_cli("call", "add", "1", "2", "--service", "testsvc", "--port", port,
                     "--secret-file", str(secret))
        assert (ok.returncode, ok.stdout.strip()) == (0, "3"), ok.stderr
        for extra in (["--secret-file", str(wrong)], []):
            bad = run_cli("call", "add", "1", "2", "--service", "testsvc", "--port", port,
                          "--timeout", "2", "--connect-timeout", "3", *extra)
            assert bad.returncode == 1, bad.stdout

    @pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
    def test_tls(self, workers, tmp_path):
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60)
        worker = workers("--import", "handlers", "--tls-cert", str(cert), "--tls-key", str(key))
        port = str(worker.port)
        ok = run_cli("call", "add", "1", "2", "--service", "testsvc", "--port", port,
                     "--tls-ca", str(cert))
        assert (ok.returncode, ok.stdout.strip()) == (0, "3"), ok.stderr
        plain = run_cli("call", "add", "1", "2", "--service", "testsvc", "--port", port,
                        "--timeout", "2", "--connect-timeout", "3")
        assert plain.returncode == 1


def test_ready_line_format():
    line = ("eventforge worker ready: service 'math' on 127.0.0.1:9090 "
            "(methods: add; 4 thread workers; pid 1)")
    match = READY_RE.search(line)
    assert match and match.group("port") == "9090" and match.group("service") == "math"
    assert READY_RE.search("eventforge worker ready: service 'm' on [::1]:80 (x)").group("host") \
        == "::1"


def test_load_worker_module_reports_problems(tmp_path):
    (tmp_path / "fine.py").write_text("SERVICE_NAME = 'x'\nHANDLERS = {'f': print}\n")
    module, handlers, service = ef.load_worker_module(str(tmp_path / "fine.py"))
    assert handlers == {"f": print} and service == "x" and module.__name__ == "fine"
    with pytest.raises(ValueError, match="no such file"):
        ef.load_worker_module(str(tmp_path / "absent.py"))


def test_worker_main_is_main_worker(capsys):
    with pytest.raises(SystemExit):
        ef.worker_main(["--help"])
    assert "--import" in capsys.readouterr().out
