"""Helpers shared by the core test files (not a conftest: plain imports)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, List, Sequence

#: Generous bound for "this should happen promptly" waits; a loaded CI machine
#: may be slow, but nothing in these tests legitimately takes this long.
PATIENCE = 10.0

#: Generous upper bound on how late a timeout may return on a busy machine.
#: Returning *early* is a bug and is checked tightly; lateness is not speed.
SLACK = 2.0


def wait_until(predicate: Callable[[], Any], timeout: float = PATIENCE) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(0.001)


def wait_for(predicate: Callable[[], Any], timeout: float = PATIENCE,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it is true and return its value; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def run_threads(targets: Sequence[Callable[[], Any]], timeout: float = 30.0) -> None:
    """Run each target in its own thread; re-raise the first exception, fail on a hang."""
    errors: List[BaseException] = []
    start = threading.Barrier(len(targets))

    def wrap(target: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                start.wait()
                target()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [t for t in threads if t.is_alive()]
    assert not alive, f"{len(alive)} thread(s) still running after {timeout}s (deadlock?)"
    if errors:
        raise errors[0]
