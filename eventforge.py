"""eventforge: message-driven task execution in one standard-library module.

Pub-sub and request-reply, in one process or across machines::

                    local (same process)     remote (over a Transport)
    pub-sub         MessageQueue             RemoteQueue
    request-reply   Executor                 RPCServer / RPCClient

The file reads top to bottom; every section uses only the sections above it.

    1. errors ................ EventforgeError and its subclasses
    2. topics ................ validate_topic, validate_pattern, topic_matches,
                               SubscriptionTrie (one matcher for every transport)
    3. messages and wire ..... Message, encode, decode, FrameDecoder
    4. transports ............ Transport (the ABC), Inbox, MemoryTransport
    5. TCP ................... TCPServerTransport, TCPClientTransport
    6. queues ................ MessageQueue, RemoteQueue
    7. execution ............. Executor, ExecutionMode, TaskStatus, TaskResult
    8. RPC ................... RPCServer, RPCClient, RoundRobinRPCClient, with_retry
    9. observers ............. Eventful, Observable, dispatchers, meters, observe
   10. tasks ................. task, TaskRunner, TaskPool, TaskContext, SharedState
   11. work queues ........... WorkQueue
   12. command line .......... worker, main(argv), demo
   13. import aliases ........ the finder behind ``eventforge.transports.tcp`` & co.

The wire format is specified in ``docs/protocol.md``.  Heavy standard-library
modules (``ssl``, ``asyncio``, ``multiprocessing`` ...) are imported where they
are first used, so ``import eventforge`` stays cheap.
"""

from __future__ import annotations

import abc
import collections
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    Optional,
    Tuple,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import asyncio

__version__ = "0.1.0"

__all__ = [
    # errors
    "EventforgeError",
    "TopicError",
    "FrameError",
    "FrameTooLargeError",
    "SerializationError",
    "TransportError",
    "TransportClosedError",
    "TransportFullError",
    "ConnectionLostError",
    "AuthenticationError",
    "EventforgeTimeoutError",
    "RPCTimeoutError",
    "RemoteError",
    "MethodNotFoundError",
    # topics
    "MAX_TOPIC_LENGTH",
    "validate_topic",
    "validate_pattern",
    "topic_matches",
    "SubscriptionTrie",
    # messages and wire
    "DEFAULT_MAX_FRAME_SIZE",
    "Message",
    "encode",
    "decode",
    "FrameDecoder",
    # transports
    "Transport",
    "Inbox",
    "MemoryTransport",
    # queues
    "MessageQueue",
    # command line
    "main",
]

logger = logging.getLogger("eventforge")
logger.addHandler(logging.NullHandler())


# ---------------------------------------------------------------------------
# 1. Errors
# ---------------------------------------------------------------------------
# Every error derives from EventforgeError *and* from the builtin a caller
# would already catch, so ``except TimeoutError`` keeps working.


class EventforgeError(Exception):
    """Base class of every error raised by eventforge."""


class TopicError(EventforgeError, ValueError):
    """A topic or subscription pattern breaks the topic grammar."""


class FrameError(EventforgeError, ValueError):
    """A wire frame could not be decoded (bad UTF-8, JSON, shape or topic)."""


class FrameTooLargeError(FrameError):
    """A frame is longer than the configured ``max_frame_size``."""


class SerializationError(EventforgeError, TypeError):
    """A payload cannot be represented as JSON (NaN, bytes, arbitrary objects)."""


class TransportError(EventforgeError):
    """Base class of transport failures."""


class TransportClosedError(TransportError, RuntimeError):
    """The transport (or queue) was closed; nothing more can be sent."""


class TransportFullError(TransportError):
    """A bounded buffer is full; the message was not accepted (backpressure)."""


class ConnectionLostError(TransportError, ConnectionError):
    """A network connection was lost or refused."""


class AuthenticationError(ConnectionLostError):
    """The peer failed (or refused) the shared-secret or TLS handshake."""


class EventforgeTimeoutError(EventforgeError, TimeoutError):
    """A blocking operation did not finish within its timeout."""


class RPCTimeoutError(EventforgeTimeoutError):
    """An RPC call received no reply within its timeout."""


class RemoteError(EventforgeError):
    """An error raised by the remote side of an RPC call.

    ``str(error)`` reads ``"ValueError: boom"``; the parts are available as
    :attr:`remote_type`, :attr:`remote_message` and :attr:`remote_traceback`.
    """

    def __init__(
        self,
        remote_type: str,
        remote_message: str,
        remote_traceback: Optional[str] = None,
    ) -> None:
        super().__init__(remote_type, remote_message, remote_traceback)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        if not self.remote_message:
            return self.remote_type
        return f"{self.remote_type}: {self.remote_message}"

    def __reduce__(self) -> Any:
        return (type(self), (self.remote_type, self.remote_message, self.remote_traceback))


class MethodNotFoundError(RemoteError):
    """The RPC server has no method registered under the requested name."""


# ---------------------------------------------------------------------------
# 2. Topics
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 3. Messages and the wire codec
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 4. Transports: the ABC and the in-memory transport
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 5. TCP transports
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 6. Queues: MessageQueue and RemoteQueue
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 7. Execution: Executor
# ---------------------------------------------------------------------------

# Executor runs callables in this process: inline (SEQUENTIAL), on a thread
# pool (THREAD) or a process pool (PROCESS).  Every task ends as a TaskResult;
# a failure never escapes as an exception from ``result``.  Bookkeeping is
# bounded: a result is forgotten once collected, and at most ``max_results``
# uncollected tasks are remembered (the oldest is dropped beyond that).
# ``concurrent.futures`` and ``asyncio`` are imported on first use.

import enum  # noqa: E402  (lead: move to the top imports)


class ExecutionMode(str, enum.Enum):
    """How an :class:`Executor` runs a task."""

    SEQUENTIAL = "sequential"
    """Inline, in the caller's thread, at ``submit`` time."""
    THREAD = "thread"
    """On a thread pool: for I/O-bound work and code that releases the GIL."""
    PROCESS = "process"
    """On a process pool: for CPU-bound work (function and arguments must pickle)."""

    def __str__(self) -> str:
        return self.value


class TaskStatus(str, enum.Enum):
    """Life-cycle state of a task, as reported in :class:`TaskResult`."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class TaskResult:
    """The outcome of one task run by an :class:`Executor`.

    Attributes:
        task_id: the id ``submit`` returned.
        status: a :class:`TaskStatus` (COMPLETED, FAILED or CANCELLED once done).
        value: the function's return value (None unless COMPLETED).
        error: ``str()`` of the exception raised (None unless FAILED/CANCELLED).
        error_type: the exception's class name, e.g. ``"ValueError"``.
        execution_time: seconds spent running the function (0.0 if it never ran).
        worker_id: where it ran: a thread name, or ``"pid:<n>"`` in PROCESS mode.
        traceback: the formatted traceback of a failure, when there is one.
        exception: the exception object itself when it could be carried back
            (always in SEQUENTIAL/THREAD mode; in PROCESS mode when it pickles).
    """

    __slots__ = (
        "task_id", "status", "value", "error", "error_type",
        "execution_time", "worker_id", "traceback", "exception",
    )

    def __init__(
        self,
        task_id: str,
        status: TaskStatus,
        value: Any = None,
        error: Optional[str] = None,
        error_type: Optional[str] = None,
        execution_time: float = 0.0,
        worker_id: Optional[str] = None,
        traceback: Optional[str] = None,
        exception: Optional[BaseException] = None,
    ) -> None:
        self.task_id = task_id
        self.status = TaskStatus(status)
        self.value = value
        self.error = error
        self.error_type = error_type
        self.execution_time = execution_time
        self.worker_id = worker_id
        self.traceback = traceback
        self.exception = exception

    @property
    def is_success(self) -> bool:
        """True when the task completed without raising."""
        return self.status is TaskStatus.COMPLETED

    @property
    def is_failure(self) -> bool:
        """True when the task raised, could not run, or was cancelled."""
        return self.status is TaskStatus.FAILED or self.status is TaskStatus.CANCELLED

    def unwrap(self) -> Any:
        """Return :attr:`value`, or raise the task's failure.

        Re-raises the original exception when it is available, else a
        :class:`RemoteError` built from :attr:`error_type` and :attr:`error`.
        """
        if self.status is TaskStatus.COMPLETED:
            return self.value
        if self.exception is not None:
            raise self.exception
        raise RemoteError(self.error_type or "Error", self.error or "", self.traceback)

    def model_dump(self) -> Dict[str, Any]:
        """Return the public fields as a dict (status as its string value)."""
        return {
            "task_id": self.task_id,
            "status": self.status.value,
            "value": self.value,
            "error": self.error,
            "error_type": self.error_type,
            "execution_time": self.execution_time,
            "worker_id": self.worker_id,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskResult):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> Any:
        # Exceptions that do not pickle are dropped, the strings survive.
        exc = self.exception
        if exc is not None:
            try:
                import pickle

                pickle.dumps(exc)
            except Exception:
                exc = None
        return (
            TaskResult,
            (self.task_id, self.status.value, self.value, self.error, self.error_type,
             self.execution_time, self.worker_id, self.traceback, exc),
        )

    def __repr__(self) -> str:
        if self.status is TaskStatus.COMPLETED:
            detail = f"value={self.value!r}"
        elif self.error_type:
            detail = f"error={self.error_type}: {self.error}"
        else:
            detail = ""
        return (
            f"TaskResult(task_id={self.task_id!r}, status={self.status.value}, {detail}, "
            f"execution_time={self.execution_time:.6f}, worker_id={self.worker_id!r})"
        )


class TaskNotFoundError(EventforgeTimeoutError, KeyError):
    """``Executor.result`` was asked for a task id it does not (or no longer) track.

    Raised at once (no waiting): the id was never returned by this executor's
    ``submit``, its result was already collected, or it was dropped by the
    ``max_results`` cap.  It is a :class:`TimeoutError` (a result that will never
    come, as the original API reported it) and a :class:`KeyError` (a lookup of
    an unknown key), so either ``except`` clause catches it.
    """

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown task id"


def _failure(
    task_id: str,
    exc: BaseException,
    execution_time: float = 0.0,
    worker_id: Optional[str] = None,
    with_traceback: bool = True,
) -> TaskResult:
    tb = None
    if with_traceback and exc.__traceback__ is not None:
        import traceback as _tb

        tb = "".join(_tb.format_exception(type(exc), exc, exc.__traceback__))
    return TaskResult(
        task_id, TaskStatus.FAILED, None, str(exc), type(exc).__name__,
        execution_time, worker_id, tb, exc,
    )


def _run_task(task_id: str, func: Callable[..., Any], args: Tuple[Any, ...],
              kwargs: Dict[str, Any]) -> TaskResult:
    """Run one task in a worker thread or inline; never raises (except BaseException exits)."""
    start = time.perf_counter()
    try:
        value = func(*args, **kwargs)
    except Exception as exc:
        return _failure(task_id, exc, time.perf_counter() - start,
                        threading.current_thread().name)
    return TaskResult(task_id, TaskStatus.COMPLETED, value, None, None,
                      time.perf_counter() - start, threading.current_thread().name)


def _run_task_in_process(task_id: str, func: Callable[..., Any], args: Tuple[Any, ...],
                         kwargs: Dict[str, Any]) -> TaskResult:
    """Process-pool entry point: like :func:`_run_task`, with a process worker id."""
    start = time.perf_counter()
    worker = f"pid:{os.getpid()}"
    try:
        value = func(*args, **kwargs)
    except Exception as exc:
        return _failure(task_id, exc, time.perf_counter() - start, worker)
    return TaskResult(task_id, TaskStatus.COMPLETED, value, None, None,
                      time.perf_counter() - start, worker)


def _result_of_future(task_id: str, future: Any) -> TaskResult:
    """Turn a finished ``concurrent.futures.Future`` into a TaskResult."""
    if future.cancelled():
        return TaskResult(task_id, TaskStatus.CANCELLED, error="task was cancelled",
                          error_type="CancelledError")
    exc = future.exception()
    if exc is None:
        return future.result()  # type: ignore[no-any-return]
    # The task never produced a TaskResult: its call could not be pickled, the
    # return value could not be sent back, or the process pool broke.
    return _failure(task_id, exc)


def _check_timeout(timeout: Optional[float]) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if timeout != timeout or timeout < 0:
        raise ValueError(f"timeout must be >= 0, not {timeout!r}")
    return float(timeout)


def _wait_future(future: Any, timeout: Optional[float]) -> bool:
    """Block until a concurrent future is done (cancelled counts); False on timeout.

    ``concurrent.futures.wait`` is not used: it never wakes for a future that
    ``shutdown(cancel_futures=True)`` cancelled.
    """
    import concurrent.futures as cf

    try:
        future.exception(timeout)
    except cf.CancelledError:
        pass
    except cf.TimeoutError:
        return False
    return True


class _Done:
    """A finished task stored without a future (SEQUENTIAL mode)."""

    __slots__ = ("result",)

    def __init__(self, result: TaskResult) -> None:
        self.result = result


class Executor:
    """Run callables in this process and collect their :class:`TaskResult`.

    ``mode`` picks how: :attr:`ExecutionMode.SEQUENTIAL` runs the function inline
    inside ``submit`` (the default), THREAD on a pool of ``max_workers`` threads,
    PROCESS on a pool of ``max_workers`` processes (the function, its arguments
    and its return value must pickle; define the function at module level).

    A task never raises out of the executor: exceptions, arguments that do not
    pickle and a crashed worker process all come back as a FAILED TaskResult
    with ``error_type`` set.

    Memory stays bounded: ``result(task_id)`` hands a result over exactly once
    and forgets it; at most ``max_results`` uncollected tasks are remembered,
    and beyond that the oldest one is dropped (its result is discarded, a
    warning is logged and ``stats["dropped"]`` counts it).  Use :meth:`map`, or
    collect what you submit, and nothing accumulates.

    The pool starts on :meth:`start`, on entering ``with``, or lazily on the
    first ``submit``; :meth:`stop` shuts it down (a later ``submit`` starts a
    new pool).  ``mp_context`` (PROCESS mode) is passed to
    ``ProcessPoolExecutor`` to choose the start method.
    """

    def __init__(
        self,
        mode: Any = ExecutionMode.SEQUENTIAL,
        max_workers: int = 4,
        *,
        max_results: int = 100_000,
        mp_context: Any = None,
    ) -> None:
        try:
            self.mode = ExecutionMode(mode)
        except ValueError:
            choices = ", ".join(m.value for m in ExecutionMode)
            raise ValueError(f"unknown execution mode {mode!r}; expected one of: {choices}") from None
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be an integer >= 1, not {max_workers!r}")
        if isinstance(max_results, bool) or not isinstance(max_results, int) or max_results < 1:
            raise ValueError(f"max_results must be an integer >= 1, not {max_results!r}")
        self.max_workers = max_workers
        self.max_results = max_results
        self._mp_context = mp_context
        self._pool: Any = None
        self._lock = threading.Lock()
        self._tasks: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
        self._prefix = f"task-{os.urandom(3).hex()}-"
        self._counter = itertools.count(1)
        self._submitted = 0
        self._dropped = 0
        self._pools_replaced = 0

    # -- life cycle -------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while a pool is up (always False in SEQUENTIAL mode)."""
        return self._pool is not None

    def start(self) -> Executor:
        """Start the worker pool (idempotent; a no-op in SEQUENTIAL mode)."""
        with self._lock:
            self._ensure_pool_locked()
        return self

    def _ensure_pool_locked(self) -> Any:
        if self._pool is None and self.mode is not ExecutionMode.SEQUENTIAL:
            import concurrent.futures as cf

            if self.mode is ExecutionMode.THREAD:
                self._pool = cf.ThreadPoolExecutor(
                    max_workers=self.max_workers, thread_name_prefix="eventforge-executor"
                )
            else:
                self._pool = cf.ProcessPoolExecutor(
                    max_workers=self.max_workers, mp_context=self._mp_context
                )
        return self._pool

    def stop(self, wait: bool = True) -> None:
        """Shut the pool down.

        ``wait=True`` lets queued and running tasks finish first.  ``wait=False``
        cancels the tasks that have not started (their results read CANCELLED)
        and returns without waiting for running ones.  Results already produced
        stay collectable.
        """
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> Executor:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop(wait=True)

    # -- submitting and collecting ----------------------------------------

    def submit(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
        """Schedule ``func(*args, **kwargs)`` and return its task id.

        Every keyword argument goes to ``func`` (a ``timeout=`` or ``priority=``
        of yours included).  In SEQUENTIAL mode the call runs right here.
        """
        if not callable(func):
            raise TypeError(f"submit() needs a callable, not {type(func).__name__}")
        task_id = self._prefix + "%x" % next(self._counter)
        if self.mode is ExecutionMode.SEQUENTIAL:
            entry: Any = _Done(_run_task(task_id, func, args, kwargs))
        else:
            entry = self._submit_future(task_id, func, args, kwargs)
        with self._lock:
            self._submitted += 1
            tasks = self._tasks
            tasks[task_id] = entry
            if len(tasks) > self.max_results:
                self._drop_oldest_locked()
        return task_id

    def _drop_oldest_locked(self) -> None:
        old_id, _ = self._tasks.popitem(last=False)
        self._dropped += 1
        logger.warning(
            "Executor: dropped the uncollected result of task %s (more than max_results=%d "
            "uncollected tasks); collect results with result() or use map()",
            old_id, self.max_results,
        )

    def _submit_future(self, task_id: str, func: Callable[..., Any],
                       args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """Submit to the pool, replacing a broken process pool once; returns the future."""
        runner = _run_task if self.mode is ExecutionMode.THREAD else _run_task_in_process
        pool = self._pool
        if pool is None:
            with self._lock:
                pool = self._ensure_pool_locked()
        try:
            return pool.submit(runner, task_id, func, args, kwargs)
        except RuntimeError as exc:
            # BrokenProcessPool/BrokenThreadPool (RuntimeError subclasses), or
            # a pool shut down by a concurrent stop(): start a fresh pool.
            with self._lock:
                if self._pool is pool:
                    self._pool = None
                    self._pools_replaced += 1
                    logger.warning("Executor: replacing unusable %s pool (%s)", self.mode.value, exc)
                pool = self._ensure_pool_locked()
            return pool.submit(runner, task_id, func, args, kwargs)

    def _future_for(self, func: Callable[..., Any], args: Tuple[Any, ...],
                    kwargs: Dict[str, Any]) -> Tuple[str, Any]:
        """Submit without bookkeeping; return (task_id, future-or-_Done)."""
        task_id = self._prefix + "%x" % next(self._counter)
        with self._lock:
            self._submitted += 1
        if self.mode is ExecutionMode.SEQUENTIAL:
            return task_id, _Done(_run_task(task_id, func, args, kwargs))
        return task_id, self._submit_future(task_id, func, args, kwargs)

    def _lookup(self, task_id: str) -> Any:
        entry = self._tasks.get(task_id)
        if entry is None:
            raise TaskNotFoundError(
                f"unknown task id {task_id!r}: never submitted to this executor, "
                "already collected, or dropped by the max_results cap"
            )
        return entry

    def _collect(self, task_id: str, entry: Any) -> TaskResult:
        with self._lock:
            if self._tasks.get(task_id) is entry:
                del self._tasks[task_id]
        if isinstance(entry, _Done):
            return entry.result
        return _result_of_future(task_id, entry)

    def result(self, task_id: str, timeout: Optional[float] = None) -> TaskResult:
        """Wait for a task and return its :class:`TaskResult` (once per task).

        ``timeout`` is in seconds (None waits for as long as it takes).  Past the
        deadline :class:`EventforgeTimeoutError` (a ``TimeoutError``) is raised
        and the task stays collectable.  An unknown or already-collected id
        raises :class:`TaskNotFoundError` at once.
        """
        timeout = _check_timeout(timeout)
        entry = self._lookup(task_id)
        if not isinstance(entry, _Done) and not _wait_future(entry, timeout):
            raise EventforgeTimeoutError(f"task {task_id} did not finish within {timeout} s")
        return self._collect(task_id, entry)

    def status(self, task_id: str) -> TaskStatus:
        """Return the current :class:`TaskStatus` of an uncollected task (no waiting)."""
        entry = self._lookup(task_id)
        if isinstance(entry, _Done):
            return entry.result.status
        if entry.running():
            return TaskStatus.RUNNING
        if not entry.done():
            return TaskStatus.PENDING
        return _result_of_future(task_id, entry).status

    def cancel(self, task_id: str) -> bool:
        """Cancel a task that has not started yet; True if it was cancelled."""
        entry = self._lookup(task_id)
        return False if isinstance(entry, _Done) else bool(entry.cancel())

    def map(self, func: Callable[..., Any], items: Iterable[Any],
            timeout: Optional[float] = None) -> List[TaskResult]:
        """Run ``func(item)`` for every item; return the TaskResults in input order.

        ``timeout`` bounds the whole call (monotonic clock); past it the tasks
        not yet started are cancelled and :class:`EventforgeTimeoutError` is
        raised.  In SEQUENTIAL mode a running call cannot be interrupted: the
        deadline is checked between items.  Nothing is left in the executor's
        result table either way.
        """
        timeout = _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.mode is ExecutionMode.SEQUENTIAL:
            out = []
            for item in items:
                if deadline is not None and time.monotonic() > deadline:
                    raise EventforgeTimeoutError(
                        f"map() did not finish within {timeout} s ({len(out)} items done)"
                    )
                out.append(self._future_for(func, (item,), {})[1].result)
            return out
        pending = [self._future_for(func, (item,), {}) for item in items]
        futures = [f for _, f in pending]
        for f in futures:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not _wait_future(f, remaining):
                for g in futures:
                    g.cancel()
                done = sum(1 for g in futures if g.done() and not g.cancelled())
                raise EventforgeTimeoutError(
                    f"map() did not finish within {timeout} s "
                    f"({done} of {len(futures)} items done)"
                )
        return [_result_of_future(tid, f) for tid, f in pending]

    # -- asyncio ------------------------------------------------------------

    async def submit_async(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
        """Async :meth:`submit`: schedule and return the task id.

        THREAD/PROCESS submission never blocks the event loop; in SEQUENTIAL
        mode the function runs inline, as with :meth:`submit`.
        """
        return self.submit(func, *args, **kwargs)

    async def result_async(self, task_id: str, timeout: Optional[float] = None) -> TaskResult:
        """Async :meth:`result`: await a task without blocking the event loop.

        The timeout is exact (asyncio timer, no polling).  On timeout or when the
        awaiting coroutine is cancelled, the task keeps running and stays
        collectable.
        """
        timeout = _check_timeout(timeout)
        entry = self._lookup(task_id)
        if not isinstance(entry, _Done) and not entry.done():
            if not await _wait_future_async(entry, timeout):
                raise EventforgeTimeoutError(f"task {task_id} did not finish within {timeout} s")
        return self._collect(task_id, entry)

    async def map_async(self, func: Callable[..., Any], items: Iterable[Any],
                        timeout: Optional[float] = None) -> List[TaskResult]:
        """Async :meth:`map`: results in input order, one overall exact timeout.

        If the deadline passes (or the coroutine is cancelled) the tasks not yet
        started are cancelled.
        """
        timeout = _check_timeout(timeout)
        if self.mode is ExecutionMode.SEQUENTIAL:
            return self.map(func, items, timeout)
        pending = [self._future_for(func, (item,), {}) for item in items]
        futures = [f for _, f in pending]
        ok = False
        try:
            ok = await _wait_futures_async(futures, timeout)
        finally:
            if not ok:
                for f in futures:
                    f.cancel()
        if not ok:
            done = sum(1 for f in futures if f.done())
            raise EventforgeTimeoutError(
                f"map_async() did not finish within {timeout} s ({done} of {len(futures)} items done)"
            )
        return [_result_of_future(tid, f) for tid, f in pending]

    # -- introspection ------------------------------------------------------

    @property
    def stats(self) -> Dict[str, Any]:
        """Counters: submitted, uncollected, dropped (by the cap), pools_replaced."""
        with self._lock:
            return {
                "mode": self.mode.value,
                "max_workers": self.max_workers,
                "submitted": self._submitted,
                "uncollected": len(self._tasks),
                "dropped": self._dropped,
                "pools_replaced": self._pools_replaced,
            }

    def __repr__(self) -> str:
        state = "running" if self._pool is not None else "idle"
        return f"<Executor mode={self.mode.value} max_workers={self.max_workers} {state}>"


async def _wait_futures_async(futures: List[Any], timeout: Optional[float]) -> bool:
    """Wait for concurrent futures from asyncio; True if all finished in time.

    Done-callbacks wake the loop with ``call_soon_threadsafe``; nothing is
    chained back, so cancelling the waiter never cancels the futures, and a
    callback firing after the loop closed is ignored.
    """
    import asyncio

    remaining = [f for f in futures if not f.done()]
    if not remaining:
        return True
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    count = [len(remaining)]
    lock = threading.Lock()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(True)

    def on_done(_f: Any) -> None:
        with lock:
            count[0] -= 1
            last = count[0] == 0
        if last:
            try:
                loop.call_soon_threadsafe(wake)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    for f in remaining:
        f.add_done_callback(on_done)
    if timeout is None:
        await waiter
        return True
    handle = loop.call_later(timeout, lambda: waiter.done() or waiter.set_result(False))
    try:
        return bool(await waiter)
    finally:
        handle.cancel()


async def _wait_future_async(future: Any, timeout: Optional[float]) -> bool:
    return await _wait_futures_async([future], timeout)


# ---------------------------------------------------------------------------
# 8. RPC
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 9. Observers
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 10. Tasks
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 11. Work queues
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 12. Command line: worker, main(), demo
# ---------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``eventforge`` command line; return the process exit status."""
    raise NotImplementedError  # replaced below in this change series


# ---------------------------------------------------------------------------
# 13. Import aliases
# ---------------------------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover - ``python -m eventforge``
    # Hand over to the canonically imported module so that classes have one
    # identity (pickling in PROCESS mode and isinstance checks rely on it).
    import eventforge as _canonical

    sys.exit(_canonical.main())
