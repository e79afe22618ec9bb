"""`.ci/run` replaces CI_VENV only when it is a venv that .ci/run made (or nothing yet)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_RUN = os.path.join(ROOT, ".ci", "run")
MARKER = ".made-by-eventforge-ci"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def check(venv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CI_VENV=venv)
    return subprocess.run(["bash", CI_RUN, "--check-venv-path"], env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def assert_refused(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(".ci/run: refusing") and result.stdout == ""
    return lines[0]


def test_refuses_a_directory_it_did_not_make(tmp_path):
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "keep.txt").write_text("do not delete")
    line = assert_refused(check(str(precious)))
    assert str(precious) in line and MARKER in line
    assert (precious / "keep.txt").read_text() == "do not delete"


def test_refuses_a_plain_venv_without_its_marker(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    assert_refused(check(str(venv)))
    assert (venv / "pyvenv.cfg").exists()


def test_refuses_a_file_a_symlink_and_the_root(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert_refused(check(str(target)))
    made = tmp_path / "made"
    made.mkdir()
    (made / MARKER).write_text("")
    link = tmp_path / "link"
    link.symlink_to(made)
    assert_refused(check(str(link)))
    assert_refused(check("/"))
    assert target.exists() and made.exists()


def test_accepts_nothing_yet_or_its_own_venv(tmp_path):
    result = check(str(tmp_path / "new"))
    assert (result.returncode, result.stderr) == (0, "")
    own = tmp_path / "own"
    own.mkdir()
    (own / MARKER).write_text("made by .ci/run")
    result = check(str(own))
    assert (result.returncode, result.stderr) == (0, "")
    assert (own / MARKER).exists()  # the check alone deletes nothing


def test_the_marker_is_written_where_the_venv_is_made():
    with open(CI_RUN, encoding="utf-8") as f:
        script = f.read()
    made = script.index('-m venv --upgrade-deps "$venv"')
    assert script.index('"$venv/$venv_marker"', made) > made
    assert f'venv_marker="{MARKER}"' in script
