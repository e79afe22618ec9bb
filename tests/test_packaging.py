"""Packaging metadata stays in the current form, and the lint tool stays pinned."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_license_is_an_spdx_string_with_a_setuptools_that_knows_it():
    pyproject = _read("pyproject.toml")
    # A TOML table here makes setuptools print a deprecation banner on every install.
    assert re.search(r'^license = "MIT"$', pyproject, re.M)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, re.M)
    assert os.path.isfile(os.path.join(ROOT, "LICENSE"))
    requires = re.search(r'^requires = \["setuptools>=(\d+)"\]$', pyproject, re.M)
    assert requires and int(requires.group(1)) >= 77  # the first to accept both keys


def test_ruff_is_pinned_to_one_series_everywhere():
    pins = re.findall(r'"ruff([^"]*)"', _read("pyproject.toml"))
    tox = re.findall(r"^deps = ruff(\S+)", _read("tox.ini"), re.M)
    found = pins + tox
    assert len(pins) == 1 and len(tox) == 1, (pins, tox)
    for pin in found:
        assert re.fullmatch(r">=(\d+)\.(\d+),<(\d+)\.(\d+)", pin), pin
    assert len(set(found)) == 1, f"pyproject.toml and tox.ini disagree: {found}"
