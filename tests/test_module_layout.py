"""The shape of eventforge.py that readers and porters rely on.

The module map in the docstring matches the section banners; the in-process
sections never reach into the network ones; no class outgrows one job.
"""

from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = open(os.path.join(ROOT, "eventforge.py"), encoding="utf-8").read()
TREE = ast.parse(SOURCE)
LINES = SOURCE.splitlines()
MAX_CLASS_LINES = 600  # past this a class wants a collaborator


def _banners() -> List[Tuple[int, int, str]]:
    """(line number, section number, title) of each section banner."""
    found = []
    for index, line in enumerate(LINES):
        match = re.match(r"^# (\d+)\. (.+)$", line)
        if match and LINES[index - 1].startswith("# ---") and LINES[index + 1].startswith("# ---"):
            found.append((index + 1, int(match.group(1)), match.group(2)))
    return found


def _section_of(lineno: int, banners: List[Tuple[int, int, str]]) -> int:
    number = 0
    for start, section, _ in banners:
        if start <= lineno:
            number = section
    return number


def test_the_module_map_lists_the_sections_in_order():
    docstring = ast.get_docstring(TREE) or ""
    mapped = [int(n) for n in re.findall(r"^\s*(\d+)\. \S.*?\.{3,}", docstring, re.M)]
    numbers = [section for _, section, _ in _banners()]
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    assert mapped == numbers, (mapped, numbers)


def test_the_in_process_sections_never_use_the_network_ones():
    banners = _banners()
    tcp = next(section for _, section, title in banners if title.startswith("TCP"))
    defined: Dict[str, int] = {}
    for node in TREE.body:
        names = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        for name in names:
            defined.setdefault(name, _section_of(node.lineno, banners))
    uses = set()
    for node in TREE.body:
        section = _section_of(node.lineno, banners)
        if not 0 < section < tcp:
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and defined.get(sub.id, 0) >= tcp:
                uses.add((section, sub.id))
    assert not uses, f"sections before TCP (section {tcp}) use names defined after it: {uses}"


def test_no_class_outgrows_one_job():
    sizes = {node.name: node.end_lineno - node.lineno + 1  # type: ignore[operator]
             for node in ast.walk(TREE) if isinstance(node, ast.ClassDef)}
    big = {name: size for name, size in sizes.items() if size > MAX_CLASS_LINES}
    assert not big, f"classes over {MAX_CLASS_LINES} lines: {big}"
    assert sizes["TCPServerTransport"] > 100 and sizes["TCPClientTransport"] > 100  # found them


def test_counters_never_parse_a_repr():
    # The one way to count is _Counter (docs/internals.md, "Counting").
    assert "repr(counter)" not in SOURCE and "_count_value" not in SOURCE
