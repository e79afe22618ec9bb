"""eventforge.py is stdlib-only, runs alone, keeps the original import paths, imports cheaply."""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import eventforge as ef

SOURCE = Path(ef.__file__)
OWN_NAMES = {"eventforge", "eventforge_ext"}

# Python 3.9 has no sys.stdlib_module_names: a fallback list of the standard
# library's top-level modules (enough for anything a core module might use).
_STDLIB_FALLBACK = frozenset(
    """
    __future__ _thread abc argparse array ast asyncio atexit base64 binascii bisect builtins
    bz2 calendar cmath codecs collections colorsys concurrent configparser contextlib
    contextvars copy copyreg csv ctypes dataclasses datetime decimal difflib dis email
    encodings enum errno faulthandler fcntl filecmp fnmatch fractions functools gc getopt
    getpass gettext glob gzip hashlib heapq hmac html http importlib inspect io ipaddress
    itertools json keyword linecache locale logging lzma marshal math mimetypes mmap
    msvcrt multiprocessing netrc numbers operator os pathlib pickle pkgutil platform
    plistlib posixpath pprint profile pstats queue quopri random re reprlib resource
    runpy sched secrets select selectors shelve shlex shutil signal site socket
    socketserver sqlite3 ssl stat statistics string stringprep struct subprocess sys
    sysconfig tarfile tempfile textwrap threading time timeit token tokenize trace
    traceback tracemalloc types typing unicodedata unittest urllib uuid warnings
    weakref winreg xml zipfile zipimport zlib zoneinfo
    """.split()
)
STDLIB = frozenset(getattr(sys, "stdlib_module_names", _STDLIB_FALLBACK))

HEAVY = ["ssl", "asyncio", "multiprocessing", "concurrent", "tracemalloc", "uuid",
         "dataclasses", "decimal", "inspect"]


def _clean_env():
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME"):
        env.pop(name, None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(args, cwd, timeout=60):
    return subprocess.run(
        [sys.executable, *args], cwd=str(cwd), env=_clean_env(), capture_output=True,
        text=True, timeout=timeout,
    )


def _imported_names(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


def test_imports_only_the_standard_library():
    tree = ast.parse(SOURCE.read_text("utf-8"))
    names = dict(_imported_names(tree))
    assert "json" in names and "threading" in names  # the walk really sees imports
    foreign = {n: line for n, line in names.items() if n not in STDLIB and n not in OWN_NAMES}
    assert not foreign, f"non-stdlib imports in eventforge.py (name: line): {foreign}"


def test_alias_targets_are_our_own_modules():
    for alias, (target, _entry) in ef._ALIASES.items():
        assert alias.startswith("eventforge.")
        assert target.split(".")[0] in OWN_NAMES, (alias, target)


@pytest.fixture(scope="module")
def lonely_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("alone")
    shutil.copy(SOURCE, folder / "eventforge.py")
    assert sorted(p.name for p in folder.iterdir()) == ["eventforge.py"]
    return folder


def test_runs_copied_alone_into_an_empty_folder(lonely_dir):
    # -S: no site-packages at all, so only the standard library is importable.
    code = textwrap.dedent(
        """
        import os, eventforge
        assert os.path.dirname(os.path.abspath(eventforge.__file__)) == os.getcwd()
        q = eventforge.MessageQueue()
        seen = []
        q.subscribe("a.*", seen.append)
        q.publish("a.b", {"n": 1})
        q.on("svc", lambda m: q.reply(m, m.payload + 1))
        assert q.request("svc", 41, timeout=5).payload == 42
        frame = eventforge.encode(eventforge.Message("a.b", [1, "x"]))
        assert eventforge.decode(frame[4:]).payload == [1, "x"]
        import eventforge.transports.memory
        print("ok", len(seen))
        """
    )
    result = _run(["-S", "-c", code], lonely_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok 1"


def test_demo_runs_from_the_lonely_copy(lonely_dir):
    result = _run(["-S", "-m", "eventforge", "demo"], lonely_dir, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "request-reply" in result.stdout and "pub-sub" in result.stdout
    assert "nothing left over: 0 unclaimed messages kept, 0 requests still waiting" in result.stdout
    assert "== stopped 3 workers: exit codes [0, 0, 0] (clean) ==" in result.stdout


def test_version_from_the_command_line(lonely_dir):
    result = _run(["-S", "-m", "eventforge", "--version"], lonely_dir)
    assert result.returncode == 0
    assert result.stdout.strip() == f"eventforge {ef.__version__}"


@pytest.mark.parametrize(
    "name",
    ["eventforge.transports", "eventforge.transports.memory", "eventforge.transports.base",
     "eventforge.types", "eventforge.queue"],
)
def test_original_import_paths(name):
    module = importlib.import_module(name)
    assert module is sys.modules[name]
    assert module.MemoryTransport is ef.MemoryTransport
    assert module.Message is ef.Message
    assert module.MessageQueue is ef.MessageQueue
    assert "MemoryTransport" in dir(module)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018 - the lookup itself is the test


def test_from_imports_give_the_same_classes():
    from eventforge.queue import MessageQueue
    from eventforge.transports.base import Transport
    from eventforge.transports.memory import MemoryTransport
    from eventforge.types import Message

    assert MemoryTransport is ef.MemoryTransport
    assert Transport is ef.Transport
    assert Message is ef.Message
    assert MessageQueue is ef.MessageQueue
    assert isinstance(MemoryTransport(), Transport)


def test_unknown_submodules_are_not_found():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("eventforge.no_such_module")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("eventforge.transports.no_such_transport")


def test_an_import_alias_is_not_runnable(lonely_dir):
    result = _run(["-S", "-m", "eventforge.types"], lonely_dir)
    assert result.returncode != 0
    assert "import alias" in result.stderr


def test_import_is_cheap(lonely_dir):
    probe = textwrap.dedent(
        f"""
        import json, sys, threading
        sys.path.insert(0, {str(lonely_dir)!r})
        before = set(sys.modules)
        import eventforge
        print(json.dumps({{
            "new": sorted(set(sys.modules) - before),
            "all": sorted(sys.modules),
            "threads": threading.active_count(),
            "file": eventforge.__file__,
        }}))
        """
    )
    result = _run(["-S", "-X", "importtime", "-c", probe], lonely_dir)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert Path(report["file"]).parent == lonely_dir
    assert "eventforge" in report["new"]
    assert report["threads"] == 1, "import started a thread"
    loaded = {name.split(".")[0] for name in report["all"]}
    assert not loaded & set(HEAVY), f"imported at import time: {sorted(loaded & set(HEAVY))}"
    # The -X importtime log tells the same story.
    timed = {
        line.split("|")[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "eventforge" in timed and "json" in timed
    assert not timed & set(HEAVY), sorted(timed & set(HEAVY))
