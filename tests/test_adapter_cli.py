"""The command line over a broker: ``worker --nats/--redis`` and ``demo --nats``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
from _servers import require_module, unique_name

import eventforge as ef

require_module("redis")
require_module("nats")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eventforge", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


@pytest.mark.timeout(240)
def test_demo_runs_three_workers_behind_nats(nats_url):
    result = _run("demo", "--nats", nats_url, "--calls", "60")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"RPC over NATS at {nats_url}" in out
    served = {name: int(count) for name, count in re.findall(r"(worker-\d):\s+(\d+) calls", out)}
    assert sorted(served) == ["worker-1", "worker-2", "worker-3"]
    assert sum(served.values()) == 60  # every call ran once, balanced by the broker
    assert len(re.findall(r"demo\.events\.worker-\d\s+got", out)) == 3
    assert "exit codes [0, 0, 0] (clean)" in out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_worker_serves_through_a_broker(kind, request, tmp_path):
    from eventforge_ext.nats import NatsTransport
    from eventforge_ext.redis import RedisTransport

    url = request.getfixturevalue(f"{kind}_url")
    service = unique_name("svc")
    module = tmp_path / "handlers_broker.py"
    module.write_text(textwrap.dedent("""
        def add(a, b):
            return a + b

        HANDLERS = {"add": add}
    """))
    worker = subprocess.Popen(
        [sys.executable, "-m", "eventforge", "worker", "--import", str(module),
         "--service", service, f"--{kind}", url, "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        ready = worker.stdout.readline()
        assert f"service '{service}' on {url}" in ready, worker.stderr.read()
        transport = RedisTransport(url=url) if kind == "redis" else NatsTransport(url)
        with ef.MessageQueue(transport) as queue:
            assert ef.RPCClient(queue, service, timeout=30).add(2, 3) == 5
    finally:
        worker.terminate()
        out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "1 requests served" in out


@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_worker_reports_an_unreachable_broker_in_one_line(tmp_path, kind):
    from _servers import free_port

    module = tmp_path / "handlers_unreachable.py"
    module.write_text("HANDLERS = {'f': len}\n")
    result = _run("worker", "--import", str(module), f"--{kind}",
                  f"{kind}://127.0.0.1:{free_port()}", timeout=60)
    assert result.returncode == 1
    assert f"cannot connect to {'Redis' if kind == 'redis' else 'NATS'} at" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_worker_refuses_tcp_security_options_with_a_broker(tmp_path):
    module = tmp_path / "handlers_secret.py"
    module.write_text("HANDLERS = {'f': len}\n")
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    result = _run("worker", "--import", str(module), "--nats", "nats://127.0.0.1:1",
                  "--secret-file", str(secret), timeout=60)
    assert result.returncode == 2
    assert "--secret-file and --tls-* secure the TCP listener" in result.stderr
