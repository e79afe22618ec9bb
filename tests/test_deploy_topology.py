"""deploy/: run the compose topology as plain processes; keep the files consistent."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys

import pytest
from _worker_helpers import REPO, Proc, Worker, assert_no_leaks, leak_snapshot

import eventforge as ef


@pytest.fixture(autouse=True)
def no_leaks():
    before = leak_snapshot()
    yield
    assert_no_leaks(before)

DEPLOY = os.path.join(REPO, "deploy")
TOPOLOGY = os.path.join(DEPLOY, "topology")


def read(*parts):
    with open(os.path.join(DEPLOY, *parts), encoding="utf-8") as f:
        return f.read()


def compose():
    """The parts of docker-compose.yml the test relies on (no YAML library needed)."""
    text = read("docker-compose.yml")
    commands = [json.loads(m) for m in re.findall(r"^\s*command: (\[.*\])\s*$", text, re.M)]
    nodes = re.findall(r"^\s*EVENTFORGE_NODE: (\S+)\s*$", text, re.M)
    services = re.findall(r"^  (\w+):\s*$", text.split("\nservices:\n", 1)[1], re.M)
    return commands, nodes, services


def dockerfile_cmd():
    match = re.search(r"^CMD (\[.*\])\s*$", read("Dockerfile"), re.M)
    return json.loads(match.group(1))


def apptainer_runscript():
    text = read("eventforge.def")
    section = text.split("%runscript", 1)[1].split("%", 1)[0]
    line = next(ln for ln in section.splitlines() if ln.strip().startswith("exec "))
    words = shlex.split(line.strip())[1:]
    return [w.replace("${EVENTFORGE_PORT:-9090}", "9090") for w in words if w != "$@"]


SERVER_COMMAND = ["python", "-m", "eventforge.worker", "--import", "handlers", "--service",
                  "math", "--host", "0.0.0.0", "--port", "9090", "--workers", "4"]


class TestFilesAgree:
    def test_one_server_command_everywhere(self):
        commands, nodes, services = compose()
        server_command, demander_command = commands
        assert server_command == SERVER_COMMAND
        assert dockerfile_cmd() == SERVER_COMMAND
        assert apptainer_runscript() == SERVER_COMMAND
        assert services == ["server1", "server2", "server3", "demander"]
        assert nodes == ["server1", "server2", "server3"]
        assert demander_command[:2] == ["python", "demander.py"]
        servers = demander_command[demander_command.index("--servers") + 1]
        assert servers == ",".join(f"{n}:9090" for n in nodes)
        assert demander_command[demander_command.index("--service") + 1] == "math"

    def test_the_files_ship_what_the_commands_use(self):
        docker = read("Dockerfile")
        assert "deploy/topology/handlers.py" in docker and "deploy/topology/demander.py" in docker
        assert "COPY eventforge.py" in docker
        definition = read("eventforge.def")
        for name in ("eventforge.py", "deploy/topology/handlers.py", "deploy/topology/demander.py"):
            assert name in definition
        assert "--app demander" in definition and "%apprun demander" in definition
        assert "docker compose -f deploy/docker-compose.yml up --build" in read("README.md")

    def test_handlers_module_fits_the_flags(self):
        _, handlers, service = ef.load_worker_module(os.path.join(TOPOLOGY, "handlers.py"))
        assert service == "math"
        assert {"add", "compute", "node", "sleep"} <= set(handlers)


def local_command(command):
    """The compose server command for this machine: loopback, a free port."""
    command = list(command)
    assert command[:3] == ["python", "-m", "eventforge.worker"]
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = "0"
    if "eventforge.worker" in getattr(ef, "_ALIASES", {}):
        module = ("eventforge.worker",)
    else:  # the alias table entry arrives with the lead's merge; same entry point
        module = ("eventforge", "worker")
    return module, command[3:]


@pytest.mark.timeout(120)
def test_topology_runs_as_plain_processes():
    commands, nodes, _ = compose()
    module, args = local_command(commands[0])
    servers = []
    try:
        for node in nodes:
            servers.append(Worker(*args, cwd=TOPOLOGY, module=module,
                                  env={"EVENTFORGE_NODE": node}))
        demander_args = list(commands[1][1:])
        demander_args[demander_args.index("--servers") + 1] = ",".join(
            f"127.0.0.1:{w.port}" for w in servers)
        demander = Proc([sys.executable, *demander_args], cwd=TOPOLOGY)
        try:
            code = demander.wait(100)
        finally:
            demander.close()
        out = "\n".join(demander.stdout)
        assert code == 0, (out, demander.stderr)
        for node in nodes:
            assert f"demander: {node}: 100 calls" in out
        assert "300 calls over 3 servers, 3 answered: ok" in out
        assert [w.stop() for w in servers] == [0, 0, 0]
    finally:
        for w in servers:
            w.close()
