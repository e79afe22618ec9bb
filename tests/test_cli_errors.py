"""Every command-line mistake gets one clear line on stderr and a non-zero exit.

Also: a wrong or missing --service is answered at once with what the worker
serves; a second Ctrl-C stops a draining worker at once; the vendored file
runs as a script under ``python -I``.  Real subprocesses, real sockets.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import pytest
from _worker_helpers import (
    REPO,
    Worker,
    assert_no_leaks,
    leak_snapshot,
    one_error_line,
    run_cli,
)

import eventforge as ef

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture(autouse=True)
def no_leaks():
    before = leak_snapshot()
    yield
    assert_no_leaks(before)


MATH_SOURCE = textwrap.dedent('''
    import os
    import time

    SERVICE_NAME = "math"


    def compute(n):
        return n * 2


    def add(a, b):
        return a + b


    def nap(seconds):
        with open(os.environ["NAP_MARKER"], "w") as f:
            f.write("started")
        time.sleep(seconds)
        return "rested"


    HANDLERS = {"compute": compute, "add": add, "nap": nap}
''')


@pytest.fixture
def math_worker(tmp_path):
    (tmp_path / "mathsvc.py").write_text(MATH_SOURCE)
    workers = []

    def start(*args):
        worker = Worker("--import", "mathsvc", *args, cwd=str(tmp_path),
                        env={"NAP_MARKER": str(tmp_path / "nap.started")})
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()


def _unused_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# Each of these fails before any connection is made (port 1 is never tried).
USAGE_ERRORS = [
    (["call", "--service", "math", "compute", "1e400"], "argument '1e400'"),
    (["call", "--service", "math", "compute", "NaN"], "argument 'NaN'"),
    (["call", "--service", "math", "compute", "[1, -Infinity]"], "-Infinity is not a number"),
    (["call", "compute", "1", "--kwargs", '{"n": NaN}'], "--kwargs"),
    (["call", "--service", "math", "compute", "1", "--timeout", "-1"], "--timeout must be"),
    (["call", "--service", "math", "compute", "1", "--timeout", "0"], "--timeout must be"),
    (["call", "--service", "math", "compute", "1", "--timeout", "nan"], "--timeout must be"),
    (["call", "--service", "math", "compute", "1", "--connect-timeout", "-1"],
     "--connect-timeout must be"),
    (["call", "--service", "math", "compute", "1", "--connect-timeout", "0"],
     "--connect-timeout must be"),
    (["pub", "a.b", "1", "--connect-timeout", "0"], "--connect-timeout must be"),
    (["sub", "a.*", "--timeout", "-1"], "--timeout must be"),
    (["call", "--service", "ma th", "add", "1", "2"], "--service: invalid service_name 'ma th'"),
    (["call", "--service", "math", ""], "METHOD must be a non-empty name"),
    (["pub", "a.b", "NaN"], "PAYLOAD 'NaN'"),
    (["demo", "--servers", "0"], "--servers and --calls must be >= 1"),
    (["demo", "--calls", "0"], "--servers and --calls must be >= 1"),
]


@pytest.mark.parametrize("argv,expected", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line(argv, expected):
    extra = ["--port", "1"] if argv[0] != "demo" else []
    result = run_cli(*argv, *extra, timeout=60)
    line = one_error_line(result)
    assert result.returncode == 2, result.stderr
    assert line.startswith(f"eventforge {argv[0]}: error: ") and expected in line, line
    assert result.stdout == ""


def test_connect_failure_names_the_address_once():
    port = _unused_port()
    result = run_cli("call", "add", "1", "2", "--port", port, "--connect-timeout", "5")
    line = one_error_line(result)
    assert result.returncode == 1
    assert line.count("cannot connect") == 1 and line.count(f"127.0.0.1:{port}") == 1, line


def test_wrong_default_service_says_what_is_served_at_once(math_worker):
    worker = math_worker()
    started = time.monotonic()
    result = run_cli("call", "compute", "21", "--port", str(worker.port), "--timeout", "60")
    elapsed = time.monotonic() - started
    line = one_error_line(result)
    assert result.returncode == 1
    assert "service 'rpc' (the default) is not served on 127.0.0.1:" in line, line
    assert "'math' (add, compute, nap)" in line and line.endswith("pass --service math"), line
    assert elapsed < 50  # answered by the worker, not by the 60 s --timeout
    ok = run_cli("call", "--service", "math", "compute", "21", "--port", str(worker.port))
    assert (ok.returncode, ok.stdout.strip()) == (0, "42"), ok.stderr


def test_a_service_the_listing_does_not_know_still_answers(tmp_path):
    # setup(queue) may serve more on the worker's queue than the listing says.
    (tmp_path / "twosvc.py").write_text(textwrap.dedent('''
        import eventforge

        SERVICE_NAME = "main"
        HANDLERS = {"one": lambda: 1}


        def setup(queue):
            extra = eventforge.RPCServer(queue, service_name="extra")
            extra.add_method("two", lambda: 2)
            extra.serve(blocking=False)
    '''))
    worker = Worker("--import", "twosvc", cwd=str(tmp_path))
    try:
        result = run_cli("call", "--service", "extra", "two", "--port", str(worker.port))
        assert (result.returncode, result.stdout.strip()) == (0, "2"), result.stderr
    finally:
        worker.close()


def test_no_reply_names_the_default_service():
    # A server that is not a worker: nobody answers, so the timeout explains.
    server = ef.TCPServerTransport("127.0.0.1", 0)
    server.start()
    try:
        result = run_cli("call", "compute", "21", "--port", str(server.address[1]),
                         "--timeout", "1")
    finally:
        server.close()
    line = one_error_line(result)
    assert result.returncode == 1
    assert "no reply from service 'rpc'" in line and "'rpc' is the default service" in line
    assert "--service NAME" in line


def test_missing_secret_names_the_cli_option(math_worker, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    worker = math_worker("--secret-file", str(secret))
    result = run_cli("call", "--service", "math", "add", "1", "2", "--port", str(worker.port))
    line = one_error_line(result)
    assert result.returncode == 1
    assert "requires a shared secret (pass --secret-file FILE)" in line, line
    assert "secret=" not in line and line.count("cannot connect") == 1


def test_method_not_found_reads_once():
    error = ef.MethodNotFoundError("MethodNotFoundError", "Method not found: nope")
    assert str(error) == "Method not found: nope"
    text = "".join(traceback.format_exception_only(type(error), error))
    assert text.strip() == "eventforge.MethodNotFoundError: Method not found: nope"
    # The generic remote error keeps the remote type in its text.
    assert str(ef.RemoteError("ValueError", "boom")) == "ValueError: boom"
    with ef.MessageQueue() as queue:
        server = ef.RPCServer(queue, service_name="calc")
        server.serve(blocking=False)
        with pytest.raises(ef.MethodNotFoundError) as caught:
            ef.RPCClient(queue, service_name="calc", timeout=5).nope()
        server.stop()
    assert str(caught.value) == "Method not found: nope"


def test_method_not_found_on_the_cli(math_worker):
    worker = math_worker()
    result = run_cli("call", "--service", "math", "nope", "--port", str(worker.port))
    line = one_error_line(result)
    assert result.returncode == 1
    assert line.endswith("remote error: Method not found: nope"), line


@pytest.fixture
def pem(tmp_path):
    """A self-signed certificate and its key, or skip without openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_errors_name_the_file(math_worker, tmp_path, pem):
    cert, key = pem
    missing = str(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (["worker", "--import", "mathsvc", "--tls-cert", missing, "--tls-key", str(key)],
         f"--tls-cert {missing!r}: no such file"),
        (["worker", "--import", "mathsvc", "--tls-cert", str(cert), "--tls-key", missing],
         f"--tls-key {missing!r}: no such file"),
        (["worker", "--import", "mathsvc", "--tls-cert", str(cert), "--tls-key", str(key),
          "--tls-ca", missing], f"--tls-ca {missing!r}: no such file"),
        (["worker", "--import", "mathsvc", "--tls-cert", str(garbage), "--tls-key", str(key)],
         f"--tls-cert {str(garbage)!r} with --tls-key {str(key)!r}: "),
        (["call", "add", "1", "2", "--port", "1", "--tls-ca", missing],
         f"--tls-ca {missing!r}: no such file"),
        (["call", "add", "1", "2", "--port", "1", "--tls-ca", str(garbage)],
         f"--tls-ca {str(garbage)!r}: "),
    ]
    (tmp_path / "mathsvc.py").write_text(MATH_SOURCE)
    for argv, expected in cases:
        result = run_cli(*argv, "--port", "0", cwd=str(tmp_path)) if argv[0] == "worker" \
            else run_cli(*argv)
        line = one_error_line(result)
        assert result.returncode == 2, (argv, result.stderr)
        assert "cannot load TLS files: " in line and expected in line, line
        assert "[Errno" not in line


def _wait_for(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextlib.contextmanager
def call_in_flight(worker, tmp_path, seconds: float):
    """A nap(seconds) call running on ``worker``; yields its outcome dict."""
    transport = ef.TCPClientTransport("127.0.0.1", worker.port)
    transport.connect(timeout=10)
    queue = ef.MessageQueue(transport)
    outcome = {}

    def call():
        try:
            outcome["result"] = ef.RPCClient(queue, service_name="math", timeout=90).nap(seconds)
        except Exception as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=call, name="test-caller")
    caller.start()
    try:
        _wait_for((tmp_path / "nap.started").exists, what="the call to start")
        yield outcome, caller
    finally:
        queue.close()
        caller.join(30)


def test_first_ctrl_c_finishes_the_call_in_flight(math_worker, tmp_path):
    worker = math_worker()
    with call_in_flight(worker, tmp_path, 2.0) as (outcome, caller):
        worker.signal(signal.SIGINT)
        caller.join(60)
        assert outcome == {"result": "rested"}
        assert worker.wait(60) == 0
        assert worker.stdout[-1].startswith("eventforge worker stopped: service 'math'")


def test_second_ctrl_c_stops_at_once(math_worker, tmp_path):
    worker = math_worker()
    with call_in_flight(worker, tmp_path, 60.0) as (outcome, _):
        worker.signal(signal.SIGINT)
        _wait_for(lambda: any("stopping" in line for line in worker.stderr), what="draining")
        started = time.monotonic()
        worker.signal(signal.SIGINT)
        assert worker.wait(30) == 130
        assert time.monotonic() - started < 30  # not the 60 s the call would take
        assert worker.stdout[-1] == ("eventforge worker stopped at once (second Ctrl-C): "
                                     "service 'math', 1 request served, 1 abandoned in flight")
        assert not any("Traceback" in line for line in worker.stderr), worker.stderr
    assert "result" not in outcome


def test_a_drain_timeout_that_runs_out_ends_the_worker(math_worker, tmp_path):
    worker = math_worker("--drain-timeout", "1")
    with call_in_flight(worker, tmp_path, 60.0) as (outcome, _):
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 1   # not after the 60 s the call would take
        assert time.monotonic() - started < 30
        assert worker.stdout[-1] == (
            "eventforge worker stopped at once (calls still running after --drain-timeout "
            "1 s): service 'math', 1 request served, 1 abandoned in flight")
        assert not any("Traceback" in line for line in worker.stderr), worker.stderr
    assert "result" not in outcome


@pytest.mark.parametrize("argv,expected", [
    (["demo", "--in-process-only"], "math.add(10, 20) -> 30"),
    (["demo", "--servers", "1", "--calls", "5"], "exit codes [0] (clean)"),
])
def test_vendored_file_runs_as_a_script_isolated(tmp_path, argv, expected):
    vendored = tmp_path / "vendor"
    vendored.mkdir()
    shutil.copy(os.path.join(REPO, "eventforge.py"), vendored / "eventforge.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", str(vendored / "eventforge.py"), *argv],
                            cwd=str(tmp_path), env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert "Traceback" not in result.stderr
