"""Every python block of docs/adapters.md runs, against the real test brokers.

The blocks name ``localhost`` default ports; here they are pointed at the
session's servers before running, each in a fresh interpreter.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest
from _servers import require_module

require_module("redis")
require_module("nats")
require_module("logfire")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "adapters.md")


def _blocks():
    with open(DOC, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env)


def _block(word: str) -> str:
    found = [block for block in _blocks() if word in block]
    assert len(found) == 1, f"expected one block using {word}"
    return found[0]


def test_the_doc_has_the_three_blocks():
    assert len(_blocks()) == 3


@pytest.mark.timeout(150)
def test_redis_block(redis_url):
    host, port = re.match(r"redis://([^:/]+):(\d+)", redis_url).groups()
    code = (_block("RedisTransport")
            .replace("redis://localhost:6379/0", redis_url)
            .replace('host="localhost", port=6379', f'host="{host}", port={port}'))
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["5"]


@pytest.mark.timeout(150)
def test_nats_block(nats_url):
    result = _run(_block("NatsTransport").replace("nats://localhost:4222", nats_url))
    assert result.returncode == 0, result.stderr
    workers = ast.literal_eval(result.stdout.strip())
    assert set(workers) <= {"w1", "w2", "w3"} and len(workers) >= 2


@pytest.mark.timeout(150)
def test_logfire_block():
    result = _run(_block("LogfireMeter"))
    assert result.returncode == 0, result.stderr
