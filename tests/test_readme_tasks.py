"""The README's @task and observer samples, and every sample of docs/observers.md,
run as written and print what their comments promise."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)


def _sample(*needles: str) -> str:
    """The README's python block holding every needle."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    for block in blocks:
        if all(n in block for n in needles):
            return block
    raise AssertionError(f"README has no python sample containing {needles}")

DOC = os.path.join(ROOT, "docs", "observers.md")


def _stats_line(line: str) -> dict:
    return ast.literal_eval(line)


def test_composing_sample():
    result = _run(_sample('topic="process.data"'))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["Done: HELLO", "Done: WORLD"]
    stats = _stats_line(lines[2])
    assert list(stats)[:4] == ["count", "avg", "min", "max"]
    assert stats["count"] == 2 and 0 <= stats["min"] <= stats["avg"] <= stats["max"]
    assert len(lines) == 3


def test_rpc_sample_runs_observers_on_the_server():
    code = _sample('server.add_method("predict", predict)')
    result = _run(code + "\nprint(result, predict.observers[0].stats['count'])\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["4 1"]


def test_observers_sample():
    code = _sample("metrics = MetricsMeter()")
    result = _run(code + "\nprint(simple_function(1), metrics.stats)\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    timing = _stats_line(lines[0])
    assert list(timing)[:4] == ["count", "avg", "min", "max"] and timing["count"] == 2
    assert lines[1] == "{'calls': 2, 'successes': 2, 'failures': 0}"
    assert lines[2] == "2 {'calls': 3, 'successes': 3, 'failures': 0}"


def test_task_api_sample():
    code = _sample("instance_timeout=None,\n)")
    result = _run(code + "\nprint(my_task(21), type(my_task.state).__name__, my_task.pool.stats)\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "None SharedState {'active': 0, 'queued': 0, 'available': None, 'max': None, "
        "'total_processed': 2}"]


def _doc_blocks():
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    # A block preceded by <!-- not-run: ... --> is documentation only.
    return [(m.group(2), m.group(3)) for m in
            re.finditer(r"(<!-- not-run:[^>]*-->\n)?```python\n(# [^\n]*\n)?(.*?)```", text, re.S)
            if m.group(1) is None]


@pytest.mark.parametrize("index", range(len(_doc_blocks())))
def test_docs_observers_samples(index):
    first_line, code = _doc_blocks()[index]
    result = _run((first_line or "") + code)
    assert result.returncode == 0, result.stderr
    # Lines ending in "# -> X" promise that the print on that line shows X.
    expected = [m.group(1).strip() for m in re.finditer(r"print\(.*?\)\s*# -> (.*)", code)]
    assert result.stdout.splitlines() == expected
