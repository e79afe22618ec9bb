"""Every fenced ```python block of README.md and docs/*.md runs, as written.

The blocks are read from the files themselves (no copies), and each runs in
a fresh ``python`` subprocess with this checkout on ``PYTHONPATH``, from the
repository root.  It must exit 0.  Conventions, all written in the Markdown:

``<!-- not-run: REASON -->`` on the line right before the fence
    excludes that block; the reason is required (an empty one fails).

``<!-- run-with: server.py -->`` on the line right before the fence
    runs this block as the client of the block of the same file whose first
    line is ``# server.py``.  The server starts first; its first line on
    stdout says it is ready; then this block runs; then the server gets a
    newline on stdin (its ``input()`` returns) and must exit 0.  A block
    named this way is run only as a partner, never alone.

Printed output promised in comments is checked:

- ``print(...)  # TEXT`` promises the line TEXT (an explanation may follow
  in parentheses: ``# 5 (None on timeout)``).  These lines must appear in
  stdout in the order of the code.  ``...`` in TEXT stands for any text
  (``# {'count': 2, 'avg': ..., ...}``, as the reference samples write it).
- ``# -> TEXT`` on any other line promises that TEXT is printed somewhere
  (by a handler, typically).

In a promise, ``...`` stands for any text (``# {'count': 2, 'avg': ...}``).

Port numbers 9000-9999 in a block are replaced by free ports (the same
number by the same port within a server/client pair), so the examples keep
their familiar ports and the tests never collide with a real service.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 90.0  # seconds per block: generous, the machine may be busy

_FENCE = re.compile(r"^```python\s*$")
_ANNOTATION = re.compile(r"^<!--\s*(not-run|run-with)\s*:(.*?)-->\s*$")
_PORT = re.compile(r"\b9\d{3}\b")
_PRINT_PROMISE = re.compile(r"\bprint\(.*\)\s+#\s?(.+)$")
_ARROW_PROMISE = re.compile(r"#\s*->\s*(.+)$")


@dataclass
class Block:
    """One fenced python block of a Markdown file."""

    path: str  # relative to ROOT
    line: int  # 1-based line of the opening fence
    code: str
    not_run: Optional[str] = None  # the reason, when excluded
    run_with: Optional[str] = None  # the name of the partner block
    partner_of: List[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def name(self) -> Optional[str]:
        """``server.py`` for a block whose first line is ``# server.py``."""
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        match = re.match(r"#\s*(\S+\.py)\s*$", first)
        return match.group(1) if match else None


def parse_blocks(text: str, path: str) -> List[Block]:
    """Find the python blocks of one Markdown text with their annotations."""
    lines = text.splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        if not _FENCE.match(lines[i]):
            i += 1
            continue
        start = i
        body: List[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path}:{start + 1}: python block is never closed")
        block = Block(path, start + 1, "\n".join(body) + "\n")
        before = lines[start - 1] if start else ""
        annotation = _ANNOTATION.match(before.strip())
        if annotation:
            kind, value = annotation.group(1), annotation.group(2).strip()
            if not value:
                raise AssertionError(f"{block.id}: <!-- {kind}: --> needs a value")
            if kind == "not-run":
                block.not_run = value
            else:
                block.run_with = value
        elif before.strip().startswith("<!--") and re.search(r"not.?run|run.?with", before):
            raise AssertionError(f"{block.id}: malformed annotation {before.strip()!r}")
        blocks.append(block)
        i += 1
    return blocks


def promised_output(code: str) -> tuple[List[str], List[str]]:
    """(lines printed in this order, lines printed somewhere) promised by comments."""
    ordered: List[str] = []
    anywhere: List[str] = []
    for line in code.splitlines():
        arrow = _ARROW_PROMISE.search(line)
        if arrow:
            anywhere.append(arrow.group(1).strip())
            continue
        promise = _PRINT_PROMISE.search(line)
        if promise:
            text = re.sub(r"\s+\(.*\)$", "", promise.group(1).strip())
            ordered.append(text)
    return ordered, anywhere


def doc_files() -> List[str]:
    docs = os.path.join(ROOT, "docs")
    names = ["README.md"] + sorted(
        os.path.join("docs", n) for n in os.listdir(docs) if n.endswith(".md")
    )
    return names


def all_blocks() -> List[Block]:
    blocks: List[Block] = []
    for name in doc_files():
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            found = parse_blocks(f.read(), name)
        by_name = {b.name: b for b in found if b.name}
        for block in found:
            if block.run_with:
                partner = by_name.get(block.run_with)
                if partner is None:
                    raise AssertionError(
                        f"{block.id}: run-with names {block.run_with!r}, but no block of "
                        f"{name} starts with '# {block.run_with}'")
                partner.partner_of.append(block.id)
        blocks.extend(found)
    return blocks


BLOCKS = all_blocks()
RUNNABLE = [b for b in BLOCKS if b.not_run is None and not b.partner_of]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _map_ports(ports: Dict[str, str], code: str) -> str:
    def replace(match: re.Match[str]) -> str:
        number = match.group(0)
        if number not in ports:
            ports[number] = str(_free_port())
        return ports[number]

    return _PORT.sub(replace, code)


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _sample(*needles: str) -> str:
    """The README block containing every needle, for tests that check more than promises."""
    for block in BLOCKS:
        if block.path == "README.md" and all(n in block.code for n in needles):
            return block.code
    raise AssertionError(f"README has no python block containing {needles}")


def _check_result(block: Block, returncode: int, stdout: str, stderr: str) -> None:
    """Exit 0, no traceback on stderr (a handler error is printed there), promises kept."""
    assert returncode == 0, f"{block.id} exited {returncode}:\n{stdout}\n{stderr}"
    assert "Traceback" not in stderr, f"{block.id} printed a traceback:\n{stderr}"
    _check_output(block, stdout)


def _check_output(block: Block, stdout: str) -> None:
    ordered, anywhere = promised_output(block.code)
    lines = stdout.splitlines()
    position = 0
    for expected in ordered:
        found = _find_line(lines, expected, position)
        if found is None:
            raise AssertionError(
                f"{block.id}: expected the line {expected!r} (in this order), got:\n{stdout}")
        position = found + 1
    for expected in anywhere:
        assert _find_line(lines, expected, 0) is not None, (
            f"{block.id}: expected the line {expected!r}, got:\n{stdout}")


def _find_line(lines: List[str], expected: str, start: int) -> Optional[int]:
    """Index of the first line from ``start`` that ``expected`` describes (``...``: any text)."""
    pattern = re.compile(".*".join(re.escape(part) for part in expected.split("...")))
    for index in range(start, len(lines)):
        if pattern.fullmatch(lines[index]):
            return index
    return None


@pytest.mark.timeout(TIMEOUT * 2 + 30)
@pytest.mark.parametrize(
    "block", [pytest.param(b, id=b.id) for b in RUNNABLE])
def test_doc_block_runs(block: Block) -> None:
    if block.run_with:
        _run_pair(block)
        return
    result = _run(_map_ports({}, block.code))
    _check_result(block, result.returncode, result.stdout, result.stderr)


def _run_pair(client: Block) -> None:
    server_block = next(b for b in BLOCKS if b.path == client.path and b.name == client.run_with)
    ports: Dict[str, str] = {}
    server_code = _map_ports(ports, server_block.code)
    client_code = _map_ports(ports, client.code)
    server = subprocess.Popen([sys.executable, "-c", server_code], cwd=ROOT, env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        ready = server.stdout.readline()  # the server's prompt says it is serving
        assert ready, f"{server_block.id} exited before serving: {server.communicate()}"
        result = _run(client_code)
        _check_result(client, result.returncode, result.stdout, result.stderr)
        out, err = server.communicate("\n", timeout=TIMEOUT)
        _check_result(server_block, server.returncode, ready + out, err)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=10)


# -- the harness itself ---------------------------------------------------------


def test_blocks_are_found_in_every_doc_file() -> None:
    found = {b.path for b in BLOCKS}
    assert "README.md" in found and "docs/rpc.md" in found and "docs/tcp.md" in found
    # Every block is either run, run as a partner, or excluded with a reason.
    for block in BLOCKS:
        assert block.not_run or block in RUNNABLE or block.partner_of, block.id


def test_no_undefined_the_original() -> None:
    # "eventforge 0.1" is defined once in the README (section "Compatibility
    # with eventforge 0.1"); "the original" was never defined.
    offenders = []
    for name in doc_files() + ["eventforge.py"]:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if re.search(r"\bthe original\b", line, re.I):
                    offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert "\n## Compatibility with eventforge 0.1\n" in f.read()


def test_exclusions_need_a_reason() -> None:
    text = "intro\n<!-- not-run:   -->\n```python\nimport nothing_here\n```\n"
    with pytest.raises(AssertionError, match="needs a value"):
        parse_blocks(text, "x.md")
    text = "<!-- not-run: needs a Redis server -->\n```python\nx = 1\n```\n"
    assert parse_blocks(text, "x.md")[0].not_run == "needs a Redis server"
    with pytest.raises(AssertionError, match="malformed"):
        parse_blocks("<!-- notrun -->\n```python\nx = 1\n```\n", "x.md")


def test_annotation_must_be_right_before_the_fence() -> None:
    text = "<!-- not-run: far away -->\n\n```python\nx = 1\n```\n"
    assert parse_blocks(text, "x.md")[0].not_run is None


def test_promised_output_is_parsed() -> None:
    code = (
        "print(a)          # 30\n"
        "print(b, c)       # 5 (request returns None on timeout)\n"
        "x.send('w', 1)    # -> worker got: {'task': 42}\n"
        "y = 3             # a plain comment\n"
    )
    assert promised_output(code) == (["30", "5"], ["worker got: {'task': 42}"])


def test_ellipsis_in_a_promise_stands_for_any_text() -> None:
    block = Block("x.md", 1, "print(d)  # {'count': 2, 'avg': ..., 'max': ...}\n")
    _check_output(block, "{'count': 2, 'avg': 0.5, 'max': 1.0, 'total': 1.0}\n")
    with pytest.raises(AssertionError):
        _check_output(block, "{'count': 3, 'avg': 0.5, 'max': 1.0}\n")


def test_a_broken_promise_fails() -> None:
    block = Block("x.md", 1, "print(30)  # 31\n")
    with pytest.raises(AssertionError, match="'31'"):
        _check_output(block, "30\n")
    block = Block("x.md", 1, "print(1)  # 1\nprint(2)  # 2\n")
    with pytest.raises(AssertionError, match="in this order"):
        _check_output(block, "2\n1\n")
